"""Start the whole suite on one machine: each service in its own process, on its own port.

Used by `latentwire up` and by the tests. Each child prints one LATENTWIRE_LISTENING line on
stdout once its port is open; the launcher reads it, then waits on grpc.health.v1.Health/Watch
(a stream, no polling) until every service reports SERVING.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwire.client.channels import open_channel
from latentwire.client.security import CertificateDir, ChannelSecurity
from services.runtime.server import LISTENING_PREFIX
from services.suite import forkserver
from services.suite.ports import suite_ports

#: Stage services in start order, with the module that runs each.
STAGES = {
    "text_encoder": "services.text_encoder",
    "denoiser": "services.denoiser",
    "vae": "services.vae",
}
ORCHESTRATOR_MODULE = "services.orchestrator"
CONTROLNET_MODULE = "services.controlnet"
CLASSIFIER_MODULE = "services.classifier"
REGISTRY_MODULE = "services.registry"
GATEWAY_MODULE = "services.gateway"
#: Port of the REST gateway under `latentwire up` (AUTOMATIC1111's); not part of the orchestrator's port run.
GATEWAY_PORT = 7860

#: glibc malloc settings for every service process (the caller's environment wins). Compute runs
#: on worker threads, whose per-thread arenas map and unmap every large activation afresh: at
#: SD 1.5 size that is millions of page faults per image (docs/benchmarks.md). One arena and no
#: trimming keeps the memory mapped; the price is that a process keeps its peak memory.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 1024**3)}
#: OpenMP (libgomp, torch's) for every service process (the caller's environment wins): how long an idle OpenMP
#: thread spins for the next parallel region before it sleeps. libgomp's default, 300000 spins (9-12 ms of a core
#: here), keeps a thread of each stage busy long after the stage's last operation; on one host the next stage (the
#: denoiser after the text encoder, the VAE after the denoiser) shares the cores with it. 50000 (about 1.5 ms) still
#: spans the gaps between a network's operations; 10000 made the text encoder's own forward slower
#: (docs/benchmarks.md, "2026-12-03 (later): OpenMP's spin between stages, and the LIFO pool back").
OPENMP_ENV = {"GOMP_SPINCOUNT": "50000"}
#: Both, the start-up environment every service process gets by default.
SERVICE_ENV = {**MALLOC_ENV, **OPENMP_ENV}


def service_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a service process (or of the fork server its processes are forked from, which must match
    it): ``SERVICE_ENV``, overridden by this process's environment, then by ``env``; unbuffered output."""
    return {**SERVICE_ENV, **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}

#: Default ports of `latentwire up`: 50051 (orchestrator) to 50057 (controlnet).
DEFAULT_PORTS = suite_ports()


@dataclass
class ServiceProcess:
    """One running service."""

    name: str
    process: subprocess.Popen | forkserver.ForkedProcess
    address: str = ""
    #: host:port of its Prometheus /metrics endpoint, when it runs with --metrics-port.
    metrics_address: str = ""
    #: The file its log (stderr) goes to; None when it shares the launcher's stderr.
    log_file: Path | None = None


