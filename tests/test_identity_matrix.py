"""Who may call what: every RPC of every service, called with every identity (issue 11, finding 1).

One suite runs with mutual TLS (certificates from `latentwire certs`) and a tokens file (the
orchestrator and the classifier check tokens). Each service is asked by reflection which gRPC
services it serves and every method of their descriptors is called with an empty request, so a
new RPC is covered without touching this file. An allowed identity may get INVALID_ARGUMENT or
NOT_FOUND (the request is empty), never PERMISSION_DENIED or UNAUTHENTICATED; a refused one gets
PERMISSION_DENIED with reason IDENTITY_NOT_ALLOWED. EXPECTED is written out here on purpose,
apart from security.ALLOWED_KINDS, so a change to the code's table shows up as a failure.
Job ownership (another principal's jobs) is tests/test_job_ownership.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from latentwire.cli.certs import make_leaf, write_certificates
from latentwire.client.channels import open_channel
from latentwire.client.security import CertificateDir, ChannelSecurity
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from services.runtime import security
from services.suite.launcher import start_suite

SERVICES = ("orchestrator", "text_encoder", "denoiser", "vae", "controlnet", "classifier", "registry")
#: Services started with the tokens file (the ones users reach).
TOKEN_GUARDED = ("orchestrator", "classifier")
TOKENS = {"generate": "tok-generate-7f3a", "classify": "tok-classify-91bc", "admin": "tok-admin-55e0"}
TOKEN_LINES = (f"{TOKENS['generate']} generate principal=alice\n"
               f"{TOKENS['classify']} classify\n"
               f"{TOKENS['admin']} admin principal=ops@example.org\n")

USER, OPERATOR, SERVICE, ORCHESTRATOR = "user", "operator", "service", "orchestrator"
#: The certificate each identity kind is tested with.
CERTIFICATES = {USER: "client", SERVICE: "vae", ORCHESTRATOR: "orchestrator", OPERATOR: "operator"}

# Who may call what, as docs/operations.md states it.
_CLIENT_API = {USER, OPERATOR}
_STAGE = {ORCHESTRATOR, OPERATOR}
_INTERNAL = {SERVICE, ORCHESTRATOR, OPERATOR}
REGISTRY = "latentwire.registry.v1.RegistryService"
REGISTRY_READS = {"GetModel", "ListModels", "GetModelVersion", "ListModelVersions", "ResolveModel", "QueryBlob",
                  "ReadBlob"}
EXPECTED = {
    "latentwire.orchestrator.v1.OrchestratorService": _CLIENT_API,
    "latentwire.classifier.v1.ClassifierService": _CLIENT_API | {ORCHESTRATOR},
    "inference.GRPCInferenceService": _CLIENT_API | {ORCHESTRATOR},
    "latentwire.text_encoder.v1.TextEncoderService": _STAGE,
    "latentwire.denoiser.v1.DenoiserService": _STAGE,
    "latentwire.vae.v1.VaeService": _STAGE,
    "latentwire.controlnet.v1.ControlNetService": _STAGE | {SERVICE},
    "latentwire.common.v1.ModelLoaderService": _INTERNAL,
    "latentwire.common.v1.StatusService": _INTERNAL,
}
#: Methods with their own row, as docs/operations.md states it: loading and unloading classifier models is an
#: operator's call (the orchestrator forwards it), with the admin scope.
EXPECTED_METHODS = {
    "/inference.GRPCInferenceService/RepositoryModelLoad": {OPERATOR, ORCHESTRATOR},
    "/inference.GRPCInferenceService/RepositoryModelUnload": {OPERATOR, ORCHESTRATOR},
}
SCOPE_OF_METHOD = {path: "admin" for path in EXPECTED_METHODS}
SCOPE_OF = {"latentwire.orchestrator.v1.OrchestratorService": "generate",
            "latentwire.classifier.v1.ClassifierService": "classify", "inference.GRPCInferenceService": "classify"}
#: Open to everyone (not called through the matrix: health is checked per identity below).
OPEN = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
#: Requests that would start real work when empty get a value that fails validation after authorization.
REQUESTS = {"/latentwire.orchestrator.v1.OrchestratorService/Generate": {"num_inference_steps": -1}}
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def expected_kinds(method: str) -> set[str]:
    service, _, name = method.lstrip("/").partition("/")
    if "/" + method.lstrip("/") in EXPECTED_METHODS:
        return EXPECTED_METHODS["/" + method.lstrip("/")]
    if service == REGISTRY:
        return _INTERNAL if name in REGISTRY_READS else {OPERATOR}  # anything else in the registry writes
    return EXPECTED.get(service, set())


def defined_method_paths() -> list[str]:
    """Every RPC the contracts define, as /package.Service/Method, read from proto/.

    Not from the generated modules: tritonclient, which other tests load into this process, defines the same
    ``inference`` symbols in protobuf's default pool, so importing our KServe module after it fails.
    """
    paths = []
    for proto in sorted((Path(__file__).resolve().parent.parent / "proto").rglob("*.proto")):
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        package = re.search(r"\bpackage\s+([\w.]+)\s*;", text).group(1)
        for service, body in re.findall(r"\bservice\s+(\w+)\s*\{(.*?)\n\}", text, re.S):
            paths += [f"/{package}.{service}/{name}" for name in re.findall(r"\brpc\s+(\w+)\s*\(", body)]
    return sorted(paths)


def _methods(address: str, channel_security: ChannelSecurity) -> list:
    """The method descriptors of every service the server at ``address`` lists by reflection (open to all),
    described by the server's own descriptors in a pool of their own."""
    with open_channel(address, security=channel_security) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        names = [name for name in database.get_services() if name not in OPEN]
        methods = [method for name in names for method in pool.FindServiceByName(name).methods]
        for method in methods:  # load every message type while the channel is open
            message_factory.GetMessageClass(method.input_type)
            message_factory.GetMessageClass(method.output_type)
        return methods


