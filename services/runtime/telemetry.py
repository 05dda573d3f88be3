"""Traces and metrics, written once for every service.

Traces (OpenTelemetry): one request is one trace. A server interceptor continues the W3C
``traceparent`` a call carries and opens a SERVER span for it (a stream's span covers the whole
stream); client interceptors on every channel the runtime opens (``channels.aio_channel``,
``channels.sync_channel``) open a CLIENT span per outgoing call and send its context on. Work
handed to the worker threads keeps the context (``Worker`` copies it), so a call made from a
denoising loop is a child of its Denoise span.

Set-up follows the standard environment variables: ``OTEL_SERVICE_NAME`` (default
``latentwire-<service>``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(OTLP over gRPC), ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or ``none``), ``OTEL_BSP_*``
(batching), ``OTEL_TRACES_SAMPLER`` and ``OTEL_SDK_DISABLED=true`` (no SDK, no client interceptors:
no context is sent on). With no exporter (neither an endpoint nor ``console``/``otlp``) no span is
recorded: the caller's context passes through this service to the calls it makes, at no SDK cost.

Metrics (Prometheus): the series below live in this process's default registry and are served
at ``/metrics`` on ``--metrics-port`` (off unless set). Each service fills the ones it owns:
every server its RPC durations and bytes; the orchestrator queue depth, job and stage durations;
the denoiser its step durations; the classifier its batcher's batch sizes, queue waits, batches,
images, rejected calls and queued images (``latentwire_classifier_*``, by model).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram

from .interceptor import WrappingInterceptor, _wrap

log = logging.getLogger(__name__)

#: Calls that are neither traced nor measured: probes and discovery, and long health watches.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_TRACER_NAME = "latentwire"


def short_name(service_name: str) -> str:
    """The word a service goes by in metrics and span names: latentwire.text_encoder.v1.X -> text_encoder."""
    parts = service_name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "latentwire" else service_name


def _tracer() -> trace.Tracer:
    # Looked up per use: a provider installed later (setup, or a test's) takes effect at once.
    return trace.get_tracer(_TRACER_NAME)


# ----------------------------------------------------------------------------------------------
# Metrics

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LONG_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The Prometheus series latentwire exports (one set per process)."""

    def __init__(self, registry=None):
        from prometheus_client import REGISTRY

        registry = registry or REGISTRY
        self.queue_depth = Gauge(
            "latentwire_queue_depth", "Generate jobs accepted and waiting in the orchestrator's queue (not running)",
            registry=registry)
        self.job_duration = Histogram(
            "latentwire_job_duration_seconds",
            "Orchestrator jobs from acceptance to their end, by outcome (succeeded, failed, cancelled)",
            ["outcome"], buckets=_LONG_SECONDS, registry=registry)
        self.stage_duration = Histogram(
            "latentwire_stage_duration_seconds",
            "Time the orchestrator waited on each stage of a job (text_encoder, vae_encode, denoiser, vae)",
            ["stage"], buckets=_SECONDS + (120.0, 300.0, 600.0), registry=registry)
        self.denoise_step = Histogram(
            "latentwire_denoise_step_seconds", "Duration of one denoising step on the denoiser (UNet, "
            "ControlNet residuals, scheduler step)", buckets=(0.001, 0.0025) + _SECONDS, registry=registry)
        # The denoiser's step-level batching (services/denoiser/step_batching.py).
        self.denoise_batch_jobs = Histogram(
            "latentwire_denoise_batch_jobs", "Jobs that shared one network forward of the denoiser's step-level "
            "batching (1: a job alone)", buckets=_BATCH_SIZES, registry=registry)
        self.bytes_sent = Counter(
            "latentwire_bytes_sent", "Serialized response bytes a service sent, by gRPC method",
            ["service", "method"], registry=registry)
        self.bytes_received = Counter(
            "latentwire_bytes_received", "Serialized request bytes a service received, by gRPC method",
            ["service", "method"], registry=registry)
        self.rpc_duration = Histogram(
            "latentwire_rpc_duration_seconds", "Server-side duration of each RPC (a stream: until it ends), "
            "by method and status code", ["service", "method", "code"], buckets=_SECONDS + (120.0, 300.0, 600.0),
            registry=registry)
        # The classifier's dynamic batcher (services/classifier/batcher.py), per served model name.
        self.classifier_batch_size = Histogram(
            "latentwire_classifier_batch_size", "Images per model execution of the classifier's batcher, by model",
            ["model"], buckets=_BATCH_SIZES, registry=registry)
        self.classifier_queue_wait = Histogram(
            "latentwire_classifier_queue_wait_seconds", "Time an image waited in the classifier batcher's queue "
            "before its batch started, by model", ["model"], buckets=(0.0005, 0.001, 0.0025) + _SECONDS,
            registry=registry)
        self.classifier_batch_compute = Histogram(
            "latentwire_classifier_batch_compute_seconds", "Duration of one batched forward pass of the classifier, "
            "by model", ["model"], buckets=(0.001, 0.0025) + _SECONDS, registry=registry)
        self.classifier_batches = Counter(
            "latentwire_classifier_batches", "Model executions (batches) the classifier's batcher ran, by model",
            ["model"], registry=registry)
        self.classifier_images = Counter(
            "latentwire_classifier_images", "Images the classifier's batcher ran, by model", ["model"],
            registry=registry)
        self.classifier_rejected = Counter(
            "latentwire_classifier_requests_rejected", "Classify calls the batcher refused because its queue was full "
            "(RESOURCE_EXHAUSTED, QUEUE_FULL), by model", ["model"], registry=registry)
        self.classifier_queued = Gauge(
            "latentwire_classifier_queued_images", "Images waiting in the classifier batcher's queue, by model",
            ["model"], registry=registry)


