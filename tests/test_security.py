"""Security: mutual TLS between every service, bearer tokens on the client-facing API, limits before work.

One suite runs with certificates from `latentwire certs` (every service serves mutual TLS with its
own certificate and calls the others with it; the stages fetch their model from the registry over
mutual TLS too) and an orchestrator that wants bearer tokens.
"""
from __future__ import annotations

import io
import os

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from latentwire.cli.certs import write_certificates
from latentwire.client import Client, LatentwireError, control
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.runtime import security
from services.runtime.errors import ConfigurationError
from latentwire.client.channels import open_channel
from latentwire.client.security import CertificateDir, ChannelSecurity
from services.runtime.security import TokenTable
from services.suite.launcher import start_suite

SERVICES = ("orchestrator", "text_encoder", "denoiser", "vae", "controlnet")
TOKENS = {"generate": "tok-generate-7f3a", "classify": "tok-classify-91bc", "admin": "tok-admin-55e0"}
MAX_MESSAGE_BYTES = 1024 * 1024
LIMITS = ["--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-steps", "10", "--max-image-size", "128",
          "--max-images", "2", "--max-prompt-chars", "50"]


def _png(size: int = 64, seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificateDir:
    return CertificateDir(write_certificates(tmp_path_factory.mktemp("certs")))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> CertificateDir:
    """Certificates from another CA, with the same names and hosts."""
    return CertificateDir(write_certificates(tmp_path_factory.mktemp("other-certs"), names=["client", "orchestrator"]))


@pytest.fixture(scope="module")
def secure_suite(tiny_model, tiny_controlnets, certs, tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    tokens = root / "tokens.txt"
    tokens.write_text("# token  scopes\n"
                      f"{TOKENS['generate']} generate\n{TOKENS['classify']} classify\n{TOKENS['admin']}\n")
    running = start_suite(
        tiny_model, ports={**dict.fromkeys(SERVICES, 0), "registry": 0}, log_dir=root / "logs",
        registry_dir=root / "registry", cache_root=root / "cache", controlnet=tiny_controlnets[0],
        tls_dir=certs.path, auth_tokens_file=tokens, extra_args={"orchestrator": [*LIMITS, "--metrics-port", "0"]},
    )
    running.log_dir = root / "logs"
    yield running
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {root / 'logs'}"


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {error}")


def _health(address: str, channel_security: ChannelSecurity) -> grpc.StatusCode:
    with open_channel(address, security=channel_security) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _generate_error(address: str, channel_security: ChannelSecurity, request, token: str | None = None):
    with open_channel(address, security=channel_security, token=token) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            list(orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate(request, timeout=30))
    return raised.value


# --- the whole suite over mutual TLS ------------------------------------------------------------


@pytest.mark.slow
def test_mtls_suite_generates(secure_suite, certs):
    with Client(secure_suite.address, timeout=120, token=TOKENS["generate"], tls_ca=certs.ca(),
                tls_cert=certs.cert("client"), tls_key=certs.key("client")) as client:
        result = client.generate("a red cube", seed=5, steps=3, guidance_scale=2.0,
                                 controlnets=[control(_png(), "none")])
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG")
    assert set(result.timings) >= {"text_encoder", "denoiser", "vae"}


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVICES + ("registry",))
def test_every_service_refuses_plaintext_and_foreign_certificates(secure_suite, certs, other_certs, name):
    address = secure_suite.services[name].address
    assert _health(address, certs.client()) == grpc.StatusCode.OK  # health is open to any verified client
    refused = {
        "plaintext": security.PLAINTEXT,
        "TLS without a client certificate": ChannelSecurity.from_files(ca=certs.ca()),
        "client certificate from another CA": ChannelSecurity.from_files(
            ca=certs.ca(), cert=other_certs.cert("client"), key=other_certs.key("client")),
        "server not trusted (only the other CA)": other_certs.client(),
        "server certificate for another host": certs.client(server_name="elsewhere.example"),
    }
    codes = {case: _health(address, channel_security) for case, channel_security in refused.items()}
    assert codes == dict.fromkeys(refused, grpc.StatusCode.UNAVAILABLE)


@pytest.mark.slow
def test_a_service_certificate_is_a_client_identity(secure_suite, certs):
    # A service's own certificate is a valid client identity (the stages call each other with theirs).
    assert _health(secure_suite.services["vae"].address, certs.client("denoiser")) == grpc.StatusCode.OK


def _status_error(address: str, channel_security: ChannelSecurity, token: str | None = None):
    """The error GetStatus answers with, or None when it answered."""
    with open_channel(address, security=channel_security, token=token) as channel:
        try:
            status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
        except grpc.RpcError as error:
            return error
    return None


@pytest.mark.slow
def test_user_certificate_cannot_call_stages_or_the_registry(secure_suite, certs):
    # Finding 1: the "client" certificate every user needs was accepted by every stage and by the registry;
    # a service's certificate was accepted everywhere too. (Every RPC: tests/test_identity_matrix.py.)
    from latentwire.registry.v1 import registry_pb2, registry_pb2_grpc
    from latentwire.vae.v1 import vae_pb2, vae_pb2_grpc

    for name in ("text_encoder", "denoiser", "vae", "controlnet", "registry"):
        error = _status_error(secure_suite.services[name].address, certs.client())
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert _error_info(error).reason == "IDENTITY_NOT_ALLOWED"
        assert "a user certificate may not call StatusService/GetStatus" in error.details()
        assert _status_error(secure_suite.services[name].address, certs.operator()) is None, name
    with open_channel(secure_suite.services["vae"].address, security=certs.client()) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            vae_pb2_grpc.VaeServiceStub(channel).Encode(vae_pb2.EncodeRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A stage's certificate may read the registry (stages download models) but not change it.
    with open_channel(secure_suite.services["registry"].address, security=certs.client("vae")) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        assert registry.ListModels(registry_pb2.ListModelsRequest(), timeout=10).models
        with pytest.raises(grpc.RpcError) as raised:
            registry.DeleteModel(registry_pb2.DeleteModelRequest(name="no-such-model"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _error_info(raised.value).metadata["allowed_kinds"] == "operator"


# --- bearer tokens --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("token,code,reason", [
    (None, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"),
    ("not-a-token", grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"),
    (TOKENS["classify"], grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_SCOPE"),
])
def test_generate_needs_a_token_with_its_scope(secure_suite, certs, token, code, reason):
    error = _generate_error(secure_suite.address, certs.client(), Client.build_request("a cat", steps=2), token)
    assert error.code() == code
    info = _error_info(error)
    assert info.reason == reason and info.domain == "latentwire.dev"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert info.metadata["required_scope"] == "generate"


@pytest.mark.slow
def test_status_needs_admin_and_health_stays_open(secure_suite, certs):
    address = secure_suite.address
    # An operator certificate still needs the token's admin scope on a service with a tokens file.
    error = _status_error(address, certs.operator(), TOKENS["generate"])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and _error_info(error).reason == "INSUFFICIENT_SCOPE"
    # A user certificate may not call it, whatever the token.
    error = _status_error(address, certs.client(), TOKENS["admin"])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and _error_info(error).reason == "IDENTITY_NOT_ALLOWED"
    with open_channel(address, security=certs.operator(), token=TOKENS["admin"]) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    assert status.service.endswith("OrchestratorService")
    assert _health(address, certs.client()) == grpc.StatusCode.OK  # no token


@pytest.mark.slow
def test_client_library_reports_refusals(secure_suite, certs):
    with Client(secure_suite.address, timeout=30, security=certs.client()) as client:
        with pytest.raises(LatentwireError) as raised:
            client.generate("a cat", steps=2)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in raised.value.message


# --- limits: refused before any work ------------------------------------------------------------


def _jobs_seen(suite, certs) -> dict[str, set[str]]:
    """Jobs each service has started (running and finished, from GetStatus) and the orchestrator's stored jobs."""
    seen = {}
    for name in SERVICES:
        token = TOKENS["admin"] if name == "orchestrator" else None
        with open_channel(suite.services[name].address, security=certs.operator(), token=token) as channel:
            status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
            seen[name] = {job.job_id for job in [*status.active_jobs, *status.recent_jobs]}
            if name == "orchestrator":
                jobs = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).ListJobs(
                    orchestrator_pb2.ListJobsRequest(page_size=100), timeout=10)
                seen["stored jobs"] = {job.name for job in jobs.jobs}
    return seen


OVER_LIMIT = [
    ("message", dict(init_image=os.urandom(MAX_MESSAGE_BYTES + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    ("prompt", dict(prompt="x" * 51), grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_LONG"),
    ("steps", dict(steps=11), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_STEPS"),
    ("image size", dict(width=136), grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_TOO_LARGE"),
    ("images", dict(num_images=3), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NUM_IMAGES"),
    ("output size from the init image", dict(init_image=_png(256)), grpc.StatusCode.INVALID_ARGUMENT,
     "IMAGE_TOO_LARGE"),
]


@pytest.mark.slow
def test_oversized_requests_are_refused_before_any_work(secure_suite, certs):
    before = _jobs_seen(secure_suite, certs)
    for case, settings, code, reason in OVER_LIMIT:
        settings = {"prompt": "a cat", "steps": 2, **settings}
        request = Client.build_request(settings.pop("prompt"), **settings)
        error = _generate_error(secure_suite.address, certs.client(), request, TOKENS["generate"])
        assert error.code() == code, f"{case}: {error.code()} {error.details()}"
        if reason is not None:
            assert _error_info(error).reason == reason, case
        else:
            assert "larger than max" in error.details(), case
    assert _jobs_seen(secure_suite, certs) == before, "a refused request started a job somewhere"


# --- units: token files, scopes, start-up refusals ----------------------------------------------


def test_token_table():
    table = TokenTable.parse(["# comment", "", "a generate", "b classify,generate  # both", "c"])
    ok = [("authorization", "Bearer a")]
    assert table.check(ok, "generate") is None
    assert table.check([("authorization", "bearer b")], "classify") is None
    assert table.check([("authorization", "Bearer c")], "admin") is None  # no scope listed: everything
    assert table.check(ok, "classify").reason == "INSUFFICIENT_SCOPE"
    assert table.check(ok, "admin").reason == "INSUFFICIENT_SCOPE"
    assert table.check([("authorization", "Basic a")], "generate").reason == "INVALID_TOKEN"
    assert table.check([("authorization", "Bearer ab")], "generate").reason == "INVALID_TOKEN"
    assert table.check([], "generate").reason == "MISSING_TOKEN"
    with pytest.raises(ValueError, match="twice"):
        TokenTable.parse(["a", "a generate"])
    with pytest.raises(ValueError, match="no token"):
        TokenTable.parse(["# nothing"])


def test_token_principals():
    import hashlib

    table = TokenTable.parse(["a generate principal=alice", "b principal=ops@example.org", "c classify",
                              "d generate,classify principal=alice  # a second token of alice"])
    assert table.authenticate([("authorization", "Bearer a")], "generate").principal == "alice"
    assert table.authenticate([("authorization", "Bearer b")], "admin").principal == "ops@example.org"
    assert table.authenticate([("authorization", "Bearer d")], "classify").principal == "alice"
    # A line without principal= keeps working; its principal is derived from the token.
    derived = table.authenticate([("authorization", "Bearer c")], "classify").principal
    assert derived == "token:" + hashlib.sha256(b"c").hexdigest()[:12]
    for line, words in [("a principal=", "principal= takes"), ("a principal=bob:x", "principal= takes"),
                        ("a principal=" + "x" * 65, "principal= takes"), ("a generat", "unknown scope 'generat'"),
                        ("a principle=bob", "unknown scope")]:
        with pytest.raises(ValueError, match=words):
            TokenTable.parse([line])


def _auth_context(kind: str | None, name: str) -> dict[str, list[bytes]]:
    """What grpc's context.auth_context() holds for a certificate of ``latentwire certs`` (checked on a real call
    by tests/test_identity_matrix.py)."""
    context = {"x509_common_name": [name.encode()], "transport_security_type": [b"ssl"]}
    if kind is not None:
        uri = f"spiffe://latentwire/{kind}/{name}".encode()
        context.update(peer_uri=[uri], peer_spiffe_id=[uri])
    return context


def test_callers():
    from services.runtime.errors import PermissionDenied, Unauthenticated

    tokens = TokenTable.parse(["tok-a generate principal=alice", "tok-x admin"])
    mtls = security.AccessInterceptor(client_auth=True, tokens=tokens)
    generate = "/latentwire.orchestrator.v1.OrchestratorService/Generate"
    encode = "/latentwire.text_encoder.v1.TextEncoderService/Encode"
    bearer = [("authorization", "Bearer tok-a")]
    caller = mtls.authorize(generate, _auth_context("user", "client"), bearer)
    assert (caller.principal, caller.kind, caller.is_admin) == ("alice", "user", False)
    # Services and the orchestrator need no token; their principal is their certificate's.
    caller = mtls.authorize(encode, _auth_context("orchestrator", "orchestrator"), [])
    assert (caller.principal, caller.kind, caller.scopes) == ("cert:orchestrator", "orchestrator", frozenset())
    caller = mtls.authorize(encode, _auth_context("operator", "ops"), [("authorization", "Bearer tok-x")])
    assert caller.is_admin and caller.principal.startswith("token:")
    with pytest.raises(Unauthenticated):
        mtls.authorize(encode, _auth_context("operator", "ops"), [])  # people need a token in addition
    with pytest.raises(PermissionDenied) as raised:
        mtls.authorize(encode, _auth_context("user", "client"), bearer)
    assert raised.value.reason == "IDENTITY_NOT_ALLOWED"
    assert raised.value.metadata == {"identity_kind": "user", "allowed_kinds": "operator,orchestrator"}
    # No kind in the certificate, or two different ones: a user.
    assert mtls.authorize(generate, _auth_context(None, "legacy"), bearer).kind == "user"
    mixed = {**_auth_context("operator", "x"), "peer_uri": [b"spiffe://latentwire/operator/x",
                                                            b"spiffe://latentwire/service/x"]}
    assert mtls.authorize(generate, mixed, bearer).kind == "user"
    assert security.certificate_identity(_auth_context("admin", "x"))[0] == "user"  # not a kind
    # Without mutual TLS: no identity check, an anonymous kind; the token (if any) names the principal.
    plain = security.AccessInterceptor(client_auth=False)
    assert plain.authorize(encode, {}, []) == security.ANONYMOUS
    caller = security.AccessInterceptor(client_auth=False, tokens=tokens).authorize(generate, {}, bearer)
    assert (caller.principal, caller.kind) == ("alice", "anonymous")
    # Without a token the principal is the certificate's.
    assert security.AccessInterceptor(client_auth=True).authorize(
        generate, _auth_context("user", "bob"), []).principal == "cert:bob"


def test_certificates_say_their_kind(tmp_path):
    from cryptography import x509

    from latentwire.cli.certs import write_certificates

    folder = write_certificates(tmp_path, users=["alice"], operators=["ops"])
    expected = {"client": "user", "alice": "user", "operator": "operator", "ops": "operator",
                "orchestrator": "orchestrator", "vae": "service", "registry": "service"}
    for name, kind in expected.items():
        cert = x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        assert uris == [f"spiffe://latentwire/{kind}/{name}"], name
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usages) == (kind in ("service", "orchestrator")), name
    with pytest.raises(ValueError, match="not a certificate name"):
        write_certificates(tmp_path, names=[], users=["a/b"])


def test_certs_command_issues_users_and_operators(tmp_path, capsys):
    from latentwire.cli.main import main

    def run(*argv) -> int:
        with pytest.raises(SystemExit) as raised:
            main(list(argv))
        return raised.value.code

    assert run("certs", str(tmp_path), "--names", "vae", "--users", "alice,bob", "--operators", "ops") == 0
    out = capsys.readouterr().out
    assert "vae (service), alice (user), bob (user), ops (operator)" in out
    assert {p.name for p in tmp_path.glob("*.pem")} >= {"ca.pem", "vae.pem", "alice.pem", "bob-key.pem", "ops.pem"}
    assert run("certs", str(tmp_path), "--users", "../escape") == 2
    assert "not a certificate name" in capsys.readouterr().err


def test_required_scopes():
    assert security.required_scope("/grpc.health.v1.Health/Check") is None
    assert security.required_scope("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert security.required_scope("/latentwire.orchestrator.v1.OrchestratorService/Generate") == "generate"
    assert security.required_scope("/latentwire.classifier.v1.ClassifierService/Classify") == "classify"
    assert security.required_scope("/latentwire.common.v1.StatusService/GetStatus") == "admin"
    assert security.required_scope("/some.unknown.Service/Method") == "admin"
    # Loading and unloading classifier models changes the server for everyone: admin, unlike inference itself.
    assert security.required_scope("/inference.GRPCInferenceService/ModelInfer") == "classify"
    assert security.required_scope("/inference.GRPCInferenceService/ModelStreamInfer") == "classify"
    assert security.required_scope("/inference.GRPCInferenceService/RepositoryModelLoad") == "admin"
    assert security.required_scope("/inference.GRPCInferenceService/RepositoryModelUnload") == "admin"


@pytest.mark.parametrize("flags,words", [
    (dict(tls_cert="c.pem"), "--tls-cert and --tls-key go together"),
    (dict(tls_client_auth=True), "--tls-client-auth needs --tls-cert"),
    (dict(tls_cert="c.pem", tls_key="k.pem", tls_client_auth=True), "--tls-client-auth needs --tls-ca"),
    (dict(tls_cert="/nonexistent/c.pem", tls_key="/nonexistent/k.pem"), "cannot read it"),
])
def test_server_tls_flags_are_checked_at_start(flags, words):
    from types import SimpleNamespace

    config = SimpleNamespace(**{"tls_cert": None, "tls_key": None, "tls_ca": None, "tls_client_auth": False, **flags})
    with pytest.raises(ConfigurationError) as raised:
        security.server_credentials(config)
    assert words in str(raised.value)


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_over_mtls_with_a_token(secure_suite, certs, tmp_path, capsys, monkeypatch):
    from latentwire.cli.main import main

    def run(*argv) -> int:
        with pytest.raises(SystemExit) as raised:
            main(list(argv))
        return raised.value.code

    out = tmp_path / "out.png"
    monkeypatch.setenv("LATENTWIRE_TOKEN", TOKENS["generate"])
    assert run("generate", "a red cube", "--server", secure_suite.address, "--tls-dir", str(certs.path),
               "--steps", "2", "--seed", "1", "-q", "-o", str(out)) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    monkeypatch.delenv("LATENTWIRE_TOKEN")
    assert run("generate", "a red cube", "--server", secure_suite.address, "--tls-dir", str(certs.path),
               "--steps", "2", "-q", "-o", str(out)) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    # The registry over mutual TLS: the stages fetched the model from it, and so does the CLI.
    assert run("models", "list", "--registry", secure_suite.services["registry"].address,
               "--tls-dir", str(certs.path)) == 0
    assert "default->" in capsys.readouterr().out


@pytest.mark.slow
def test_metrics_endpoint_is_mutual_tls_too_and_counts_refusals(secure_suite, certs):
    import ssl
    import urllib.error
    import urllib.request

    address = secure_suite.services["orchestrator"].metrics_address
    _generate_error(secure_suite.address, certs.client(), Client.build_request("a cat", steps=2), None)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=10)  # plaintext HTTP
    context = ssl.create_default_context(cafile=str(certs.ca()))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"https://{address}/metrics", timeout=10, context=context).read()  # no client cert
    context.load_cert_chain(str(certs.cert("client")), str(certs.key("client")))
    with urllib.request.urlopen(f"https://{address}/metrics", timeout=10, context=context) as response:
        text = response.read().decode()
    generate = 'method="/latentwire.orchestrator.v1.OrchestratorService/Generate"'
    refused = [line for line in text.splitlines() if line.startswith("latentwire_rpc_duration_seconds_count{")
               and generate in line and 'code="UNAUTHENTICATED"' in line]
    assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 1
