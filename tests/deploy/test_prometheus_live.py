"""The compose deployment, run without a Docker engine and scraped by a real Prometheus.

What the containers would run, taken from the deployment files themselves:

* lossd: the ``lossd`` service of ``docker compose config --format json``,
  its entrypoint/command (the Dockerfile's ENTRYPOINT when compose sets none)
  and its environment (the Dockerfile's ENV, overridden by compose's
  ``environment:``). Only the port numbers (free ones) and the data directory
  (a temporary one) change, and the secrets compose mounts under
  /run/secrets are files the test makes in a temporary folder with ``lossd
  secrets init``'s code (a CA made at run time, a server certificate,
  metrics basic-auth users) and a token.
  LOSSD_HOST and LOSSD_METRICS_HOST, which the deployment sets to every
  interface, become 127.0.0.2: tests listen on loopback only, and that
  address stands for the one other containers reach lossd through (a
  listener bound to 127.0.0.1 refuses it, as it refuses ``lossd:9464`` in
  compose).
* Prometheus: ``deploy/prometheus/prometheus.yml`` with only the target
  addresses and the /run/secrets folder changed, ``alerts.yml`` beside it: it
  scrapes over HTTPS with the CA and basic auth, at 127.0.0.2.

Known traffic goes through ``lossd.Client`` in two waves: a warm-up before
Prometheus starts (every series the checks read exists from the first scrape
on) and the main wave once Prometheus has stored a first sample, so
``rate()`` over the dashboard's window sees an increase; one two-step
training job runs meanwhile, so the jobs panels have a finished job to show.
The tests then run
every PromQL expression of the Grafana dashboard and the alert rules against
that Prometheus. Both processes are bounded by timeouts and stopped (SIGTERM,
then SIGKILL) however the module ends.

Needs the ``prometheus`` binary (Debian/Ubuntu: ``apt-get install
prometheus``); without it the tests fail with a one-line message.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.servers import PATIENCE, free_port
from test_deploy import (ALERTS, COMPOSE, DASHBOARD, DOCKERFILE, PROMETHEUS_CONFIG, compose_config,
                         dashboard_exprs, find_tool, require, secret_paths, yaml_scalars)

SERVICE = "lossd.v1.LossService"
JOB = "lossd"
UNKNOWN_LOSS = "no_such_loss_xyz"
START_WAIT_S = PATIENCE  # lossd imports TensorFlow before it listens; the machine may be busy
SCRAPE_WAIT_S = 60.0   # the deployment scrapes every 15 s: a sample lands within ~20 s
JOB_WAIT_S = PATIENCE    # a 2-step CNN job: its process imports TensorFlow first
WINDOW = "1m"          # longer than the whole module runs: every sample is in range

# Calls per kind: (warm-up wave, main wave).
GOOD_MSE = (1, 7)
GOOD_HUBER = (1, 5)
UNKNOWN = (1, 3)       # INVALID_ARGUMENT, counted under loss="other"
BAD_SHAPE_MSE = (1, 2)  # INVALID_ARGUMENT, counted under the mse canonical name

N = sum(GOOD_MSE)
M = sum(GOOD_HUBER)
K = sum(UNKNOWN) + sum(BAD_SHAPE_MSE)
WARM_UP = GOOD_MSE[0] + GOOD_HUBER[0] + UNKNOWN[0] + BAD_SHAPE_MSE[0]

# sum by (loss, outcome) (lossd_loss_evaluations_total), non-zero series only.
EXPECTED_EVALUATIONS = {
    ("mean_squared_error", "ok"): N,
    ("huber", "ok"): M,
    ("other", "invalid_argument"): sum(UNKNOWN),
    ("mean_squared_error", "invalid_argument"): sum(BAD_SHAPE_MSE),
}


# -- the deployment's own configuration ---------------------------------------

def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        full, pending = pending + line, ""
        word, _, rest = full.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_env(text: str) -> dict[str, str]:
    """The image's ENV (both ``ENV K=V ...`` and the legacy ``ENV K V``)."""
    env: dict[str, str] = {}
    for word, rest in _dockerfile_instructions(text):
        if word != "ENV":
            continue
        tokens = shlex.split(rest)
        if tokens and "=" not in tokens[0]:
            env[tokens[0]] = rest.split(None, 1)[1] if len(tokens) > 1 else ""
            continue
        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value
    return env


