"""The thin client starts fast: ``import lossd`` and the client commands load
neither the server nor the heavy optional packages (issue 24).

``ml_dtypes`` alone took 1.1-1.3 s of a 1.4 s ``import lossd``; the server's
Settings (pydantic, ``lossd_server``) made ``lossd --help`` 1.9 s. Each check
runs in a fresh interpreter, since this process has them all loaded by other
tests. ``bench/startup.py`` times the same commands.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("ml_dtypes", "tensorflow", "keras", "lossd_server", "pydantic")


def run_fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loaded_after(code: str) -> list[str]:
    """The HEAVY top-level packages in ``sys.modules`` after ``code`` ran."""
    out = run_fresh(f"""
        import sys
        {code}
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
    """)
    return eval(out.strip().splitlines()[-1])


def test_import_lossd_loads_nothing_heavy():
    assert loaded_after("import lossd; from lossd import wire, aio") == []


def test_import_lossd_alone_loads_neither_grpc_nor_numpy():
    # Its names load on first use, so `lossd.cli` sets GRPC_VERBOSITY before gRPC's core reads it.
    out = run_fresh("""
        import sys, lossd
        print(sorted({m.split(".")[0] for m in sys.modules} & {"grpc", "numpy"}))
        print(lossd.Client.__module__, lossd.wire.__name__, "grpc" in sys.modules)
    """)
    assert out.splitlines() == ["[]", "lossd._client lossd.wire True"]


def test_a_client_command_loads_nothing_heavy():
    # As `lossd health` runs: the client's parser, no entry point read, the command run (nothing listens at :1).
    assert loaded_after("from lossd import cli; cli.main(['health', '--address', '127.0.0.1:1', '--timeout', '1'])"
                        ) == []


def test_the_whole_parser_loads_only_the_server_commands_module():
    # As `lossd --help` builds it: the entry point's module (lossd_server.cli) and its package, nothing they
    # would import to run a command (the settings, pydantic, TensorFlow).
    out = run_fresh("""
        import sys
        from lossd import cli
        cli.build_parser().parse_args(['health', '--address', 'h:1'])
        print(sorted(m for m in sys.modules if m.split(".")[0] in %r))
    """ % (HEAVY,))
    assert eval(out.strip().splitlines()[-1]) == ["lossd_server", "lossd_server.cli"]


def test_parsing_serve_loads_the_settings_and_gives_their_flags():
    out = run_fresh("""
        import sys
        from lossd import cli
        args = cli.build_parser().parse_args(['serve', '--port', '1234'])
        print(args.port, 'lossd_server.config' in sys.modules)
    """)
    assert out.split() == ["1234", "True"]


def test_bfloat16_is_imported_when_first_met_and_round_trips():
    out = run_fresh("""
        import sys
        import numpy as np
        from lossd import wire
        assert "ml_dtypes" not in sys.modules
        assert "bfloat16" in wire.SUPPORTED_DTYPES and "bfloat16" in wire.FLOAT_DTYPES
        # decoding meets it first: 1.0, -2.0, 0.5 in bfloat16 (the top half of float32), little-endian
        raw = np.array([1.0, -2.0, 0.5], np.float32).view(np.uint32) >> 16
        array = wire.from_bytes(raw.astype("<u2").tobytes(), wire.DataType.DATA_TYPE_BFLOAT16, [3])
        print(array.dtype.name, array.astype(np.float32).tolist(), "ml_dtypes" in sys.modules)
        tensor = wire.from_numpy(array)
        print(wire.enum_name(tensor.dtype), wire.to_numpy(tensor).astype(np.float32).tolist())
    """)
    assert out.splitlines() == ["bfloat16 [1.0, -2.0, 0.5] True", "bfloat16 [1.0, -2.0, 0.5]"]


def test_bfloat16_arrays_encode_in_a_fresh_process():
    # encoding meets it first: an array the caller made with ml_dtypes, before lossd loaded the type
    out = run_fresh("""
        import ml_dtypes, numpy as np
        from lossd import wire
        tensor = wire.from_numpy(np.array([1.5, -3.0], dtype=ml_dtypes.bfloat16))
        print(wire.enum_name(tensor.dtype), wire.to_numpy(tensor).astype(np.float32).tolist())
    """)
    assert out.split() == ["bfloat16", "[1.5,", "-3.0]"]