#: This process's series; the orchestrator calls e.g. ``metrics.queue_depth.set(n)``.
metrics = Metrics()


def observe_job(outcome: str, seconds: float) -> None:
    """Record one finished orchestrator job: ``outcome`` is "succeeded", "failed" or "cancelled"."""
    metrics.job_duration.labels(outcome=outcome).observe(seconds)


def observe_stages(timings) -> None:
    """Record a job's per-stage waits from its ``StageTiming`` list (stage, seconds)."""
    for timing in timings:
        metrics.stage_duration.labels(stage=timing.stage).observe(timing.seconds)


def start_metrics_server(port: int, host: str, config=None) -> str:
    """Serve /metrics over HTTP on ``host:port`` (0: a free port); returns the bound ``host:port``.

    When the service has a TLS identity the endpoint serves HTTPS with it, and with
    ``--tls-client-auth`` asks scrapers for a certificate signed by ``--tls-ca``.
    """
    from prometheus_client import start_http_server

    tls = {}
    if config is not None and config.tls_cert and config.tls_key:
        tls = dict(certfile=config.tls_cert, keyfile=config.tls_key, client_cafile=config.tls_ca,
                   client_auth_required=bool(config.tls_client_auth))
    server, _ = start_http_server(port, addr=host, **tls)
    return f"{host}:{server.server_port}"


# ----------------------------------------------------------------------------------------------
# Tracing set-up

_provider = None


def setup_tracing(service: str, instance: str = "") -> None:
    """Install this process's tracer provider from the OTEL_* environment (see the module docstring)."""
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or not (endpoint or exporter_name in ("console", "otlp")):
        # Nothing would export the spans: no SDK provider, so none is recorded. The API's tracer still continues
        # the caller's context (a non-recording span with the caller's ids), which the client interceptors send on,
        # so a trace stays whole through this service; recording spans nobody exports cost each call ~0.3 ms of
        # CPU on the server and ~0.25 ms on the caller (docs/benchmarks.md, "Each RPC's own cost").
        return
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {}
    if "service.name" not in OTELResourceDetector().detect().attributes:
        attributes["service.name"] = f"latentwire-{service}"
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, TLS, headers, timeout from OTEL_EXPORTER_OTLP_*
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("exporting traces with %s%s", type(exporter).__name__, f" to {endpoint}" if endpoint else "")
    trace.set_tracer_provider(provider)
    _provider = provider


def shutdown_tracing() -> None:
    """Export what is still batched (called once the server stopped)."""
    if _provider is not None:
        _provider.shutdown()


# ----------------------------------------------------------------------------------------------
# Server side


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "OK" if code is None else "UNKNOWN"


def _count_bytes(handler: grpc.RpcMethodHandler, service: str, method: str) -> grpc.RpcMethodHandler:
    """The same handler, counting each serialized request and response on its way through."""
    if not hasattr(handler, "_replace"):
        return handler
    received = metrics.bytes_received.labels(service=service, method=method)
    sent = metrics.bytes_sent.labels(service=service, method=method)
    deserialize, serialize = handler.request_deserializer, handler.response_serializer

    def counted_deserialize(data: bytes):
        received.inc(len(data))
        return deserialize(data) if deserialize is not None else data

    def counted_serialize(message) -> bytes:
        data = serialize(message) if serialize is not None else message
        sent.inc(len(data))
        return data

    return handler._replace(request_deserializer=counted_deserialize, response_serializer=counted_serialize)