def dockerfile_exec_form(text: str, instruction: str) -> list[str] | None:
    """The last ENTRYPOINT or CMD (exec form), HEALTHCHECK's CMD excluded."""
    found = None
    for word, rest in _dockerfile_instructions(text):
        if word == instruction:
            found = json.loads(rest)
    return found


def test_dockerfile_parser():
    text = ('FROM x\nENV A=1 \\\n    # note\n    B="two words" \\\n    C=3\nENV D 4 5\n'
            'HEALTHCHECK --interval=1s \\\n    CMD ["h"]\nENTRYPOINT ["lossd", "serve"]\n')
    assert dockerfile_env(text) == {"A": "1", "B": "two words", "C": "3", "D": "4 5"}
    assert dockerfile_exec_form(text, "ENTRYPOINT") == ["lossd", "serve"]
    assert dockerfile_exec_form(text, "CMD") is None


def lossd_container() -> tuple[list[str], dict[str, str], dict]:
    """(argv, environment, compose service) the lossd container would run with."""
    service = compose_config(COMPOSE)["services"]["lossd"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    text = DOCKERFILE.read_text()
    entrypoint = service.get("entrypoint") or dockerfile_exec_form(text, "ENTRYPOINT") or []
    # Docker: a compose entrypoint drops the image's CMD; compose's command replaces it.
    command = service.get("command")
    if command is None and not service.get("entrypoint"):
        command = dockerfile_exec_form(text, "CMD")
    argv = [*entrypoint, *(command or [])]
    env = dockerfile_env(text)
    for key, value in (service.get("environment") or {}).items():
        if value is not None:
            env[key] = str(value)
    return argv, env, service


def dockerfile_only_env() -> dict[str, str]:
    return dockerfile_env(DOCKERFILE.read_text())


# -- addresses -----------------------------------------------------------------

def _bindable(address: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def other_local_address() -> str:
    """127.0.0.2: a loopback address other than 127.0.0.1, standing for the
    address another container reaches lossd through (Linux routes all of
    127/8 to lo, and a 127.0.0.1 listener refuses it). Tests listen on
    loopback only."""
    if _bindable("127.0.0.2"):
        return "127.0.0.2"
    pytest.fail("cannot bind 127.0.0.2, the second loopback address the deployment test serves on")


# -- secrets: what the operator puts in deploy/secrets ----------------------------

SECRETS = "/run/secrets/"  # where compose mounts them (secret_paths)


class Secrets:
    """The files of deploy/secrets, made at run time in ``folder`` as the
    README makes them (``lossd secrets init``): a CA, the server's
    certificate for the names the deployment uses and the addresses the test
    reaches it through, the "prometheus" metrics user with its password
    file, and one token with the evaluate and train scopes."""

    def __init__(self, folder: Path, other_address: str):
        from lossd_server.security.secrets import init_secrets
        from lossd_server.security.tokens import create_token

        self.folder = folder
        init_secrets(folder, hosts=("127.0.0.1", other_address))
        self.ca = folder / "ca.pem"
        self.token = create_token(folder / "tokens.jsonl", "team", ["evaluate", "train"])
        self.metrics_password = (folder / "metrics-password").read_text().strip()

    def local(self, path: str) -> str:
        """The test's file for a container path under /run/secrets."""
        assert path.startswith(SECRETS), path
        local = self.folder / path[len(SECRETS):]
        assert local.is_file(), f"the deployment mounts {path}, which the test does not make"
        return str(local)


# -- processes -----------------------------------------------------------------

def _stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class Lossd:
    """``lossd serve`` as the container runs it, with remapped ports and data dir."""

    def __init__(self, root: Path, other_address: str, secrets: Secrets):
        argv, env, self.service = lossd_container()
        assert argv[:2] == ["lossd", "serve"], argv
        self.container_env = dict(env)
        lossd_bin = find_tool("lossd")
        assert lossd_bin, f"no `lossd` command next to {sys.executable} or on PATH (pip install -e '.[server]')"
        # compose publishes the gRPC port only; Prometheus reaches metrics over the compose network.
        published = {int(p["target"]) for p in self.service["ports"]}
        assert published == {int(env["LOSSD_PORT"])}, (published, env)
        # Every interface in the container; the second loopback address here.
        for name in ("LOSSD_HOST", "LOSSD_METRICS_HOST"):
            assert env[name] in ("0.0.0.0", "::", "[::]"), f"the deployment binds {name}={env[name]} only"
            env[name] = other_address
        # The port numbers, the data directory and the secrets' folder change.
        self.port, self.metrics_port = free_port(other_address), free_port(other_address)
        env.update(LOSSD_PORT=str(self.port), LOSSD_METRICS_PORT=str(self.metrics_port),
                   LOSSD_DATA_DIR=str(root / "data"))
        self.secret_mounts = secret_paths(compose_config(COMPOSE), "lossd")
        for key, value in env.items():
            if value.startswith(SECRETS):
                assert value in self.secret_mounts, f"{key}={value} is not a secret compose mounts"
                env[key] = secrets.local(value)
        self.secrets = secrets
        self.address = f"{other_address}:{self.port}"
        self.env = env
        base = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "lossd.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen([lossd_bin, *argv[1:]], env={**base, **env}, cwd=root,
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        self.other_address = other_address

    def log(self) -> str:
        return _tail(self.log_path)

    def startup(self) -> dict:
        """The startup line ("lossd … listening on …"), as the JSON log writes it."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "listening on" in str(record.get("message", "")):
                return record
        return {}

    def wait_ready(self, timeout: float = START_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lossd serve exited with {self.process.returncode}:\n{self.log()}")
            if self.startup():
                return
            time.sleep(0.2)
        raise TimeoutError(f"lossd serve not listening after {timeout} s:\n{self.log()}")

    def stop_grace_seconds(self) -> float:
        """compose's stop_grace_period: how long `docker stop` waits before SIGKILL."""
        period = str(self.service.get("stop_grace_period", "10s"))
        match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", period)
        assert match and period, f"unexpected stop_grace_period {period!r}"
        return 60 * float(match.group(1) or 0) + float(match.group(2) or 0)

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then SIGKILL after compose's stop_grace_period, as `docker stop`:
        (exit status, seconds until exit)."""
        start = time.monotonic()
        try:
            _stop(self.process, timeout=self.stop_grace_seconds())
        finally:
            self._log.close()
        return self.process.returncode, time.monotonic() - start


class Prometheus:
    """Prometheus on the deployment's prometheus.yml, queried over its HTTP API."""

    def __init__(self, binary: str, root: Path, lossd_target: str, secrets: Secrets):
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        text = PROMETHEUS_CONFIG.read_text()
        # Only the target addresses change: lossd's, and Prometheus's own.
        targets = re.findall(r'"(lossd:\d+)"', text)
        assert len(targets) == 1, targets
        self.deployed_target = targets[0]
        text = text.replace(f'"{targets[0]}"', f'"{lossd_target}"')
        assert text.count('"localhost:9090"') == 1
        text = text.replace('"localhost:9090"', f'"127.0.0.1:{self.port}"')
        # The files compose mounts under /run/secrets: the test's own.
        mounted = secret_paths(compose_config(COMPOSE), "prometheus")
        for path in sorted(set(re.findall(rf"{SECRETS}\S+", text))):
            assert path in mounted, f"prometheus.yml reads {path}, which compose does not mount"
            text = text.replace(path, secrets.local(path))
        self.config = root / "prometheus.yml"
        self.config.write_text(text)
        # rule_files are relative to the config: copy them beside it, unchanged.
        block = re.search(r"^rule_files:\n((?:[ \t]+- .*\n?)+)", text, re.M)
        self.rule_files = re.findall(r"- (\S+)", block.group(1)) if block else []
        assert self.rule_files, "prometheus.yml loads no rule_files"
        for name in self.rule_files:
            shutil.copy(PROMETHEUS_CONFIG.parent / name, root / name)
        self.log_path = root / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary,
             f"--config.file={self.config}",
             f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             # Keep it light: short retention, few query workers, quiet logs.
             "--storage.tsdb.retention.time=1h",
             "--query.max-concurrency=4",
             "--web.max-connections=16",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return _tail(self.log_path)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def api(self, path: str, **params) -> object:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as error:   # 400/422: a bad query, with Prometheus's reason
            body = json.loads(error.read() or b"{}")
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """An instant query: [(labels, value)] of a vector, or [({}, value)] of a scalar."""
        data = self.api("/api/v1/query", query=promql)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        assert data["resultType"] == "vector", data
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, promql: str) -> float | None:
        """The single value of a query, None when it returns nothing."""
        result = self.query(promql)
        assert len(result) <= 1, (promql, result)
        return result[0][1] if result else None

    def wait_until(self, check, what: str, timeout: float = SCRAPE_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.25)
        targets = self.api("/api/v1/targets")
        raise TimeoutError(f"{what} not seen after {timeout} s; targets: {targets}\n{self.log()}")

    def wait_for(self, promql: str, expected: float, timeout: float = SCRAPE_WAIT_S) -> None:
        self.wait_until(lambda: self.value(promql) == expected, f"{promql} == {expected}", timeout)

    def rules_evaluated(self) -> bool:
        rules = [r for g in self.api("/api/v1/rules")["groups"] for r in g["rules"]]
        return bool(rules) and all(r.get("health") not in (None, "unknown") for r in rules)

    def stop(self) -> None:
        try:
            _stop(self.process, timeout=10)
        finally:
            self._log.close()


# -- traffic and the stack -----------------------------------------------------

def send(client, wave: int) -> None:
    """Sends one wave of known traffic (0: warm-up, 1: main)."""
    import lossd

    y_true = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
    y_pred = y_true + 0.5
    for _ in range(GOOD_MSE[wave]):
        assert client.evaluate("mse", y_true, y_pred).loss == pytest.approx(0.25)
    for _ in range(GOOD_HUBER[wave]):
        assert client.evaluate("huber", y_true, y_pred).loss == pytest.approx(0.125)
    for _ in range(UNKNOWN[wave]):
        with pytest.raises(lossd.LossdError) as info:
            client.evaluate(UNKNOWN_LOSS, y_true, y_pred)
        assert info.value.code.name == "INVALID_ARGUMENT" and info.value.reason == "UNKNOWN_LOSS"
    for _ in range(BAD_SHAPE_MSE[wave]):
        with pytest.raises(lossd.LossdError) as info:
            client.evaluate("mse", y_true, y_pred[:, :2])
        assert info.value.code.name == "INVALID_ARGUMENT" and info.value.reason == "SHAPE_MISMATCH"


@pytest.fixture(scope="module")
def other_address() -> str:
    return other_local_address()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory, other_address) -> Secrets:
    return Secrets(tmp_path_factory.mktemp("secrets"), other_address)