def _path(method) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _call(channel: grpc.Channel, method, token: str | None) -> grpc.RpcError | None:
    """Call ``method`` with an empty (or REQUESTS) request; None when it answered OK, else the error."""
    request = message_factory.GetMessageClass(method.input_type)(**REQUESTS.get(_path(method), {}))
    response_class = message_factory.GetMessageClass(method.output_type)
    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
    callable_ = getattr(channel, kind)(_path(method), request_serializer=type(request).SerializeToString,
                                       response_deserializer=response_class.FromString)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    argument = iter([request]) if method.client_streaming else request
    try:
        result = callable_(argument, timeout=30, metadata=metadata)
        if method.server_streaming:
            list(result)
    except grpc.RpcError as error:
        return error
    return None


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def _outcome(error: grpc.RpcError | None) -> str:
    """"allowed", or the refusal as CODE/REASON."""
    if error is None or error.code() not in REFUSED | {grpc.StatusCode.UNAVAILABLE}:
        return "allowed"
    return f"{error.code().name}/{_reason(error)}" if error.code() in REFUSED else error.code().name


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificateDir:
    return CertificateDir(write_certificates(tmp_path_factory.mktemp("certs")))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> CertificateDir:
    """Certificates of another CA, with the same names."""
    return CertificateDir(write_certificates(tmp_path_factory.mktemp("other-ca"), names=["client", "operator"]))


@pytest.fixture(scope="module")
def matrix_suite(tiny_model, tiny_controlnets, tiny_classifier, certs, tmp_path_factory):
    root = tmp_path_factory.mktemp("identity-matrix")
    tokens = root / "tokens.txt"
    tokens.write_text(TOKEN_LINES)
    running = start_suite(
        tiny_model, ports=dict.fromkeys(SERVICES, 0), log_dir=root / "logs", registry_dir=root / "registry",
        cache_root=root / "cache", controlnet=tiny_controlnets[0], classifier=tiny_classifier, tls_dir=certs.path,
        auth_tokens_file=tokens,
    )
    yield running
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {root / 'logs'}"


@pytest.fixture(scope="module")
def methods(matrix_suite, certs) -> dict[str, list]:
    found = {name: _methods(matrix_suite.services[name].address, certs.operator()) for name in SERVICES}
    # The matrix would prove nothing if reflection listed nothing: every service has its own API, status and
    # (model services) the loader.
    assert all(len(listed) >= 2 for listed in found.values()), {n: [m.name for m in ms] for n, ms in found.items()}
    return found


