"""The client/server boundary of the ``lossd`` command (issue 24).

The server's commands (serve, tokens, metrics-auth, secrets) live in
``lossd_server.cli`` and join ``lossd`` through the ``lossd.commands``
entry point: the client imports nothing from the server, and the server
imports no underscored client module. ``lossd`` runs as a user types it:
a subprocess of the installed console script, or a fresh interpreter where
the server package is blocked, as with only the client installed.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import threading
import tomllib

import pytest

from test_cli import lossd_executable

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(folder: pathlib.Path):
    """(file, imported module) for every absolute import in ``folder``'s
    Python files, those inside functions included."""
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module
                yield from ((path, f"{node.module}.{alias.name}") for alias in node.names)


def test_the_client_imports_nothing_from_the_server():
    found = [(str(p.relative_to(ROOT)), m) for p, m in _imports(ROOT / "client" / "lossd")
             if m.split(".")[0] == "lossd_server"]
    assert found == []


def test_the_server_imports_no_underscored_client_module():
    found = [(str(p.relative_to(ROOT)), m) for p, m in _imports(ROOT / "server" / "lossd_server")
             if m.split(".")[0] == "lossd" and any(part.startswith("_") for part in m.split(".")[1:])]
    assert found == []
    # The check sees such an import: the name the server used to take from the client.
    tree = ast.parse("from lossd._shm import loopback_host")
    assert [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == ["lossd._shm"]


def test_the_server_commands_are_an_entry_point_of_the_package():
    points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lossd.commands"]
    assert points == {"server": "lossd_server.cli:register"}
    from importlib.metadata import entry_points

    installed = {p.value for p in entry_points(group="lossd.commands")}
    assert "lossd_server.cli:register" in installed, \
        "the installed metadata lacks the entry point: reinstall (pip install -e '.[server,test]')"


def lossd(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([lossd_executable(), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_server_commands_from_the_entry_point():
    done = lossd("--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "tokens", "metrics-auth", "secrets", "health", "jobs"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.M), command
    assert "pip install" not in done.stdout  # the hint is for a client without the server's commands
    assert done.stderr == ""


# A fresh interpreter in which the server package cannot be imported, as
# where only the thin client is installed; it runs ``lossd ARGV``.
CLIENT_ONLY = textwrap.dedent('''
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lossd_server", "tensorflow", "keras", "pydantic"):
                raise ImportError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Block())
    from lossd import cli

    sys.argv[0] = "lossd"
    code = cli.main(sys.argv[1:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lossd_server", "tensorflow", "pydantic"))
    print("LOADED", loaded)
    sys.exit(code)
''')


def client_only(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT_ONLY, *argv], capture_output=True, text=True, timeout=120)


def test_without_the_server_help_works_and_says_how_to_get_its_commands():
    done = client_only("--help")
    assert done.returncode == 0, done.stderr
    assert "health" in done.stdout and "jobs" in done.stdout
    assert not re.search(r"^\s+serve\s", done.stdout, re.M)
    assert ('the server\'s commands (serve, tokens, metrics-auth, secrets) come with the server: '
            'pip install "lossd[server]"') in " ".join(done.stdout.split())


def test_without_the_server_serve_says_what_to_install():
    done = client_only("serve", "--port", "0")
    assert done.returncode == 2
    assert done.stderr.startswith("note: the command(s) of lossd_server.cli:register are missing")
    assert 'error: `lossd serve`: the server\'s commands (serve, tokens, metrics-auth, secrets) come with the ' \
           'server: pip install "lossd[server]"' in done.stderr


def test_a_client_command_reads_no_entry_point_and_loads_nothing_of_the_server():
    done = client_only("health", "--address", "127.0.0.1:1", "--timeout", "1")
    assert done.returncode == 1  # nothing listens there
    assert "note:" not in done.stderr  # the entry points were not read
    assert "LOADED []" in done.stdout


# -- lossd serve --help -----------------------------------------------------------------

def test_every_setting_has_a_help_group():
    from lossd_server.cli import OTHER_GROUP, setting_group
    from lossd_server.config import Settings

    ungrouped = [name for name in Settings.model_fields if setting_group(name) == OTHER_GROUP]
    assert ungrouped == [], f"add these settings to lossd_server.cli.SETTING_GROUPS: {ungrouped}"
    assert setting_group("a_new_knob") == OTHER_GROUP  # the check can fail


def test_serve_help_is_grouped_with_one_plain_sentence_per_flag():
    from lossd_server.config import Settings

    done = lossd("serve", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    headings = re.findall(r"^(\w+) settings:$", text, re.M)
    assert headings == ["network", "TLS", "auth", "limits", "evaluation", "training", "monitors", "state",
                        "observability"]
    assert "``" not in text and ":ref:" not in text  # reStructuredText stays in docs/settings.md
    assert "tests/" not in text and "test suite" not in text  # so do notes about the suite
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')} " in text, name
    # Each flag's help is one sentence and its default, however long its description in config.py
    # (max_evaluation_cost's has 12 lines there).
    blocks = re.findall(r"^  (--[a-z-]+) \S+\s+(.*?)(?=^  --|^\n|\Z)", text, re.M | re.S)
    assert len(blocks) == len(Settings.model_fields)
    for flag, help_text in blocks:
        sentence = " ".join(help_text.split())
        assert re.fullmatch(r"[^\n]+\. \(default: [^)]*\)", sentence) and not re.search(r"\. [A-Z]", sentence), \
            (flag, sentence)


# -- gRPC's own log lines -------------------------------------------------------------------

@pytest.fixture
def not_tls():
    """A port that answers a TLS handshake with plain-text bytes, as a
    server without TLS does: gRPC's core logs the failed handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def answer():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)

    threading.Thread(target=answer, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)  # I1207 22:11:15.276 ... ssl_transport_security.cc


def test_grpc_log_lines_stay_off_the_terminal(not_tls):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    done = subprocess.run([lossd_executable(), "health", "--tls", "--address", not_tls, "--timeout", "3"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("unhealthy: "), done.stderr
    assert not GRPC_LOG_LINE.search(done.stderr), done.stderr
    # The user's own GRPC_VERBOSITY wins, and then gRPC's lines do show: the check above can fail.
    done = subprocess.run([lossd_executable(), "health", "--tls", "--address", not_tls, "--timeout", "3"],
                          capture_output=True, text=True, timeout=120, env={**env, "GRPC_VERBOSITY": "DEBUG"})
    assert GRPC_LOG_LINE.search(done.stderr), done.stderr