def team_client(server: Lossd):
    """A client as the README's team member makes one: TLS with the CA, a token."""
    import lossd

    return lossd.Client(server.address, timeout=30, tls=lossd.TLS(ca=server.secrets.ca),
                        token=server.secrets.token)


@pytest.fixture(scope="module")
def lossd_serve(tmp_path_factory, other_address, secrets):
    """`lossd serve` with the deployment's command and environment, stopped at the end."""
    server = Lossd(tmp_path_factory.mktemp("compose-lossd"), other_address, secrets)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, lossd_serve, other_address, secrets):
    """(lossd, Prometheus) after both waves of traffic have been scraped."""
    binary = require("prometheus", "Debian/Ubuntu: apt-get install prometheus")
    tmp = tmp_path_factory.mktemp("compose-prometheus")
    server = lossd_serve
    prometheus = None
    try:
        with team_client(server) as client:
            send(client, 0)
            prometheus = Prometheus(binary, tmp, f"{other_address}:{server.metrics_port}", secrets)
            prometheus.wait_ready()
            # A first sample of the warm-up is stored: the main wave is an increase.
            prometheus.wait_for(f'up{{job="{JOB}"}}', 1)
            prometheus.wait_for('sum(grpc_server_handled_total{grpc_method="Evaluate"})', WARM_UP)
            # One tiny training job, created once Prometheus holds a sample
            # from before it, so increase() over the final states sees it.
            job = client.create_job("cnn", "digits", epochs=1, steps_per_epoch=2, batch_size=32,
                                    display_name="deploy test")
            send(client, 1)
            finished = client.wait(job, progress=False, timeout=JOB_WAIT_S)
            assert finished.state == "succeeded", (finished.state, finished.error)
        prometheus.wait_for('sum(grpc_server_handled_total{grpc_method="Evaluate",grpc_code="OK"})', N + M)
        prometheus.wait_for(f'sum(lossd_training_job_duration_seconds_count{{job="{JOB}",state="succeeded"}})', 1)
        prometheus.wait_for(
            'sum(grpc_server_handled_total{grpc_method="Evaluate",grpc_code="INVALID_ARGUMENT"})', K)
        prometheus.wait_until(prometheus.rules_evaluated, "every alert rule evaluated")
        yield server, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()


