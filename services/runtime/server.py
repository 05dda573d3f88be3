"""Server bootstrap shared by every service: grpc.aio server, health, reflection, status, graceful shutdown,
TLS and bearer tokens (security.py), traces and metrics (telemetry.py).

Lifecycle (as in the grpc.aio examples): the port opens first with health NOT_SERVING, the
models load off the event loop, health turns SERVING; on SIGTERM or SIGINT health turns
NOT_SERVING, new calls are refused and in-flight calls get ``--grace-period-s`` to finish.
"""
from __future__ import annotations

import abc
import asyncio
import gc
import json
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from latentwire.common.v1 import status_pb2, status_pb2_grpc

from . import security, telemetry
from latentwire.client.channels import grpc_options

from .config import ServiceConfig
from .errors import ConfigurationError, LatentwireError, ModelFolderError, Unavailable
from .interceptor import DrainInterceptor, ErrorInterceptor
from .jobs import JobTracker
from .reflection import enable_reflection
from .worker import Worker

log = logging.getLogger(__name__)

#: Seconds the calls of interrupted jobs get, once the grace period is over, to end with their UNAVAILABLE.
INTERRUPTED_CALLS_WAIT_S = 5.0

#: First line a service prints on stdout once its port is open; `latentwire up` and the tests read it.
LISTENING_PREFIX = "LATENTWIRE_LISTENING "


class Service(abc.ABC):
    """What each service implements; the runtime does the rest.

    Subclasses set ``service_name`` (the fully qualified gRPC service) and implement ``register``
    (add servicers to the server) and, if they hold models, ``load`` and ``loaded_models``.
    """

    service_name: str

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.tracker = JobTracker(config.max_concurrent_jobs)
        self.worker = Worker(config.max_concurrent_jobs)

    @abc.abstractmethod
    def register(self, server: grpc.aio.Server) -> list[str]:
        """Add this service's servicers to ``server``; return the full names of the services added."""

    async def load(self) -> None:
        """Load models; the service reports SERVING only after this returns."""

    def loaded_models(self) -> list[status_pb2.LoadedModel]:
        """Models held in memory, for GetStatus."""
        return []

    async def begin_shutdown(self, grace: float) -> None:
        """Called first on SIGTERM, while calls still run: stop taking background work (the orchestrator's
        queue), give it up to ``grace`` seconds. Nothing to do by default."""

    async def close(self) -> None:
        """Release resources after the server stopped."""
        self.worker.shutdown()


class StatusServicer(status_pb2_grpc.StatusServiceServicer):
    """latentwire.common.v1.StatusService, served by every service."""

    def __init__(self, service: Service):
        self._service = service

    async def GetStatus(self, request, context):
        """Return the loaded models, the running jobs and the recent jobs of this service.

        Where a model was loaded from (a folder, a cache path) is for operators: other callers get the
        same response with those paths blank (security.current_caller().is_admin).
        """
        active, recent = self._service.tracker.snapshot()
        response = status_pb2.GetStatusResponse(
            service=self._service.service_name,
            loaded_models=self._service.loaded_models(),
            active_jobs=active,
            recent_jobs=recent,
            max_concurrent_jobs=self._service.tracker.max_active,
        )
        if not security.current_caller().is_admin:
            hide_paths(response)
        return response


def hide_paths(response: status_pb2.GetStatusResponse) -> None:
    """Blank the fields of a status that carry server paths (LoadedModel.source, the only one today)."""
    for model in response.loaded_models:
        model.ClearField("source")


