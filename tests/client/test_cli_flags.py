"""The command line as a user types it: the client flags in the same places
for every command, and a pipe closed early (``lossd losses | head``). Real
``lossd`` subprocesses against the real in-process server."""

from __future__ import annotations

import argparse
import os
import subprocess

import pytest

from lossd import cli
from test_cli import dead_address, lossd_executable

HUBER_LIKE = "mean(abs(y_true - y_pred), axis=-1)"


def lossd(*argv, env_address: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``lossd ARGV``; LOSSD_ADDRESS points at a closed port unless given,
    so only the command's own --address can reach the server."""
    env = {**os.environ, "LOSSD_ADDRESS": env_address or dead_address()}
    return subprocess.run([lossd_executable(), *map(str, argv)], capture_output=True, text=True, timeout=120,
                          env=env, **kwargs)


def _leaves(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) for every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _leaves(sub, path + (name,))


def test_every_client_command_takes_the_client_flags():
    # serve and the commands that make the server's secrets run on the server's machine and call no server.
    on_the_server = ("serve", "tokens", "metrics-auth", "secrets")
    commands = [(path, p) for path, p in _leaves(cli.build_parser()) if path[0] not in on_the_server]
    assert {("losses", "register"), ("losses", "delete"), ("jobs", "list"), ("datasets", "upload"),
            ("eval",), ("health",)} <= {path for path, _ in commands}
    for path, parser in commands:
        flags = {option for action in parser._actions for option in action.option_strings}
        assert {"--address", "--timeout"} <= flags, f"`lossd {' '.join(path)}` lacks the client flags"


@pytest.mark.parametrize("where", ["after", "between"])
def test_losses_register_and_delete_take_address(address, where):
    name = f"cli_flags_{where}"
    flags = ["--address", address, "--timeout", "30"]
    if where == "after":  # lossd losses register NAME EXPR --address A
        register = ["losses", "register", name, HUBER_LIKE, *flags]
        delete = ["losses", "delete", name, *flags]
    else:  # lossd losses --address A register NAME EXPR
        register = ["losses", *flags, "register", name, HUBER_LIKE]
        delete = ["losses", *flags, "delete", name]
    done = lossd(*register)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"registered {name}(y_true, y_pred)")
    listed = lossd("losses", "--json", "--address", address)
    assert f'"name": "{name}"' in listed.stdout
    done = lossd(*delete)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"deleted {name}"


def test_the_flags_after_every_kind_of_command(address):
    for argv in (["losses", "--address", address],
                 ["health", "--address", address, "--timeout", "10"],
                 ["jobs", "list", "--address", address, "--timeout", "30"],
                 ["jobs", "--address", address, "list"],
                 ["datasets", "list", "--address", address, "--timeout", "30"],
                 ["datasets", "--address", address, "list"]):
        done = lossd(*argv)
        assert done.returncode == 0, (argv, done.stderr)


def test_the_environment_still_gives_the_default(address):
    done = lossd("losses", "delete", "no_such_loss_here", env_address=address)
    assert done.returncode == 1
    assert "LOSS_NOT_FOUND" in done.stderr  # it reached the server at LOSSD_ADDRESS


def test_a_closed_port_names_the_address_on_the_command_line():
    dead = dead_address()
    done = lossd("losses", "--address", dead, "--timeout", "10")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: UNAVAILABLE: Nothing listens at {dead} (connection refused). "
                                  "Expected `lossd serve` running there"), done.stderr
    done = lossd("health", "--address", dead, "--timeout", "5")
    assert done.returncode == 1
    assert f"Nothing listens at {dead}" in done.stderr


@pytest.mark.parametrize("table", ["", "--json"])
def test_losses_piped_into_head(address, table):
    script = f'"$LOSSD" losses {table} --address {address} | head -1; echo "status=${{PIPESTATUS[0]}}" >&2'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOSSD": lossd_executable()})
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert done.stderr.strip().splitlines()[-1] in ("status=0", "status=141")


def test_a_reader_that_closes_at_once(address):
    """The reader is gone before the first write: the write fails for
    certain, and lossd stops quietly with SIGPIPE's status."""
    script = f'"$LOSSD" losses --json --address {address} | true; echo "status=${{PIPESTATUS[0]}}" >&2'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOSSD": lossd_executable()})
    assert done.stderr.strip() == "status=141", done.stderr