# -- binding: what the deployment's environment makes lossd listen on ------------

def _grpc_serving(address: str, ca: Path) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:   # no token: health is open
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _metrics_get(server: Lossd, scheme: str = "https", password: str | None = None) -> tuple[int, bytes]:
    """(status, body) of GET /metrics; HTTPS trusts the test's CA, and the
    "prometheus" user sends ``password`` (the right one by default)."""
    request = urllib.request.Request(f"{scheme}://{server.other_address}:{server.metrics_port}/metrics")
    password = server.secrets.metrics_password if password is None else password
    if password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode())
    context = ssl.create_default_context(cafile=str(server.secrets.ca)) if scheme == "https" else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _metrics_body(server: Lossd) -> bytes:
    status, body = _metrics_get(server)
    assert status == 200, (status, body[:200])
    return body


def test_compose_environment_serves_grpc_and_metrics_over_tls(lossd_serve):
    server = lossd_serve
    # The server runs with what the container gets: the Dockerfile's ENV, then
    # compose's environment. Another container reaches it through another
    # address than 127.0.0.1; both listeners must answer there, over TLS.
    try:
        assert _grpc_serving(server.address, server.secrets.ca), server.address
    except Exception as error:   # noqa: BLE001 - the message says which listener refused
        pytest.fail(f"gRPC is not reachable over TLS on {server.address} with the deployment's environment: "
                    f"{error}")
    try:
        body = _metrics_body(server)
    except OSError as error:
        pytest.fail(f"metrics are not reachable over HTTPS on {server.other_address}:{server.metrics_port} "
                    f"with the deployment's environment: {error}")
    assert b"lossd_build_info" in body
    # The startup line names the listeners lossd opened.
    message = server.startup()["message"]
    assert f":{server.port} (gRPC)" in message, message
    assert f"https://{server.other_address}:{server.metrics_port}/metrics (basic auth)" in message, message


