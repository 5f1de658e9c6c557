"""The deploy page (docs/deploy.md), run as written: the commands that make
deploy/secrets (`lossd secrets init` for the CA, the server's certificate
and the metrics password, `lossd tokens create` for the team: four commands
at most, as issue 12 asks), then a server configured as
compose configures lossd (its /run/secrets paths pointing at those files),
and the client commands and Python example a team member runs against it.
Only the server's address (and the placeholder token) are replaced."""

from __future__ import annotations

import base64
import os
import re
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from test_deploy import COMPOSE, PROMETHEUS_CONFIG, ROOT, compose_config, find_tool, secret_paths

PAGES = {"deploy": ROOT / "docs" / "deploy.md", "metrics": ROOT / "docs" / "metrics.md"}
SECRETS = "/run/secrets/"
README_ADDRESS = "lossd.example.com:50051"


def block(language: str, marker: str, page: str = "deploy") -> str:
    found = [b for b in re.findall(rf"```{language}\n(.*?)```", PAGES[page].read_text(), flags=re.S) if marker in b]
    assert len(found) == 1, f"expected one ```{language} block of docs/{page}.md with {marker!r}, found {len(found)}"
    return found[0]


def shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    lossd_bin = find_tool("lossd")
    assert lossd_bin, f"no `lossd` command next to {sys.executable} or on PATH"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    env["PATH"] = f"{Path(lossd_bin).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["/bin/sh", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """(repository-like folder, tokens printed) after the secrets block ran there."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "deploy").mkdir()
    script = block("sh", "lossd secrets init deploy/secrets")
    commands = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) <= 4, commands   # "a CA and tokens for a small team in four commands"
    result = shell(script, root)
    assert result.returncode == 0, result.stdout + result.stderr
    tokens = [line for line in result.stdout.splitlines() if line.startswith("lsd_")]
    assert len(tokens) == 2, result.stdout   # alice's and bob's, printed once each
    return root, tokens


def test_the_secrets_block_makes_every_secret_compose_mounts_with_the_right_modes(team):
    root, _ = team
    folder = root / "deploy" / "secrets"
    mounted = {Path(f).name for f in compose_config(COMPOSE)["secrets"].values() for f in [f["file"]]}
    assert mounted <= {p.name for p in folder.iterdir()}, mounted
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "ca.key").stat().st_mode) == 0o600   # stays private, mounted nowhere
    for name in ("server.key", "tokens.jsonl", "metrics-users", "metrics-password"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name   # the containers' users read them
    password = (folder / "metrics-password").read_text().strip()
    assert password and password not in (folder / "metrics-users").read_text()


@pytest.fixture(scope="module")
def deployed(team):
    """A server with the lossd service's TLS, tokens and metrics settings,
    the /run/secrets files being the ones the README made."""
    pytest.importorskip("tensorflow")
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    root, tokens = team
    config = compose_config(COMPOSE)
    mounted = secret_paths(config, "lossd")
    settings = {}
    for key, value in config["services"]["lossd"]["environment"].items():
        if value.startswith(SECRETS):
            assert value in mounted, value
            settings[key[len("LOSSD_"):].lower()] = root / "deploy" / "secrets" / value[len(SECRETS):]
    assert {"tls_cert", "tls_key", "tokens_file", "metrics_basic_auth_file"} <= set(settings), settings
    server = create_server(Settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                                    data_dir=root / "data", grace_seconds=0, **settings),
                           metrics_registry=CollectorRegistry())
    server.start()
    try:
        yield root, tokens, server
    finally:
        server.stop(0)


def test_a_team_member_connects_with_the_ca_and_a_token_as_the_readme_says(deployed):
    root, (alice, _), server = deployed
    script = block("sh", "LOSSD_TLS_CA=deploy/secrets/ca.pem")
    assert script.count(README_ADDRESS) == 1 and script.count("lsd_...") == 1
    # "localhost" is one of the certificate's names, as lossd.example.com is.
    script = script.replace(README_ADDRESS, f"localhost:{server.port}").replace("lsd_...", alice)
    result = shell(script, root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout and "mean_squared_error" in result.stdout, result.stdout
    # The same without the token: refused.
    result = shell(script.replace(alice, ""), root)
    assert result.returncode != 0 and "UNAUTHENTICATED" in result.stdout + result.stderr


def test_the_python_example_connects_with_tls_and_a_token(deployed):
    root, (alice, _), server = deployed
    code = block("python", "lossd.TLS(")
    assert code.count(README_ADDRESS) == 1
    env = {**os.environ, "LOSSD_TOKEN": alice, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code.replace(README_ADDRESS, f"localhost:{server.port}")],
                            cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(eval(result.stdout)) == 3, result.stdout   # noqa: S307 - the example prints a list of names


def test_prometheus_password_and_the_ca_scrape_the_metrics(deployed):
    root, _, server = deployed
    folder = root / "deploy" / "secrets"
    password = (folder / "metrics-password").read_text().strip()
    request = urllib.request.Request(f"https://localhost:{server.metrics_port}/metrics", headers={
        "Authorization": "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()})
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert response.status == 200 and b"lossd_build_info" in response.read()


def test_the_documented_scrape_job_is_the_shipped_one():
    job = block("yaml", "job_name: lossd", page="metrics")
    shipped = [line.strip() for line in PROMETHEUS_CONFIG.read_text().splitlines()
               if line.strip() and not line.strip().startswith("#")]
    lines = [line.strip() for line in job.splitlines() if line.strip()]
    start = shipped.index(lines[0])
    assert shipped[start:start + len(lines)] == lines