def _matrix(suite, methods, channel_security: ChannelSecurity, token_of) -> dict[str, str]:
    """Every RPC of every service called with one client certificate; ``token_of(service, method)`` the token."""
    outcomes = {}
    for name in SERVICES:
        with open_channel(suite.services[name].address, security=channel_security) as channel:
            for method in methods[name]:
                outcomes[f"{name} {_path(method)}"] = _outcome(_call(channel, method, token_of(name, method)))
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("kind", [USER, SERVICE, ORCHESTRATOR, OPERATOR])
def test_every_rpc_allows_exactly_its_identity_kinds(matrix_suite, methods, certs, kind):
    def token_of(name, method):
        # People need a token on the token-guarded services (admin: the token is not what is tested here);
        # services and the orchestrator send none.
        return TOKENS["admin"] if name in TOKEN_GUARDED and kind in (USER, OPERATOR) else None

    outcomes = _matrix(matrix_suite, methods, certs.client(CERTIFICATES[kind]), token_of)
    expected = {key: "allowed" if kind in expected_kinds(key.split()[1]) else "PERMISSION_DENIED/IDENTITY_NOT_ALLOWED"
                for key in outcomes}
    wrong = {key: f"got {got}, expected {expected[key]}" for key, got in outcomes.items() if got != expected[key]}
    assert not wrong, f"{kind} certificate: " + "\n".join(f"{k}: {v}" for k, v in sorted(wrong.items()))


@pytest.mark.slow
def test_user_certificate_reaches_only_client_facing_services(matrix_suite, methods, certs):
    # Finding 1: the "client" certificate every user holds was accepted by every stage and by the registry.
    for name in ("text_encoder", "denoiser", "vae", "controlnet", "registry"):
        with open_channel(matrix_suite.services[name].address, security=certs.client()) as channel:
            for method in methods[name]:
                assert _outcome(_call(channel, method, None)) == "PERMISSION_DENIED/IDENTITY_NOT_ALLOWED", \
                    f"{name} {_path(method)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVICES)
def test_a_certificate_of_another_ca_fails_the_handshake(matrix_suite, methods, certs, other_ca, name):
    foreign = ChannelSecurity.from_files(ca=certs.ca(), cert=other_ca.cert("operator"), key=other_ca.key("operator"))
    with open_channel(matrix_suite.services[name].address, security=foreign) as channel:
        codes = {_path(method): _call(channel, method, TOKENS["admin"]).code() for method in methods[name]}
    assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, codes


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "not-a-token", *TOKENS])
def test_tokens_on_the_token_guarded_services(matrix_suite, methods, certs, token):
    """The operator certificate may call every RPC, so what is refused here is the token's doing."""
    value = TOKENS.get(token, token)
    outcomes = {}
    for name in TOKEN_GUARDED:
        with open_channel(matrix_suite.services[name].address, security=certs.operator()) as channel:
            for method in methods[name]:
                outcomes[f"{name} {_path(method)}"] = _outcome(_call(channel, method, value))

    def expected(key: str) -> str:
        if token is None:
            return "UNAUTHENTICATED/MISSING_TOKEN"
        if token not in TOKENS:
            return "UNAUTHENTICATED/INVALID_TOKEN"
        path = key.split()[1]
        service = path.lstrip("/").partition("/")[0]
        needed = SCOPE_OF_METHOD.get(path, SCOPE_OF.get(service, "admin"))
        return "allowed" if token in (needed, "admin") else "PERMISSION_DENIED/INSUFFICIENT_SCOPE"

    wrong = {key: f"got {got}, expected {expected(key)}" for key, got in outcomes.items() if got != expected(key)}
    assert not wrong, f"token {token}: " + "\n".join(f"{k}: {v}" for k, v in sorted(wrong.items()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*CERTIFICATES, "no kind"])