def test_the_metrics_port_refuses_plain_http_and_scrapes_without_the_password(lossd_serve):
    server = lossd_serve
    with pytest.raises((OSError, http.client.HTTPException)) as refused:
        _metrics_get(server, scheme="http")
    assert not isinstance(refused.value, urllib.error.HTTPError), refused.value   # no HTTP answer
    for password in ("", "wrong"):
        status, body = _metrics_get(server, password=password)
        assert status == 401 and b"lossd_" not in body, (password, status)


def test_compose_healthcheck_passes_as_typed(lossd_serve):
    """The healthcheck's command in the container's environment (LOSSD_TLS_CERT
    and LOSSD_TLS_KEY there are the server's; the health client must not
    mind), with only the port and the secrets' folder changed."""
    server = lossd_serve
    command = server.service["healthcheck"]["test"]
    assert command[0] == "CMD", command
    argv = [server.secrets.local(a) if a.startswith(SECRETS) else a for a in command[1:]]
    container_port = server.container_env["LOSSD_PORT"]
    assert argv.count(f"localhost:{container_port}") == 1, argv
    argv[argv.index(f"localhost:{container_port}")] = f"localhost:{server.port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}, **server.env}
    # In the container lossd listens on every interface, localhost included;
    # here it listens on 127.0.0.2, so a forwarder on 127.0.0.1 stands for that.
    with _Forwarder(server.other_address, server.port) as port:
        argv[argv.index(f"localhost:{server.port}")] = f"localhost:{port}"
        result = subprocess.run([find_tool("lossd"), *argv[1:]], env=env, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


class _Forwarder:
    """Forwards TCP connections from a free port on 127.0.0.1 to ``host:port``."""

    def __init__(self, host: str, port: int):
        import socketserver
        import threading

        target = (host, port)

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self):
                with socket.create_connection(target, timeout=30) as upstream:
                    def copy(source, sink):
                        try:
                            while data := source.recv(65536):
                                sink.sendall(data)
                        except OSError:
                            pass
                        finally:
                            with contextlib.suppress(OSError):
                                sink.shutdown(socket.SHUT_WR)

                    back = threading.Thread(target=copy, args=(upstream, self.request), daemon=True)
                    back.start()
                    copy(self.request, upstream)
                    back.join(30)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Pipe)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> int:
        return self.server.server_address[1]

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_dockerfile_env_alone_binds_all_interfaces():
    """`docker run` without compose: the image's ENV alone must bind both listeners widely."""
    from lossd_server.config import Settings

    env = {k: v for k, v in dockerfile_only_env().items() if k.startswith("LOSSD_")}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LOSSD_")}
    try:
        os.environ.update(env)
        settings = Settings()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)
    unspecified = {"0.0.0.0", "::", "[::]", ""}
    assert settings.host in unspecified, f"image binds gRPC on {settings.host} only"
    assert settings.metrics_host in unspecified, f"image binds metrics on {settings.metrics_host} only"
    for name in ("host", "metrics_host"):
        with socket.socket(socket.AF_INET6 if ":" in getattr(settings, name) else socket.AF_INET) as s:
            s.bind((getattr(settings, name).strip("[]"), 0))   # an address this host can listen on