@dataclass
class Suite:
    """A running suite; stop() shuts it down gracefully (SIGTERM, then SIGKILL after a timeout)."""

    services: dict[str, ServiceProcess] = field(default_factory=dict)
    #: How a user reaches the orchestrator: plaintext, or (with a certificate folder) mutual TLS as "client".
    security: ChannelSecurity | None = None
    #: How an operator reaches any service (status, model loading, registry writes): plaintext, or mutual
    #: TLS as "operator".
    operator_security: ChannelSecurity | None = None
    #: Names of the models the stages serve, as requests name them; the default first.
    models: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The orchestrator's address, the one clients call."""
        return self.services["orchestrator"].address

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM every service (orchestrator first, registry last), wait, kill what is left; return exit codes."""
        order = ["gateway", "orchestrator",
                 *[s for s in self.services if s not in ("gateway", "orchestrator", "registry")], "registry"]
        for name in order:
            process = self.services.get(name)
            if process and process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = {}
        for name in order:
            process = self.services.get(name)
            if process is None:
                continue
            try:
                codes[name] = process.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.process.kill()
                codes[name] = process.process.wait()
        return codes

    def __enter__(self) -> Suite:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _spawn(name: str, module: str, args: list[str], log_dir: Path | None, env: dict[str, str],
           prefix: list[str] | None = None) -> ServiceProcess:
    stderr = log_file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"{name}.log"
        stderr = open(log_file, "ab")  # noqa: SIM115 - handed to the child
    try:
        # Forked from a process that imported the libraries already, when a fork server runs (forkserver.py).
        process = forkserver.spawn(module, args, env, stderr) if prefix is None else None
        if process is None:
            process = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", module, *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it shuts children down in order
            )
    finally:
        if stderr is not None:
            stderr.close()  # the child holds its own copy
    return ServiceProcess(name=name, process=process, log_file=log_file)


def _read_address(service: ServiceProcess, timeout: float) -> str:
    """Read the child's LISTENING line (blocking read on a thread, bounded by ``timeout``)."""
    result: dict[str, str] = {}

    def reader() -> None:
        for raw in service.process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(LISTENING_PREFIX) and "address" not in result:
                listening = json.loads(line[len(LISTENING_PREFIX):])
                service.metrics_address = listening.get("metrics_address", "")
                result["address"] = listening["address"]
                ready.set()
            # Keep draining stdout so a chatty library cannot fill the pipe and block the child.
        ready.set()

    ready = threading.Event()
    threading.Thread(target=reader, name=f"{service.name}-stdout", daemon=True).start()
    ready.wait(timeout)
    if "address" not in result:
        try:  # stdout closed: the child is exiting; wait briefly to report its code
            code = service.process.wait(5) if ready.is_set() else service.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        state = f"exited with code {code}" if code is not None else f"did not open its port within {timeout:.0f} s"
        raise RuntimeError(f"the {service.name} service {state}; see its log")
    return result["address"]


def wait_serving(address: str, timeout: float, name: str = "", process: subprocess.Popen | None = None, *,
                 security: ChannelSecurity | None = None) -> None:
    """Block until the server at ``address`` reports SERVING on Health/Watch, or raise after ``timeout``.

    With ``process``, a child that exits while starting ends the wait at once (its Watch is cancelled).
    ``security``: how to reach it (plaintext by default).
    """
    with open_channel(address, security=security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
        if process is not None:
            def cancel_on_exit() -> None:
                process.wait()
                call.cancel()

            threading.Thread(target=cancel_on_exit, name=f"{name}-exit", daemon=True).start()
        try:
            for response in call:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    call.cancel()
                    return
        except grpc.RpcError as error:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the {name or address} service exited with code {process.returncode} "
                                   "while starting; see its log") from None
            raise RuntimeError(f"the {name or address} service did not become SERVING: {error.code().name}") from None
    raise RuntimeError(f"the {name or address} service closed its health stream before SERVING")


def start_service(
    name: str, module: str, args: list[str], *, log_dir: Path | None = None, timeout: float = 300.0,
    env: dict[str, str] | None = None, tls_dir: str | Path | None = None, prefix: list[str] | None = None,
) -> ServiceProcess:
    """Start one service process and return once its port is open (not necessarily SERVING yet).

    With ``tls_dir`` (a `latentwire certs` folder) it serves mutual TLS as ``name`` (``DIR/<name>.pem``).
    ``prefix`` runs it through another command that execs it (``["ip", "netns", "exec", NS]``: inside a
    network namespace), so the process is still the service's own.
    """
    child_env = service_environment(env)
    if tls_dir is not None:
        args = [*args, *CertificateDir(Path(tls_dir)).service_args(name)]
    service = _spawn(name, module, args, log_dir, child_env, prefix)
    try:
        service.address = _read_address(service, timeout)
    except BaseException:
        service.process.kill()
        service.process.wait()
        raise
    return service


