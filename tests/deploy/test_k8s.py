"""deploy/k8s (issue 15): both overlays rendered with `kubectl kustomize`
after deploy/k8s/README.md's secrets block ran, validated offline with
`kubernetes-validate --strict`, and checked from the rendered objects: the
probes, the security context, limits, the GPU request, the Services, the
autoscaler, the budget and the network policies. The evaluator container's
environment is loaded into the server's settings and started as a real
server: its health port answers the probes' question, and the
ServiceMonitor's credentials scrape its metrics.

No cluster is needed. kubectl is not in Debian's archive at a version whose
kustomize reads these files (bookworm's kubernetes-client is 1.20), so the
tests fail with one line when it is missing; `make test` says the same.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter

from tests.servers import PATIENCE, free_port
from test_deploy import DEPLOY, DOCKERFILE, ROOT, require
from test_readme_deploy import shell

K8S = DEPLOY / "k8s"
K8S_README = K8S / "README.md"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes these manifests support (gRPC probes are GA from
# 1.27; 1.30 is the oldest schema set kept here) and the newest
# kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Kinds without a schema in kubernetes-validate: custom resources.
CUSTOM_KINDS = {"ServiceMonitor"}
SECRETS_MOUNT = "/run/secrets"
# What names a host only the cluster resolves (lossd-postgres): servers the
# tests start from a container's environment keep their embedded store.
CLUSTER_ONLY = {"LOSSD_DATABASE_URL"}


def kubectl() -> str:
    return require("kubectl", "kubectl 1.21 or newer, whose `kubectl kustomize` renders deploy/k8s: "
                   "https://kubernetes.io/docs/tasks/tools/")


def validator() -> str:
    return require("kubernetes-validate", 'pip install -e ".[test]"')


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder laid out like the repository with deploy/k8s copied in, after
    deploy/k8s/README.md's secrets block ran there as written."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(K8S, root / "deploy" / "k8s", ignore=shutil.ignore_patterns("secrets"))
    (root / "deploy" / "k8s" / "secrets").mkdir()
    shutil.copy(K8S / "secrets" / "kustomization.yaml", root / "deploy" / "k8s" / "secrets")
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", K8S_README.read_text(), flags=re.S)
              if "lossd secrets init" in b]
    assert len(blocks) == 1, "deploy/k8s/README.md needs one ```sh block with `lossd secrets init`"
    result = shell(blocks[0], root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def render(folder: Path) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered(checkout) -> dict[str, str]:
    """Overlay -> the YAML `kubectl kustomize` renders."""
    return {overlay: render(checkout / "deploy" / "k8s" / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def objects(rendered) -> dict[str, list[dict]]:
    return {overlay: [o for o in yaml.safe_load_all(text) if o] for overlay, text in rendered.items()}


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")}


def lossd_containers(objs: list[dict]) -> dict[str, dict]:
    """Workload name -> its lossd container (the image deploy/Dockerfile builds)."""
    found = {}
    for name, template in pod_templates(objs).items():
        for container in template["spec"]["containers"]:
            if container["image"].split("/")[-1].startswith("lossd"):
                found[name] = container
    assert set(found) == {"lossd-evaluator", "lossd-training"}, found
    return found


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_data(objs: list[dict], name: str) -> dict[str, bytes]:
    secret = one(objs, "Secret", name)
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def env_values(objs: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as the pod sees it, secretKeyRefs resolved."""
    values = {}
    for name, entry in env_of(container).items():
        if "value" in entry:
            values[name] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            values[name] = secret_data(objs, ref["name"])[ref["key"]].decode()
    return values


def mounted_files(objs: list[dict], template: dict, container: dict) -> dict[str, bytes]:
    """Path in the container -> contents, for every file a Secret volume puts there."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})   # a StatefulSet's claim templates are not here
        sources = ([s["secret"] for s in volume["projected"]["sources"]] if "projected" in volume
                   else [{"name": volume["secret"]["secretName"], **volume["secret"]}] if "secret" in volume else [])
        for source in sources:
            data = secret_data(objs, source["name"])
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                files[f"{mount['mountPath']}/{item['path']}"] = data[item["key"]]
    return files


def quantity(text) -> float:
    """A Kubernetes quantity as a number (cores, bytes)."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor
    return float(text)


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- rendering and schemas ---------------------------------------------------

def validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run([validator(), "--strict", "-k", version, str(path)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_passes_strict_schema_validation(rendered, tmp_path, overlay, version):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered[overlay])
    result = validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr
    output = (result.stdout + result.stderr).splitlines()
    unchecked = [line for line in output if line.startswith("WARN")]
    # Only custom resources go without a schema; everything else was checked.
    assert all(any(f"kind {kind} " in line for kind in CUSTOM_KINDS) for line in unchecked), unchecked
    passed = [line for line in output if " passed for resource " in line]
    schema_kinds = [o for o in yaml.safe_load_all(rendered[overlay]) if o and o["kind"] not in CUSTOM_KINDS]
    assert len(passed) == len(schema_kinds), output


def test_strict_validation_refuses_a_field_kubernetes_does_not_have(objects, tmp_path):
    deployment = one(objects["cpu"], "Deployment", "lossd-evaluator")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}   # misspelt
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = validate(path, KUBERNETES_VERSIONS[0])
    assert result.returncode != 0 and "readinessProbes" in result.stdout + result.stderr, result.stdout


def test_a_missing_secret_file_stops_the_render_with_its_name(checkout, tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(checkout / "deploy" / "k8s", copy)
    (copy / "secrets" / "database-url").unlink()
    result = subprocess.run([kubectl(), "kustomize", str(copy / "overlays" / "cpu")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "database-url" in result.stderr, result.stderr


def test_the_render_and_apply_block_runs_as_written_with_kubectl_alone(checkout, tmp_path):
    # deploy/k8s/README.md's block after the secrets: every line as written,
    # in a copy of the checkout, with only kubectl on PATH besides the
    # shell's tools; `kubectl apply` needs a cluster and is left out.
    root = tmp_path / "repo"
    shutil.copytree(checkout, root)
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", K8S_README.read_text(), flags=re.S)
              if "kubectl apply" in b]
    assert len(blocks) == 1, "deploy/k8s/README.md needs one ```sh block that applies an overlay"
    lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert not any(line.lstrip().startswith("kustomize ") or " kustomize edit" in line for line in lines), \
        "the block needs the standalone kustomize"
    script = "\n".join(line for line in lines if not line.startswith("kubectl apply"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").symlink_to(kubectl())
    result = subprocess.run(["/bin/sh", "-e", "-c", script], cwd=root, capture_output=True, text=True,
                            timeout=120, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    applied = [line.split()[-1] for line in lines if line.startswith("kubectl apply -k ")]
    assert applied, "the block applies an overlay"
    images = {c["image"] for o in yaml.safe_load_all(result.stdout) if o and o["kind"] == "Deployment"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/lossd:gpu"}, images
    # What it printed is what the applied overlay renders.
    assert render(root / applied[0]) == result.stdout


def test_the_deploy_page_sends_kubernetes_users_to_the_one_tested_sequence():
    page = (ROOT / "docs" / "deploy.md").read_text()
    section = page[page.index("## Kubernetes"):]
    assert "deploy/k8s/README.md" in section
    assert "secrets init" not in section and "kubectl apply" not in section, \
        "a second, untested sequence in docs/deploy.md"


# -- pods ----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_native_grpc_on_the_port_the_server_serves_health_on(objects, overlay):
    for name, container in lossd_containers(objects[overlay]).items():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        health = int(env_of(container)["LOSSD_HEALTH_PORT"]["value"])
        assert ports["health"] == health and ports["grpc"] == int(env_of(container)["LOSSD_PORT"]["value"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health, (name, probe)
            assert container[probe]["grpc"].get("service", "") == "", (name, probe)   # the server's overall health
        # The liveness probe outlasts the drain, so a draining pod is not restarted.
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > 5.0   # LOSSD_DRAIN_SECONDS' default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_as_non_root_read_only_without_capabilities_and_has_limits(objects, overlay):
    image_uid = int(re.search(r"^ARG LOSSD_UID=(\d+)$", DOCKERFILE.read_text(), re.M).group(1))
    templates = pod_templates(objects[overlay])
    assert set(templates) == {"lossd-evaluator", "lossd-training", "lossd-postgres"}
    for name, template in templates.items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # A Service named lossd would put LOSSD_PORT=tcp://... into the settings' environment.
        assert pod["enableServiceLinks"] is False, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = (name, container["name"])
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], where
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert 0 < quantity(requests[resource]) <= quantity(limits[resource]), (where, resource)
    assert templates["lossd-evaluator"]["spec"]["securityContext"]["runAsUser"] == image_uid
    assert templates["lossd-training"]["spec"]["securityContext"]["runAsUser"] == image_uid


def test_the_gpu_is_requested_in_the_gpu_overlay_only(objects):
    from lossd_server.config import Settings

    for overlay in OVERLAYS:
        for name, template in pod_templates(objects[overlay]).items():
            for container in template["spec"]["containers"]:
                resources = container["resources"]
                gpus = {kind: resources[kind].get("nvidia.com/gpu") for kind in ("requests", "limits")}
                lossd = name in ("lossd-evaluator", "lossd-training")
                if overlay == "gpu" and lossd:
                    assert gpus == {"requests": "1", "limits": "1"}, (overlay, name)
                    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                        template["spec"]["tolerations"]
                else:
                    assert gpus == {"requests": None, "limits": None}, (overlay, name)
                if lossd:   # the server refuses to start on a GPU node without a GPU, and vice versa
                    device = env_of(container)["LOSSD_DEVICE"]["value"]
                    assert Settings(device=device).device == overlay


# -- the environment is the server's settings -----------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_of_the_lossd_containers_is_a_setting_the_server_knows(objects, overlay):
    from lossd_server.config import Settings

    known = {f"LOSSD_{name.upper()}" for name in Settings.model_fields}
    for name, container in lossd_containers(objects[overlay]).items():
        values = env_values(objects[overlay], container)
        assert all(key.startswith("LOSSD_") for key in values), (name, sorted(values))
        unknown = set(values) - known
        assert not unknown, f"{name} sets variables the server does not know: {unknown}"
        settings = settings_from_env(values)
        for key, value in values.items():
            if key in known:   # each value reached its setting, as that setting's type reads it
                field = key[len("LOSSD_"):].lower()
                expected = TypeAdapter(Settings.model_fields[field].annotation).validate_python(value)
                assert getattr(settings, field) == expected, (name, key, value)


def settings_from_env(env: dict[str, str]):
    """Settings built from exactly ``env`` as the process environment, the way
    `lossd serve` in the pod reads it."""
    from lossd_server.config import Settings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LOSSD_")}
    try:
        os.environ.update(env)
        return Settings()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


@pytest.fixture(scope="module")
def evaluator_pod(objects, tmp_path_factory):
    """A real server started from the cpu overlay's evaluator container: its
    environment as the pod sees it, with the files its Secret volumes mount
    written under a temporary folder standing for /run/secrets, its data
    paths moved there too, and free loopback ports."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    objs = objects["cpu"]
    template = pod_templates(objs)["lossd-evaluator"]
    container = lossd_containers(objs)["lossd-evaluator"]
    root = tmp_path_factory.mktemp("pod")
    for path, content in mounted_files(objs, template, container).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    known = {f"LOSSD_{name.upper()}" for name in Settings.model_fields}
    env = {k: v for k, v in env_values(objs, container).items() if k in known and k not in CLUSTER_ONLY}
    for key, value in env.items():
        if value.startswith("/"):   # a path in the container
            env[key] = str(root / value.lstrip("/"))
    env.update(LOSSD_HOST="127.0.0.1", LOSSD_METRICS_HOST="127.0.0.1", LOSSD_PORT="0", LOSSD_HEALTH_PORT="0",
               LOSSD_METRICS_PORT="0", LOSSD_GRACE_SECONDS="0")
    server = create_server(settings_from_env(env), metrics_registry=CollectorRegistry())
    server.start()
    try:
        yield objs, server
    finally:
        server.stop(0)


def test_the_evaluator_pod_serves_health_in_plain_text_and_grpc_only_over_tls(evaluator_pod):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, server = evaluator_pod
    assert server.tls is not None and server.health_port not in (None, server.port)
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:   # what the kubelet does
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_evaluator_pod_runs_no_training_jobs(evaluator_pod):
    # Its queue is the shared database in the cluster (lossd-training runs
    # the jobs); here, on the embedded store, nothing would run one.
    from lossd_server.callers import ANONYMOUS
    from lossd_server.errors import FailedPrecondition

    _, server = evaluator_pod
    assert server.training.scheduler.slots == 0
    with pytest.raises(FailedPrecondition) as refused:
        server.training.create_job({"model": {"preset": "mlp"}, "dataset": "digits"}, caller=ANONYMOUS)
    assert refused.value.reason == "NO_JOB_SLOTS"


def test_the_service_monitor_credentials_scrape_the_evaluator_pod(evaluator_pod):
    objs, server = evaluator_pod
    monitor = one(objs, "ServiceMonitor", "lossd")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    tls, auth = endpoint["tlsConfig"], endpoint["basicAuth"]
    ca = secret_data(objs, tls["ca"]["secret"]["name"])[tls["ca"]["secret"]["key"]]
    user = secret_data(objs, auth["username"]["name"])[auth["username"]["key"]].decode()
    password = secret_data(objs, auth["password"]["name"])[auth["password"]["key"]].decode().strip()
    context = ssl.create_default_context(cadata=ca.decode())
    # Prometheus connects to the pod's IP and checks the certificate for serverName.
    context.check_hostname = False
    url = f"https://127.0.0.1:{server.metrics_port}{endpoint['path']}"
    request = urllib.request.Request(url, headers={
        "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert response.status == 200 and b"lossd_build_info" in response.read()
    names = certificate_names(Path(server.settings.tls_cert))
    assert tls["serverName"] in names, names
    # The ServiceMonitor's Secret has a fixed name (kustomize would not rewrite it there).
    assert not any(o["kind"] == "Secret" and o["metadata"]["name"].startswith(f"{auth['username']['name']}-")
                   for o in objs)


def certificate_names(path: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_path_the_settings_name_is_mounted_and_the_ca_key_is_in_no_secret(objects, checkout,
                                                                                        overlay):
    objs = objects[overlay]
    made = checkout / "deploy" / "k8s" / "secrets"
    for name, container in lossd_containers(objs).items():
        files = mounted_files(objs, pod_templates(objs)[name], container)
        paths = {k: v for k, v in env_values(objs, container).items() if v.startswith(SECRETS_MOUNT + "/")}
        assert {"LOSSD_TLS_CERT", "LOSSD_TLS_KEY", "LOSSD_TOKENS_FILE", "LOSSD_METRICS_BASIC_AUTH_FILE"} <= set(paths)
        for key, path in paths.items():
            assert files.get(path) == (made / Path(path).name).read_bytes(), (name, key, path)
    ca_key = (made / "ca.key").read_bytes()
    assert not any(ca_key in value for o in objs if o["kind"] == "Secret" for value in secret_data(
        objs, o["metadata"]["name"]).values())


# -- Services, scaling, budgets, policies --------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_they_name_on_their_grpc_port(objects, overlay):
    objs = objects[overlay]
    templates = pod_templates(objs)
    headless = one(objs, "Service", "lossd-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)   # DNS lists ready pods only
    cluster_ip = one(objs, "Service", "lossd")
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in cluster_ip["spec"]
    for service, workload in (("lossd-headless", "lossd-evaluator"), ("lossd", "lossd-evaluator"),
                              ("lossd-training", "lossd-training"), ("lossd-postgres", "lossd-postgres")):
        spec = one(objs, "Service", service)["spec"]
        selected = [w for w, t in templates.items() if matches(spec["selector"], t["metadata"]["labels"])]
        assert selected == [workload], (service, selected)
        container_ports = {p["name"]: p["containerPort"]
                           for c in templates[workload]["spec"]["containers"] for p in c["ports"]}
        for port in spec["ports"]:
            assert port["targetPort"] in container_ports, (service, port)
    grpc_port = {p["name"]: p for p in headless["spec"]["ports"]}["grpc"]
    assert grpc_port["port"] == 50051 and grpc_port["appProtocol"] == "grpc"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_owns_the_evaluators_and_the_training_pod_is_one_recreated_replica(objects, overlay):
    objs = objects[overlay]
    hpa = one(objs, "HorizontalPodAutoscaler", "lossd-evaluator")
    target = hpa["spec"]["scaleTargetRef"]
    evaluator = one(objs, target["kind"], target["name"])
    assert target["apiVersion"] == evaluator["apiVersion"] and target["name"] == "lossd-evaluator"
    assert "replicas" not in evaluator["spec"]   # kubectl apply must not reset the autoscaler's count
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilisation is relative to the CPU request, which every evaluator container has (checked above).
    training = one(objs, "Deployment", "lossd-training")
    assert training["spec"]["replicas"] == 1 and training["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_disruption_budget_keeps_evaluators_serving(objects, overlay):
    objs = objects[overlay]
    pdb = one(objs, "PodDisruptionBudget", "lossd-evaluator")
    labels = pod_templates(objs)["lossd-evaluator"]["metadata"]["labels"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = one(objs, "HorizontalPodAutoscaler", "lossd-evaluator")
    assert 1 <= pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_grpc_and_health_to_all_metrics_to_prometheus_and_postgres_to_lossd(objects,
                                                                                                 overlay):
    objs = objects[overlay]
    templates = pod_templates(objs)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for template_name, template in templates.items():
        labels = template["metadata"]["labels"]
        applying = [p for p in policies if matches(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert len(applying) == 1, (template_name, [p["metadata"]["name"] for p in applying])
        policy = applying[0]["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        open_to = {}
        for rule in policy["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in named, (template_name, port)
                open_to[port["port"]] = rule.get("from")
        if template_name == "lossd-postgres":
            assert open_to == {"postgres": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "lossd"}}}]}
            assert all(matches({"app.kubernetes.io/name": "lossd"}, templates[w]["metadata"]["labels"])
                       for w in ("lossd-evaluator", "lossd-training"))
        else:
            assert open_to["grpc"] is None and open_to["health"] is None   # clients anywhere; the kubelet
            assert open_to["metrics"] == [{"namespaceSelector": {}, "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


# -- state and the database -------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_training_data_directory_is_the_shared_claim_and_evaluators_keep_out_of_it(objects, overlay):
    objs = objects[overlay]
    claim = one(objs, "PersistentVolumeClaim", "lossd-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, container in lossd_containers(objs).items():
        volumes = {v["name"]: v for v in pod_templates(objs)[name]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        env = env_values(objs, container)

        def volume_of(path: str) -> dict:
            owner = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
            return mounts[owner]

        assert volume_of(env["LOSSD_ARTIFACTS_DIR"]).get("persistentVolumeClaim", {}).get("claimName") == "lossd-data"
        data = volume_of(env["LOSSD_DATA_DIR"])
        if name == "lossd-training":
            assert data.get("persistentVolumeClaim", {}).get("claimName") == "lossd-data"
        else:   # never the training pod's SQLite: a scratch folder of its own
            assert "emptyDir" in data, data
        assert "emptyDir" in volume_of("/tmp")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_database_url_reaches_the_in_cluster_postgres_with_its_password(objects, overlay):
    objs = objects[overlay]
    url = urllib.parse.urlsplit(env_values(objs, lossd_containers(objs)["lossd-training"])["LOSSD_DATABASE_URL"])
    assert url.scheme == "postgresql"
    service = one(objs, "Service", url.hostname)
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    statefulset = one(objs, "StatefulSet", "lossd-postgres")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    template = statefulset["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    password = mounted_files(objs, template, container)[env["POSTGRES_PASSWORD_FILE"]].decode()
    assert urllib.parse.unquote(url.password) == password.strip() and url.username == env["POSTGRES_USER"]
    assert url.path == "/" + env["POSTGRES_DB"]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_prometheus_annotations_name_the_metrics_port(objects):
    for overlay in OVERLAYS:
        for name, container in lossd_containers(objects[overlay]).items():
            annotations = pod_templates(objects[overlay])[name]["metadata"]["annotations"]
            env = env_of(container)
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/scheme"] == "https" and "LOSSD_METRICS_TLS_CERT" in env
            assert int(annotations["prometheus.io/port"]) == int(env["LOSSD_METRICS_PORT"]["value"])


# -- a read-only root file system ----------------------------------------------

# Runs a command with every mount read-only but two: FOLDER bound at /srv
# (standing for the pod's volumes) and FOLDER/tmp at /tmp, as the pod's
# emptyDir. A user and mount namespace of its own (unshare), so it needs no
# root and nothing outside sees the mounts; flags a user namespace may not
# clear (nosuid, nodev, noexec) are kept.
READ_ONLY_ROOT = r'''
set -e
mount --bind "$1" /srv
# The pod's /tmp hides the host's, where this checkout and its virtual
# environment may live (CI clones under /tmp): those stay at their paths.
mkdir -p /srv/.host-tmp
mount --bind /tmp /srv/.host-tmp
mount --bind /srv/tmp /tmp
for keep in $KEEP_UNDER_TMP; do
  mkdir -p "$keep"
  mount --bind "/srv/.host-tmp/${keep#/tmp/}" "$keep"
done
shift
awk '{print $5, $6}' /proc/self/mountinfo | while read -r point options; do
  case "$point" in /proc*|/sys*|/dev*|/srv|/srv/*|/tmp) continue;; esac
  flags=ro
  for f in nosuid nodev noexec; do case ",$options," in *",$f,"*) flags="$flags,$f";; esac; done
  mount -o "remount,bind,$flags" "$point"
done
exec "$@"
'''


def _under_tmp(path: str) -> str:
    """The folder right below /tmp that holds ``path`` (a checkout, a
    virtual environment), or "" when it is not under /tmp."""
    parts = Path(os.path.realpath(path)).parts
    return str(Path(*parts[:3])) if len(parts) >= 3 and parts[:2] == ("/", "tmp") else ""


@pytest.mark.slow
def test_the_training_pod_serves_evaluates_and_trains_on_a_read_only_root(objects, tmp_path, create_token):
    """`lossd serve` with the training container's environment (warm-up on,
    as in the pod), every path moved under /srv, and only /srv and /tmp
    writable: it turns SERVING, evaluates (XLA included), registers a loss,
    runs a training job to the end, and stops cleanly on SIGTERM."""
    import signal
    import time

    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import lossd

    objs = objects["cpu"]
    template = pod_templates(objs)["lossd-training"]
    container = lossd_containers(objs)["lossd-training"]
    pod = tmp_path / "pod"
    (pod / "tmp").mkdir(parents=True)
    for path, content in mounted_files(objs, template, container).items():
        target = pod / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    for mount in container["volumeMounts"]:
        (pod / mount["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    token = create_token(pod / "run" / "secrets" / "tokens.jsonl", "ops", "evaluate,train,admin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    for key, value in env_values(objs, container).items():
        if key in CLUSTER_ONLY:
            continue
        env[key] = "/srv" + value if value.startswith("/") and not value.startswith("/tmp") else value
    ports = {"LOSSD_PORT": free_port(), "LOSSD_HEALTH_PORT": free_port(), "LOSSD_METRICS_PORT": free_port()}
    env.update({k: str(v) for k, v in ports.items()}, LOSSD_HOST="127.0.0.1", LOSSD_METRICS_HOST="127.0.0.1",
               LOSSD_DRAIN_SECONDS="0", LOSSD_GRACE_SECONDS="0", PYTHONPATH=os.pathsep.join(sys.path),
               KEEP_UNDER_TMP=" ".join(sorted({_under_tmp(p) for p in (sys.prefix, sys.executable, *sys.path)} - {""})))
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--mount",
                                 "sh", "-c", READ_ONLY_ROOT, "sh", str(pod), sys.executable, "-m", "lossd.cli",
                                 "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + PATIENCE
        with grpc.insecure_channel(f"127.0.0.1:{ports['LOSSD_HEALTH_PORT']}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        tls = lossd.TLS(ca=str(pod / "run" / "secrets" / "ca.pem"))
        # "localhost" is one of the certificate's names.
        with lossd.Client(f"localhost:{ports['LOSSD_PORT']}", tls=tls, token=token, timeout=PATIENCE) as client:
            y = np.linspace(0, 1, 1 << 20, dtype=np.float32).reshape(-1, 1)   # Huber runs under XLA from 1M
            assert np.isfinite(client.evaluate("huber", y, y + 1, gradient=True).loss)
            client.register_loss("twice_mse", "2 * mean(square(y_true - y_pred), axis=-1)")
            assert client.evaluate("twice_mse", y[:8], y[:8] + 1).loss == pytest.approx(2.0)
            job = client.create_job("cnn", "digits", epochs=1, steps_per_epoch=3, batch_size=16)
            done = client.wait(job, progress=False, timeout=PATIENCE)
            assert done.state == "succeeded", done
        assert any((pod / "data").rglob("*.keras")), "the job wrote no model on the data volume"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "Read-only file system" not in text, text
    assert f"health on 127.0.0.1:{ports['LOSSD_HEALTH_PORT']} (plain text)" in text, text