# -- Prometheus on the deployment's configuration --------------------------------

def evaluate_selector(code: str | None = None) -> str:
    code_matcher = f',grpc_code="{code}"' if code else ""
    return f'{{job="{JOB}",grpc_type="unary",grpc_service="{SERVICE}",grpc_method="Evaluate"{code_matcher}}}'


def test_target_is_up(stack):
    _, prometheus = stack
    assert prometheus.deployed_target == f"lossd:{stack[0].container_env['LOSSD_METRICS_PORT']}"
    assert prometheus.value(f'up{{job="{JOB}"}}') == 1
    targets = [t for t in prometheus.api("/api/v1/targets")["activeTargets"] if t["labels"]["job"] == JOB]
    assert [t["health"] for t in targets] == ["up"], targets
    # Over HTTPS with the CA and basic auth, as the shipped prometheus.yml says.
    assert targets[0]["scrapeUrl"] == f"https://{stack[0].other_address}:{stack[0].metrics_port}/metrics", targets


def _rate_interval(prometheus) -> str:
    """Grafana's $__rate_interval for this data source: max(4 x scrape interval, step + scrape)."""
    interval = re.search(r"job_name:\s*lossd\b.*?scrape_interval:\s*(\d+)s", prometheus.config.read_text(), re.S)
    scrape = int(interval.group(1)) if interval else 15
    return f"{max(4 * scrape, 15 + scrape)}s"


def grafana_substitute(expr: str, rate_interval: str) -> str:
    """What Grafana sends: template variables replaced by the values it would use."""
    replacements = {
        "$__rate_interval": rate_interval, "${__rate_interval}": rate_interval,
        "$__interval": "15s", "${__interval}": "15s", "$__range": "1h", "${__range}": "1h",
        "$instance": ".*", "${instance}": ".*",   # the variable's "All" value
    }
    for variable, value in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a template variable is left in {expr!r}"
    return expr


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_dashboard_and_alert_expression_runs(stack, dashboard):
    _, prometheus = stack
    rate_interval = _rate_interval(prometheus)
    exprs = [(where, grafana_substitute(e, rate_interval)) for where, e in dashboard_exprs(dashboard)]
    exprs += [("alerts.yml", e) for e in yaml_scalars(ALERTS.read_text(), "expr")]
    assert len(exprs) > 20
    errors = []
    for where, expr in exprs:
        try:
            prometheus.query(expr)
        except AssertionError as error:
            errors.append(f"{where}: {error}")
    assert not errors, "\n".join(errors)
    # Prometheus loaded and evaluated every alert rule without error.
    rules = {r["name"]: r for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]}
    assert set(rules) == set(yaml_scalars(ALERTS.read_text(), "alert"))
    assert {name: (r["health"], r.get("lastError")) for name, r in rules.items() if r["health"] != "ok"} == {}
    # lossd is scraped, so LossdDown is not pending or firing.
    assert rules["LossdDown"]["state"] == "inactive", rules["LossdDown"]