def configure_logging(level: str) -> None:
    """Log to stderr (stdout carries only the listening line)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve(service: Service) -> int:
    """Run ``service`` until SIGTERM/SIGINT, then shut down gracefully; returns the process's exit status
    (2 when loading the models at start failed, after the message was printed)."""
    config = service.config
    drain = DrainInterceptor()
    credentials = security.server_credentials(config)  # None: plaintext, as without TLS flags
    tokens = security.TokenTable.load(config.auth_tokens_file) if config.auth_tokens_file else None
    # Who may call what (certificate kinds on a mutual TLS port, tokens when configured); sets current_caller().
    access = security.AccessInterceptor(client_auth=bool(config.tls_client_auth), tokens=tokens)
    server = grpc.aio.server(
        # Outermost first: telemetry sees every call and its final code, the drain guard refuses calls while
        # shutting down, identities and tokens are checked before any handler runs, errors map innermost.
        interceptors=[telemetry.TelemetryInterceptor(telemetry.short_name(service.service_name)), drain, access,
                      ErrorInterceptor()],
        options=grpc_options(config.max_message_bytes, config.keepalive_time_s, config.keepalive_timeout_s),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    status_pb2_grpc.add_StatusServiceServicer_to_server(StatusServicer(service), server)
    names = service.register(server)
    enable_reflection(
        [*names, status_pb2.DESCRIPTOR.services_by_name["StatusService"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
        server,
    )
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    if credentials is not None:
        port = server.add_secure_port(f"{config.host}:{config.port}", credentials)
    else:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise ConfigurationError(f"could not listen on {config.host}:{config.port} (port in use?)")
    address = f"{config.host}:{port}"
    telemetry.setup_tracing(telemetry.short_name(service.service_name), instance=address)
    listening = {"service": service.service_name, "address": address}
    if config.metrics_port is not None:
        listening["metrics_address"] = telemetry.start_metrics_server(config.metrics_port, config.host, config)
    await server.start()
    print(LISTENING_PREFIX + json.dumps(listening), flush=True)
    log.info("%s listening on %s%s%s", service.service_name, address, " (TLS)" if credentials else "",
             f", metrics on {listening['metrics_address']}" if "metrics_address" in listening else "")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    load = asyncio.create_task(service.load())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if load.done():
        if load.exception() is not None:
            exc = load.exception()
            # A domain error (a model folder, a setting, the registry) says what to fix; anything else is a
            # bug and gets its traceback in the log.
            log.error("loading failed: %s", exc, exc_info=not isinstance(exc, LatentwireError))
            print(f"error: {exc}", file=sys.stderr, flush=True)
            exit_code = 2
            stop.set()
        else:
            for name in ("", *names):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("%s is SERVING", service.service_name)
        await stopped
    else:
        load.cancel()

    log.info("shutting down: health NOT_SERVING, %.1f s grace for %d in-flight call(s)",
             config.grace_period_s, drain.active)
    await health_servicer.enter_graceful_shutdown()
    await service.begin_shutdown(config.grace_period_s)
    if not await drain.drain(config.grace_period_s):
        # Nobody cancelled these jobs: they end UNAVAILABLE (retryable), so the orchestrator continues them on
        # another replica or waits for one; the model's hooks stop them within a block (interrupt.py).
        stopped = service.tracker.interrupt_all(Unavailable(
            f"the {telemetry.short_name(service.service_name)} service stopped this job because it is shutting "
            "down; retry on another replica or after it restarts", reason="SHUTTING_DOWN"))
        log.warning("grace period over: stopping %d job(s) of %d call(s) still running", stopped, drain.active)
        if not await drain.drain(INTERRUPTED_CALLS_WAIT_S):
            log.warning("%d call(s) did not end in %.0f s; cancelling them", drain.active, INTERRUPTED_CALLS_WAIT_S)
    await server.stop(1.0)
    await service.close()
    telemetry.shutdown_tracing()
    return exit_code


def run(service_factory, parser, argv=None, *, needs_model: bool = True) -> None:
    """A service's main: parse config, build the service, serve it; exits with the service's status.

    The one place a service ends its process on purpose: a start-up problem (ConfigurationError,
    ModelFolderError) becomes one "error: ..." line on stderr and exit status 2.
    """
    from .config import parse_config

    try:
        config = parse_config(parser, argv, needs_model=needs_model)
        configure_logging(config.log_level)
        # Every channel this process opens presents the service's TLS identity (plaintext without TLS flags).
        security.set_default_channel_security(security.service_channel_security(config))
        service = service_factory(config)
        exit_code = asyncio.run(serve(service))
        # Served and shut down: what is left is the interpreter's exit, whose last garbage collection walks every
        # object torch, diffusers and grpc made (about 2.5 s of CPU per process). Frozen objects are skipped by
        # it; atexit hooks and finalizers still run. Exit takes 0.4 s instead of 2.5 s.
        gc.freeze()
    except (ConfigurationError, ModelFolderError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if exit_code:
        raise SystemExit(exit_code)


class ModelService(Service):
    """A service that holds models: local folders from ``--model`` or registry references, loaded on
    demand under ``--max-model-bytes``; serves latentwire.common.v1.ModelLoaderService."""

    #: Components of a pipeline folder this service needs (only these are fetched from the registry).
    components: tuple[str, ...] = ()

    def __init__(self, config: ServiceConfig):
        super().__init__(config)
        # Imported here so services without models (the orchestrator, the registry) do not load torch.
        from .device import resolve_device, resolve_dtype
        from .models import ModelStore

        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        self.models = ModelStore(
            config.models, self.device, self.dtype, self.load_model,
            components=self.components, registry=config.registry, cache_dir=config.cache_dir,
            allow_pickle=config.allow_pickle, max_bytes=config.max_model_bytes,
        )

    @abc.abstractmethod
    def load_model(self, spec):
        """Build this service's domain model from a ModelSpec with a local folder (blocking)."""

    def register_loader(self, server: grpc.aio.Server) -> str:
        from latentwire.common.v1 import loader_pb2, loader_pb2_grpc

        loader_pb2_grpc.add_ModelLoaderServiceServicer_to_server(ModelLoaderServicer(self), server)
        return loader_pb2.DESCRIPTOR.services_by_name["ModelLoaderService"].full_name

    async def load(self) -> None:
        await self.worker.run(self.models.load_defaults)

    def loaded_models(self) -> list[status_pb2.LoadedModel]:
        return self.models.describe()

    async def model_for(self, ref, on_loading=None):
        """The domain model a request's ModelReference names, loading it first when it is not in memory."""
        name = ref.name if ref is not None else ""
        loaded = self.models.lookup(name)
        if loaded is None:
            spec = await self.worker.run(self.models.resolve, name)
            loaded = self.models.lookup(spec.name)
            if loaded is None:
                if on_loading is not None:
                    await on_loading(spec.name)
                loaded = await self.worker.run(self.models.load, spec)
        return loaded

    async def run_job(self, job_id: str, fn, *args, work=None):
        """Admit a one-shot job, run ``fn(job, *args)`` on the worker pool and record how it ended.

        The job stops (interrupt.py) when the call's deadline passes or the call is cancelled; ``work``
        (jobs.Work) lets the service refuse it up front when its estimate cannot fit the deadline.
        """
        from .worker import tracked

        job = self.tracker.start(job_id, total_steps=1, work=work)

        def run():
            with tracked(self.tracker, job):
                result = fn(job, *args)
                job.completed_steps = 1
                return result

        return await self.worker.run(run, job=job)


class ModelLoaderServicer:
    """latentwire.common.v1.ModelLoaderService for a ModelService."""

    def __init__(self, service: ModelService):
        self._service = service

    async def LoadModel(self, request, context):
        """Make sure a model is in memory; stream LOADING first when it has to be loaded."""
        import time

        from latentwire.common.v1 import loader_pb2

        started = time.perf_counter()
        announced = []

        async def on_loading(key: str) -> None:
            announced.append(key)

        # Resolve first (fast when cached) so LOADING can be sent before the slow part.
        name = request.model.name
        loaded = self._service.models.lookup(name)
        if loaded is None:
            spec = await self._service.worker.run(self._service.models.resolve, name)
            if self._service.models.lookup(spec.name) is None:
                yield loader_pb2.LoadModelResponse(state=loader_pb2.LOAD_STATE_LOADING, model=spec.name)
            loaded = await self._service.model_for(request.model, on_loading)
        yield loader_pb2.LoadModelResponse(
            state=loader_pb2.LOAD_STATE_READY, model=loaded.spec.name, elapsed_seconds=time.perf_counter() - started
        )
