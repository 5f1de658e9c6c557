"""Benchmarks. A benchmark that uses the tests' helpers (``tests.fuzzing``,
``tests.inflight_memory``) runs from the repository root as
``python -m bench.NAME``; the others also run as ``python bench/NAME.py``."""