def _panel(dashboard: dict, title: str) -> list[str]:
    found = [e for where, e in dashboard_exprs(dashboard) if where == f"panel {title!r}"]
    assert found, f"no dashboard panel titled {title!r}"
    return found


def test_core_panels_return_data(stack, dashboard):
    _, prometheus = stack
    rate_interval = _rate_interval(prometheus)

    def run(title: str) -> list[list[tuple[dict, float]]]:
        return [prometheus.query(grafana_substitute(e, rate_interval)) for e in _panel(dashboard, title)]

    [up] = run("Up")
    assert [v for _, v in up] == [1]
    [ratio] = run("Error ratio")
    assert len(ratio) == 1 and 0 < ratio[0][1] < 1, ratio
    [per_loss] = run("Evaluations per second by loss")
    rates = {labels["loss"]: v for labels, v in per_loss}
    assert rates.get("mean_squared_error", 0) > 0 and rates.get("huber", 0) > 0, rates
    for quantile in run("Evaluation latency p50 / p99 by loss"):
        latency = {labels["loss"]: v for labels, v in quantile}
        for loss in ("mean_squared_error", "huber"):
            assert math.isfinite(latency.get(loss, math.nan)) and 0 < latency[loss] < 5, latency
    [failed] = run("Failed evaluations by loss and outcome")
    assert any(labels.get("outcome") == "invalid_argument" and v > 0 for labels, v in failed), failed
    [codes] = run("Errors by status code")
    # The bad evaluations; a watch stream the client closes may add CANCELLED.
    assert "INVALID_ARGUMENT" in {labels["grpc_code"] for labels, v in codes if v > 0}, codes
    assert {labels["grpc_code"] for labels, v in codes if v > 0} <= {"INVALID_ARGUMENT", "CANCELLED"}, codes
    [latency] = run("Unary RPC latency p99 by method")
    assert any(labels.get("grpc_method") == "Evaluate" and math.isfinite(v) for labels, v in latency), latency
    [jobs] = run("Jobs by state")
    states = {labels["state"]: v for labels, v in jobs}
    assert {"queued", "running", "succeeded", "failed"} <= set(states), states
    assert states["succeeded"] == 1, states
    [finished] = run("Finished jobs per hour by final state")
    assert {labels["state"] for labels, v in finished if v > 0} == {"succeeded"}, finished
    [train_loss] = run("Training loss")
    assert train_loss and all(math.isfinite(v) for _, v in train_loss), train_loss


def test_handled_total_counts_every_status(stack):
    _, prometheus = stack
    assert prometheus.value(f"grpc_server_handled_total{evaluate_selector('OK')}") == N + M
    assert prometheus.value(f"grpc_server_handled_total{evaluate_selector('INVALID_ARGUMENT')}") == K
    codes = {labels["grpc_code"]: value
             for labels, value in prometheus.query(f"grpc_server_handled_total{evaluate_selector()}")}
    assert codes == {"OK": N + M, "INVALID_ARGUMENT": K}
    # Failures are started, timed and leave the in-flight gauge too.
    assert prometheus.value(f"grpc_server_started_total{evaluate_selector()}") == N + M + K
    assert prometheus.value(f"grpc_server_handling_seconds_count{evaluate_selector()}") == N + M + K
    assert prometheus.value(
        f'lossd_grpc_in_flight_requests{{grpc_service="{SERVICE}",grpc_method="Evaluate"}}') == 0
    # Every request message is received; only successful calls send a response.
    assert prometheus.value(f"grpc_server_msg_received_total{evaluate_selector()}") == N + M + K
    assert prometheus.value(f"grpc_server_msg_sent_total{evaluate_selector()}") == N + M