def start_gateway(suite: Suite, *, host: str = "127.0.0.1", port: int = GATEWAY_PORT, args: list[str] | tuple = (),
                  log_dir: Path | None = None, env: dict[str, str] | None = None,
                  timeout: float = 120.0) -> ServiceProcess:
    """The REST gateway over the running ``suite`` (its orchestrator, registry and model names); returns once it
    listens with its suite channels open. Not added to ``suite.services``: the caller stops it (or adds it)."""
    env = service_environment(env)
    gateway_args = ["--host", host, "--port", str(port), "--orchestrator", suite.address,
                    *[arg for name in suite.models for arg in ("--checkpoint", name)]]
    if "registry" in suite.services:
        gateway_args += ["--registry", suite.services["registry"].address]
    service = _spawn("gateway", GATEWAY_MODULE, [*gateway_args, *args], log_dir, env)
    service.address = _read_address(service, timeout)
    return service


#: The principal of the REST gateway's own calls (its callers without a token of their own) under `latentwire up
#: --auth-tokens-file`.
GATEWAY_PRINCIPAL = "gateway"


def gateway_token(tokens_file: str | Path) -> tuple[Path, str]:
    """The REST gateway's own token for an orchestrator that checks ``tokens_file``: the token of its line with
    ``principal=gateway`` when it has one (the file is then used as it is); else a fresh one (scopes generate and
    classify, not admin: the gateway's callers see the gateway's jobs only) added to a copy of the file, readable
    by this user only, in a new temporary folder. Returns the file the orchestrator is to read, and the token
    (which reaches the gateway in its environment, never on a command line)."""
    import secrets
    import tempfile

    from services.gateway.config import read_user_tokens

    tokens_file = Path(tokens_file)
    own = read_user_tokens(str(tokens_file)).get(GATEWAY_PRINCIPAL)
    if own:
        return tokens_file, own
    token = secrets.token_urlsafe(32)
    folder = Path(tempfile.mkdtemp(prefix="latentwire-tokens-"))  # 0700
    combined = folder / "auth-tokens"
    text = tokens_file.read_text()
    descriptor = os.open(combined, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text + ("" if text.endswith("\n") or not text else "\n")
                  + f"{token} generate,classify principal={GATEWAY_PRINCIPAL}  # the REST gateway (latentwire up)\n")
    return combined, token


def _write_placement(log_dir: Path | None, placement: dict) -> Path:
    """Write an orchestrator placement file (JSON, which YAML reads) into ``log_dir`` or a new temporary folder."""
    import tempfile

    folder = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="latentwire-placement-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "placement.yaml"
    path.write_text(json.dumps(placement, indent=2) + "\n")
    return path


def seed_registry(address: str, folder: str | Path, name: str | None = None, *,
                  security: ChannelSecurity | None = None) -> str:
    """Make ``folder`` the "default" version of model ``name`` in the registry; return the name.

    RegistryClient.import_folder keeps the version "default" names when it holds the same files,
    so restarting `latentwire up` on the same model adds no version.
    """
    from latentwire.client.registry import RegistryClient

    with RegistryClient(address, security=security) as registry:
        return registry.import_folder(folder, name, aliases=["default"]).model_version.model_id