class TelemetryInterceptor(WrappingInterceptor):
    """A SERVER span per call (parent from the caller's traceparent), its duration and bytes as metrics.

    Outermost of the server's interceptors, so refusals (draining, tokens) are measured too.
    """

    def __init__(self, service: str):
        super().__init__()
        self._service = service

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(UNTRACED_PREFIXES):
            return handler
        handler = _count_bytes(handler, self._service, method)
        return _wrap(handler, method, self._guard)

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, context: grpc.aio.ServicerContext):
        metadata = context.invocation_metadata() or ()
        parent = propagate.extract({k: v for k, v in metadata if isinstance(v, str)})
        rpc_service, _, rpc_method = method.lstrip("/").partition("/")
        started = time.perf_counter()
        code = "OK"
        with _tracer().start_as_current_span(
            method.lstrip("/"), context=parent, kind=SpanKind.SERVER, record_exception=False,
            set_status_on_exception=False,
            attributes={"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method},
        ) as span:
            try:
                yield
                code = _code_name(context.code())
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", getattr(grpc.StatusCode, code).value[0])
                if code != "OK":
                    span.set_status(Status(StatusCode.ERROR, code))
                metrics.rpc_duration.labels(service=self._service, method=method, code=code).observe(
                    time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Client side


def _client_span(method: str):
    """Start a CLIENT span for an outgoing call under the current context; return it and the metadata to add."""
    rpc_service, _, rpc_method = method.lstrip("/").partition("/")
    span = _tracer().start_span(method.lstrip("/"), kind=SpanKind.CLIENT,
                                attributes={"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method})
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, list(carrier.items())


def _end_span(span, code_name: str) -> None:
    span.set_attribute("rpc.grpc.status_code", getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN).value[0])
    if code_name != "OK":
        span.set_status(Status(StatusCode.ERROR, code_name))
    span.end()


def _method_name(method) -> str:
    return method.decode() if isinstance(method, bytes) else method


class _AioClient:
    """Shared part of the four grpc.aio client interceptors (grpc.aio wants one object per call kind)."""

    _pending: set = set()

    async def _call(self, continuation, details, request):
        span, extra = _client_span(_method_name(details.method))
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()), *extra)
        try:
            call = await continuation(details._replace(metadata=metadata), request)
        except BaseException:
            _end_span(span, "UNKNOWN")
            raise

        def done(finished) -> None:
            # code() is a coroutine on grpc.aio calls; the call is over, so it answers at once.
            try:
                task = asyncio.get_running_loop().create_task(_finish(span, finished))
            except RuntimeError:  # no loop any more: end without a code
                span.end()
                return
            _AioClient._pending.add(task)
            task.add_done_callback(_AioClient._pending.discard)

        call.add_done_callback(done)
        return call


async def _finish(span, call) -> None:
    try:
        code = await call.code()
    except BaseException:  # noqa: BLE001 - a cancelled call may not answer
        code = grpc.StatusCode.CANCELLED
    _end_span(span, _code_name(code))


class _AioUnaryUnary(_AioClient, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _AioUnaryStream(_AioClient, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _AioStreamUnary(_AioClient, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


class _AioStreamStream(_AioClient, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


def aio_client_interceptors() -> list:
    """Interceptors for a grpc.aio channel: a CLIENT span per call, its context sent as traceparent."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    return [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]


class SyncClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The same for blocking channels (grpc.intercept_channel), e.g. the denoiser's ControlNet stream,
    which runs on a worker thread: the span's parent is the context the thread was given."""

    def _call(self, continuation, details, request):
        from latentwire.client.security import replace_metadata

        span, extra = _client_span(_method_name(details.method))
        try:
            call = continuation(replace_metadata(details, [*(details.metadata or ()), *extra]), request)
        except BaseException:
            _end_span(span, "UNKNOWN")
            raise
        lock = threading.Lock()
        ended = []

        def done(finished) -> None:
            with lock:
                if ended:
                    return
                ended.append(True)
            try:
                code = finished.code()
            except Exception:  # noqa: BLE001
                code = None
            _end_span(span, _code_name(code) if code is not None else "UNKNOWN")

        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._call(continuation, client_call_details, request_iterator)


def sync_client_interceptors() -> list:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    return [SyncClientInterceptor()]
