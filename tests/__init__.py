"""The test suite, a package so that its shared helpers (``tests.servers``,
``tests.postgres``, ``tests.keras_reference``, ``tests.certificates``,
``tests.fuzzing``, ...) have one importable name for the tests and for
``bench/`` (run from the repository root as ``python -m bench.NAME``), and no
file edits ``sys.path`` to reach them. pytest puts the repository root on the
path because this package's ``conftest.py`` lives here."""
