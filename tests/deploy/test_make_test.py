"""`make test` does not depend on the machine's luck: it installs the system
tools the tests need (Prometheus, PostgreSQL) or stops with one line, and CI
fails on any skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-s", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_make_test_checks_its_tools_first():
    # The tool check runs before the virtualenv is built, so a machine without
    # the tools learns it at once.
    dry = make("-n", "test", "TEST_TOOLS=no_such_tool_xyz", "APT_GET=no-apt-get-here")
    assert dry.returncode != 0


def test_missing_tool_without_apt_stops_with_one_line():
    result = make("test-tools", "TEST_TOOLS=prometheus no_such_tool_xyz", "APT_GET=no-apt-get-here")
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "no_such_tool_xyz" in lines[0] and "apt-get install prometheus" in lines[0], lines[0]


def test_missing_kubectl_stops_with_one_line_even_where_apt_could_install_prometheus():
    result = make("test-tools", "K8S_TOOLS=no_such_kubectl_xyz", "TEST_TOOLS=sh", "APT_GET=true")
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "no_such_kubectl_xyz" in lines[0] and "deploy/k8s" in lines[0], lines


def test_missing_tool_as_root_with_apt_installs_prometheus():
    if os.geteuid() != 0:
        result = make("-n", "test-tools", "TEST_TOOLS=no_such_tool_xyz", "APT_GET=true")
        assert result.returncode != 0   # not root: the one-line stop, never a silent skip
        return
    result = make("-n", "test-tools", "TEST_TOOLS=no_such_tool_xyz", "APT_GET=true")
    assert result.returncode == 0, result.stderr
    assert "true install -y" in result.stdout and "prometheus" in result.stdout, result.stdout


def test_missing_postgresql_is_installed_as_root_or_named_in_one_line():
    absent = ("TEST_TOOLS=sh", "POSTGRES_INITDB=no_such_initdb_xyz")
    if os.geteuid() == 0:
        result = make("-n", "test-tools", *absent, "APT_GET=true")
        assert result.returncode == 0, result.stderr
        assert "true install -y" in result.stdout and "postgresql" in result.stdout, result.stdout
    result = make("test-tools", *absent, "APT_GET=no-apt-get-here")
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "no_such_initdb_xyz" in lines[0] and "apt-get install postgresql" in lines[0], lines[0]


def test_present_tools_need_nothing():
    result = make("-n", "test-tools", "TEST_TOOLS=sh")
    assert result.returncode == 0 and "install" not in result.stdout, result.stdout + result.stderr


def test_ci_runs_make_test_with_skips_as_failures(tmp_path):
    # .ci/run with a stand-in `make` that reports how it was called.
    (tmp_path / "make").write_text('#!/bin/sh\necho "make $* LOSSD_FAIL_ON_SKIP=$LOSSD_FAIL_ON_SKIP"\n')
    (tmp_path / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LOSSD_FAIL_ON_SKIP"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "make test LOSSD_FAIL_ON_SKIP=1", result.stdout


def _pytest_with_skip(tmp_path: Path, fail_on_skip: bool, *options: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_one_skip.py").write_text(
        "import pytest\n\n"
        "def test_runs():\n    pass\n\n"
        "def test_skips():\n    pytest.skip('promtool is not installed')\n")
    env = {k: v for k, v in os.environ.items() if k != "LOSSD_FAIL_ON_SKIP"}
    env["PYTHONPATH"] = str(ROOT)  # the tests package, whose conftest imports tests.<helper>
    if fail_on_skip:
        env["LOSSD_FAIL_ON_SKIP"] = "1"
    # The repository's conftest as a plugin, on a test file of our own.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", *options, "test_one_skip.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_ci_run(tmp_path):
    result = _pytest_with_skip(tmp_path, fail_on_skip=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "LOSSD_FAIL_ON_SKIP=1: 1 skipped test(s) fail this run" in result.stdout, result.stdout


def test_a_skip_fails_the_ci_run_in_parallel_too(tmp_path):
    # make test runs pytest-xdist: the skip happens in a worker, the verdict is the controller's.
    result = _pytest_with_skip(tmp_path, True, "-n", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "LOSSD_FAIL_ON_SKIP=1: 1 skipped test(s) fail this run" in result.stdout, result.stdout
    assert "1 passed, 1 skipped" in result.stdout, result.stdout


def test_a_skip_is_only_a_skip_locally(tmp_path):
    result = _pytest_with_skip(tmp_path, fail_on_skip=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