def start_suite(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    log_dir: Path | None = None,
    timeout: float = 300.0,
    extra_args: dict[str, list[str]] | None = None,
    env: dict[str, str] | None = None,
    registry_dir: Path | None = None,
    cache_root: Path | None = None,
    controlnet: str | Path | None = None,
    classifier: str | Path | None = None,
    tls_dir: str | Path | None = None,
    auth_tokens_file: str | Path | None = None,
    more_models: tuple[str | Path, ...] | list[str | Path] = (),
    text_encoder_replicas: list[list[str]] | None = None,
    gateway: bool = False,
    loras: tuple[str | Path, ...] | list[str | Path] = (),
) -> Suite:
    """Start text encoder, denoiser, VAE and orchestrator on ``model``; return once all are SERVING.

    ``ports`` maps service name to port (0 picks a free one; missing names use DEFAULT_PORTS).
    ``extra_args`` adds flags per service name. Logs go to ``log_dir/<name>.log`` or, without
    one, to this process's stderr.

    With ``registry_dir``, a registry service runs on that data folder first and is seeded with
    ``model`` (alias "default"); every stage then fetches its components from the registry into
    its own cache (``cache_root/<stage>``) instead of reading the folder, as stages on other
    hosts would.

    With ``controlnet`` (a ControlNet model folder), a ControlNet service runs too; the denoiser is
    started with its address (``--controlnet-address``) and the orchestrator names it by that address.

    With ``classifier`` (a transformers image-classification folder), the classifier service
    runs too (seeded into the registry like the model) and the orchestrator routes
    ClassifierService and the Open Inference Protocol to it.

    With ``tls_dir`` (a `latentwire certs` folder), every service serves mutual TLS with its own
    certificate (``DIR/<service>.pem``) and calls the others with it; the launcher seeds the
    registry as the "operator" (``Suite.operator_security``), and ``Suite.security`` is the user
    "client", for the orchestrator. With ``auth_tokens_file``, the orchestrator (and, under mutual TLS,
    the classifier, which users reach too) refuses calls without a valid bearer token.

    ``more_models`` are further model folders (an SDXL refiner, ...) the text encoder, denoiser and VAE serve
    too, by folder name (seeded into the registry like ``model`` when there is one); ``Suite.models`` lists the
    names requests use, the default first. ``loras`` are LoRA files seeded into the registry (there must be one),
    named by file name: ``<lora:purple-shapes:1>`` for ``purple-shapes.safetensors``.

    With ``text_encoder_replicas`` (a list of encoder groups, e.g. ``[["text_encoder", "text_encoder_2"],
    ["text_encoder_3"]]``), one text-encoder process runs per group with ``--encoders`` (services named
    "text_encoder", "text_encoder-2", ...), and the orchestrator gets a placement file listing them with their
    encoders (``LOG_DIR/placement.yaml``, or a temporary folder's), so it runs each encoder where it is hosted.

    With ``gateway``, the REST gateway (services/gateway: AUTOMATIC1111's API, the web page) starts last, on
    ``ports["gateway"]`` (default 7860), as a client of the orchestrator (and registry); ``extra_args["gateway"]``
    adds its flags.
    """
    ports = {**DEFAULT_PORTS, **(ports or {})}
    extra_args = extra_args or {}
    child_env = service_environment(env)
    certificates = CertificateDir(Path(tls_dir)) if tls_dir is not None else None
    security = certificates.client() if certificates is not None else None
    operator = certificates.operator() if certificates is not None else None

    def tls_args(name: str) -> list[str]:
        return certificates.service_args(name) if certificates is not None else []

    suite = Suite(security=security, operator_security=operator)
    gateway_env: dict[str, str] = {}
    if gateway and auth_tokens_file is not None:
        # The gateway calls a token-checking orchestrator with its own token; its API users with a line of their own.
        users_file = auth_tokens_file
        auth_tokens_file, gateway_env["LATENTWIRE_SUITE_TOKEN"] = gateway_token(auth_tokens_file)
        gateway_env["LATENTWIRE_AUTH_TOKENS_FILE"] = str(users_file)
    try:
        model_args = ["--model", str(model)]
        orchestrator_args: list[str] = []
        if registry_dir is not None:
            registry = _spawn("registry", REGISTRY_MODULE,
                              ["--host", host, "--port", str(ports["registry"]), "--data-dir", str(registry_dir),
                               *tls_args("registry"), *extra_args.get("registry", [])], log_dir, child_env)
            suite.services["registry"] = registry
            registry.address = _read_address(registry, timeout)
            wait_serving(registry.address, timeout, "registry", registry.process, security=operator)
            name = seed_registry(registry.address, model, security=operator)
            model_args = ["--model", name, "--registry", registry.address]
            orchestrator_args = ["--registry", registry.address, "--default-model", name]
            suite.models.append(name)
            for file in loras:  # LoRA files: requests name them by file name (<lora:NAME:W>)
                seed_registry(registry.address, file, security=operator)
        else:
            suite.models.append(Path(model).name)
        for folder in more_models:
            if registry_dir is not None:
                other = seed_registry(suite.services["registry"].address, folder, security=operator)
                model_args = [*model_args, "--model", other]
            else:
                other = Path(folder).name
                model_args = [*model_args, "--model", f"{other}={folder}"]
            suite.models.append(other)
        stages = dict(STAGES)
        stage_models = dict.fromkeys(stages, model_args)
        text_groups = [list(group) for group in text_encoder_replicas or []]
        for index, group in enumerate(text_groups[1:], start=2):  # the first one is "text_encoder"
            stages[f"text_encoder-{index}"] = STAGES["text_encoder"]
            stage_models[f"text_encoder-{index}"] = model_args
        encoder_groups = {("text_encoder" if i == 1 else f"text_encoder-{i}"): group
                          for i, group in enumerate(text_groups, start=1)}
        if controlnet is not None:
            stages["controlnet"] = CONTROLNET_MODULE
            stage_models["controlnet"] = ["--model", str(controlnet)]
            if registry_dir is not None:
                controlnet_name = seed_registry(suite.services["registry"].address, controlnet, security=operator)
                stage_models["controlnet"] = ["--model", controlnet_name, "--registry",
                                              suite.services["registry"].address]
        if classifier is not None:
            stages["classifier"] = CLASSIFIER_MODULE
            stage_models["classifier"] = ["--model", str(classifier)]
            if registry_dir is not None:
                classifier_name = seed_registry(suite.services["registry"].address, classifier, security=operator)
                stage_models["classifier"] = ["--model", classifier_name, "--registry",
                                              suite.services["registry"].address]
        # The denoiser streams only with the ControlNet replicas it is started with (never with an address a
        # request names), so it starts last, once the ControlNet service's port is known.
        for name in sorted(stages, key=lambda name: name == "denoiser"):
            args = ["--host", host, "--port", str(ports.get(name, 0)), *stage_models[name],
                    *tls_args(name.split("-")[0]), *extra_args.get(name, [])]
            if name in encoder_groups:
                args += ["--encoders", ",".join(encoder_groups[name])]
            if name == "classifier" and auth_tokens_file is not None and certificates is not None:
                # Users may call the classifier directly. Only mutual TLS tells it the orchestrator (which sends
                # no token) from a user, so over plaintext the orchestrator alone checks tokens.
                args += ["--auth-tokens-file", str(auth_tokens_file)]
            if registry_dir is not None:
                args += ["--cache-dir", str((cache_root or registry_dir.parent / "cache") / name)]
            if name == "denoiser" and "controlnet" in stages:
                controlnet_service = suite.services["controlnet"]
                controlnet_service.address = _read_address(controlnet_service, timeout)
                args += ["--controlnet-address", controlnet_service.address]
            suite.services[name] = _spawn(name, stages[name], args, log_dir, child_env)
        for name in stages:
            if not suite.services[name].address:
                suite.services[name].address = _read_address(suite.services[name], timeout)
        args = ["--host", host, "--port", str(ports["orchestrator"]), *orchestrator_args, *tls_args("orchestrator")]
        if auth_tokens_file is not None:
            args += ["--auth-tokens-file", str(auth_tokens_file)]
        for name in stages:
            if name not in encoder_groups:
                args += [f"--{name.replace('_', '-')}-address", suite.services[name].address]
        if encoder_groups:
            args += ["--placement", str(_write_placement(log_dir, {
                "text_encoder": [{"address": suite.services[name].address, "encoders": group}
                                 for name, group in encoder_groups.items()]}))]
        suite.services["orchestrator"] = _spawn(
            "orchestrator", ORCHESTRATOR_MODULE, args + extra_args.get("orchestrator", []), log_dir, child_env
        )
        suite.services["orchestrator"].address = _read_address(suite.services["orchestrator"], timeout)
        for name, service in suite.services.items():
            wait_serving(service.address, timeout, name, service.process, security=operator)
        if gateway:
            # Under mutual TLS the gateway calls the suite as the user "client" (it serves plain HTTP).
            identity = (["--tls-ca", str(certificates.ca()), "--suite-tls-cert", str(certificates.cert("client")),
                         "--suite-tls-key", str(certificates.key("client"))] if certificates is not None else [])
            suite.services["gateway"] = start_gateway(suite, host=host, port=ports.get("gateway", GATEWAY_PORT),
                                                      args=[*identity, *extra_args.get("gateway", [])],
                                                      log_dir=log_dir, env={**(env or {}), **gateway_env},
                                                      timeout=timeout)
    except BaseException:
        suite.stop(timeout=10)
        raise
    return suite