def test_evaluations_by_loss_and_outcome(stack):
    _, prometheus = stack
    result = prometheus.query("sum by (loss, outcome) (lossd_loss_evaluations_total)")
    got = {(labels["loss"], labels["outcome"]): value for labels, value in result}
    # Known label values are pre-initialised, so the zero series are there too.
    assert ("huber", "error") in got and ("other", "ok") in got
    nonzero = {key: value for key, value in got.items() if value != 0}
    assert nonzero == EXPECTED_EVALUATIONS
    # The latency histogram counts the same calls, failures included.
    counts = {labels["loss"]: value for labels, value in prometheus.query(
        "sum by (loss) (lossd_loss_evaluation_duration_seconds_count)")}
    assert counts == {"mean_squared_error": N + sum(BAD_SHAPE_MSE), "huber": M, "other": sum(UNKNOWN)}


def test_loss_label_values_are_bounded(stack):
    server, prometheus = stack
    values = set(prometheus.api("/api/v1/label/loss/values"))
    with team_client(server) as client:
        registered = {info.name for info in client.losses()}
    # The non-loss values: "composite", "expression" (inline) and "other"
    # (lossd_server/observability/metrics.py).
    allowed = registered | {"other", "composite", "expression"}
    assert values <= allowed, sorted(values - allowed)
    assert {"mean_squared_error", "huber", "other"} <= values
    assert UNKNOWN_LOSS not in values and "mse" not in values


def test_rate_sees_the_traffic(stack):
    _, prometheus = stack
    ok = prometheus.value(f"rate(grpc_server_handled_total{evaluate_selector('OK')}[{WINDOW}])")
    assert ok is not None and ok > 0
    total = prometheus.value(f"sum(rate(grpc_server_handled_total{evaluate_selector()}[{WINDOW}]))")
    assert total is not None and total >= ok


def test_build_and_device_info(stack):
    import lossd_server

    server, prometheus = stack
    build = prometheus.query(f'lossd_build_info{{job="{JOB}"}}')
    assert len(build) == 1, build
    labels, value = build[0]
    assert value == 1 and labels["version"] == lossd_server.__version__
    devices = prometheus.query(f'lossd_device_info{{job="{JOB}"}}')
    assert len(devices) == 1 and devices[0][1] == 1, devices
    assert devices[0][0]["device_type"] in ("CPU", "GPU"), devices


def test_promtool_accepts_the_live_exposition(stack):
    promtool = require("promtool", "Debian/Ubuntu: apt-get install prometheus")
    server, _ = stack
    body = _metrics_body(server)
    assert b"lossd_loss_evaluations_total" in body
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_the_deployment_refuses_plain_text_and_callers_without_a_token(stack):
    """After the checks on Prometheus: the refused calls are counted too."""
    import lossd

    server, _ = stack
    y = np.ones((2, 3), dtype=np.float32)
    with lossd.Client(server.address, timeout=10) as plain, pytest.raises(lossd.LossdError) as refused:
        plain.evaluate("mse", y, y)
    assert refused.value.code.name == "UNAVAILABLE", refused.value
    for token in (None, "lsd_000000000000_not-a-token"):
        with lossd.Client(server.address, timeout=10, tls=lossd.TLS(ca=server.secrets.ca),
                          token=token) as anonymous, pytest.raises(lossd.LossdError) as refused:
            anonymous.evaluate("mse", y, y)
        assert refused.value.code.name == "UNAUTHENTICATED", (token, refused.value)
    with team_client(server) as client:
        assert client.evaluate("mse", y, y).loss == 0.0


def test_lossd_stops_cleanly_on_sigterm(stack):
    """Last: on the SIGTERM `docker stop` sends, the server drains (LOSSD_DRAIN_SECONDS,
    then LOSSD_GRACE_SECONDS) and exits 0 within compose's stop_grace_period."""
    server, _ = stack
    status, seconds = server.stop()
    assert status == 0, (status, server.log())
    assert seconds < server.stop_grace_seconds(), (seconds, server.stop_grace_seconds())