def test_health_is_open_to_every_certificate_of_the_ca(matrix_suite, certs, kind):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel_security = certs.client(CERTIFICATES[kind]) if kind in CERTIFICATES else _unmarked(certs)
    for name in SERVICES:
        with open_channel(matrix_suite.services[name].address, security=channel_security) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def _unmarked(certs: CertificateDir) -> ChannelSecurity:
    """A certificate of the suite's CA that says no kind (as made before identities existed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate(certs.ca().read_bytes())
    ca_key = serialization.load_pem_private_key(certs.path.joinpath("ca-key.pem").read_bytes(), password=None)
    cert, key = make_leaf(ca_cert, ca_key, "legacy", [], server=False)
    return ChannelSecurity.from_files(
        ca=certs.ca(), cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.mark.slow
def test_a_certificate_without_a_kind_counts_as_a_user(matrix_suite, certs):
    from latentwire.orchestrator.v1 import orchestrator_pb2

    legacy = _unmarked(certs)
    list_schedulers = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].methods_by_name[
        "ListSchedulers"]
    with open_channel(matrix_suite.services["orchestrator"].address, security=legacy) as channel:
        assert _outcome(_call(channel, list_schedulers, TOKENS["generate"])) == "allowed"
    with open_channel(matrix_suite.services["vae"].address, security=legacy) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "a user certificate may not call StatusService/GetStatus" in raised.value.details()


# --- GetStatus shows paths to operators only (finding 9) ----------------------------------------


def _status(address: str, channel_security: ChannelSecurity, token: str | None = None):
    with open_channel(address, security=channel_security, token=token) as channel:
        return status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)


@pytest.mark.slow
def test_status_shows_model_paths_to_operators_only(matrix_suite, certs):
    for name in ("text_encoder", "classifier"):
        address = matrix_suite.services[name].address
        for_service = _status(address, certs.client("denoiser"))
        assert for_service.loaded_models and all(m.source == "" for m in for_service.loaded_models), name
        assert all(m.name for m in for_service.loaded_models)  # the rest of the response is unchanged
        token = TOKENS["admin"] if name in TOKEN_GUARDED else None
        for_operator = _status(address, certs.operator(), token)
        assert all("/" in m.source for m in for_operator.loaded_models), name
        assert [m.name for m in for_operator.loaded_models] == [m.name for m in for_service.loaded_models]


def test_status_paths_follow_the_caller():
    """The unit under the suite test: the same servicer, three callers (plaintext anonymous, a token, an operator)."""
    import asyncio
    from types import SimpleNamespace

    from services.runtime.server import StatusServicer

    class Tracker:
        max_active = 4

        def snapshot(self):
            return [], []

    service = SimpleNamespace(service_name="x.v1.XService", tracker=Tracker(), loaded_models=lambda: [
        status_pb2.LoadedModel(name="m", source="/srv/models/m", device="cpu", dtype="float32")])

    async def status_as(caller):
        security.set_current_caller(caller)
        return await StatusServicer(service).GetStatus(status_pb2.GetStatusRequest(), None)

    def source(caller) -> str:
        return asyncio.run(status_as(caller)).loaded_models[0].source

    assert source(security.ANONYMOUS) == ""
    assert source(security.Caller(principal="alice", scopes=frozenset({"generate"}))) == ""
    assert source(security.Caller(principal="cert:vae", kind="service")) == ""
    assert source(security.Caller(principal="ops", scopes=frozenset({"admin"}))) == "/srv/models/m"
    assert source(security.Caller(principal="cert:operator", kind="operator")) == "/srv/models/m"


# --- the docs table is the code's table ----------------------------------------------------------


def render_table(method_paths: list[str]) -> str:
    """docs/operations.md's "who may call what" table for these methods, from security.ALLOWED_KINDS."""
    kinds = (USER, SERVICE, ORCHESTRATOR, OPERATOR)
    rows = ["| RPC | " + " | ".join(kinds) + " | token scope |", "| --- |" + " :---: |" * len(kinds) + " --- |"]
    for path in method_paths:
        allowed = security.allowed_kinds(path) or set()
        rows.append(f"| `{path.lstrip('/')}` | " + " | ".join("yes" if k in allowed else "-" for k in kinds)
                    + f" | `{security.required_scope(path)}` |")
    return "\n".join(rows)


def all_method_paths() -> list[str]:
    """Every RPC of every service the client package's protos define, in a stable order."""
    return defined_method_paths()


def test_operations_doc_table_matches_the_code():
    table = render_table(all_method_paths())
    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    assert table in doc, "docs/operations.md's table of who may call what is out of date; it should read:\n" + table


def test_code_table_matches_the_expected_one():
    for path in all_method_paths():
        assert set(security.allowed_kinds(path)) == expected_kinds(path), path
    assert security.allowed_kinds("/some.unknown.v1.Service/Method") == frozenset()  # closed by default
    assert security.allowed_kinds("/grpc.health.v1.Health/Check") is None
