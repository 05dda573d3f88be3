"""Traces and metrics: one request is one trace across every stage; the metrics endpoints serve the series.

The services run in their own processes and export their spans over OTLP/gRPC to a small
collector run by this test (opentelemetry-proto's TraceService). The test itself is the client:
its spans go to an in-memory exporter, and it opens the root span whose context the request
carries, so every span of the request must share that root's trace id.
"""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from latentwire.client import control
from latentwire.common.v1 import loader_pb2, loader_pb2_grpc, status_pb2, status_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2_grpc
from services.runtime import telemetry
from services.runtime.channels import aio_channel, sync_channel
from services.runtime.interceptor import ErrorInterceptor
from services.runtime.worker import Worker
from services.suite.launcher import start_suite

STEPS = 3
STAGES = ("orchestrator", "text_encoder", "denoiser", "vae", "controlnet")
SERIES = ("latentwire_queue_depth", "latentwire_job_duration_seconds", "latentwire_stage_duration_seconds",
          "latentwire_denoise_step_seconds", "latentwire_bytes_sent", "latentwire_bytes_received",
          "latentwire_rpc_duration_seconds")


# --- the test process's own tracing: an in-memory exporter ----------------------------------


@pytest.fixture(scope="module")
def memory_exporter() -> InMemorySpanExporter:
    """This process's tracer provider, exporting to memory (installed once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def _parent_chain(span, by_id) -> list[str]:
    names = []
    while span is not None:
        names.append(span.name)
        span = by_id.get(span.parent.span_id) if span.parent is not None else None
    return names


# --- in-process: the interceptors and the worker-thread hand-over ---------------------------


class _Relay(status_pb2_grpc.StatusServiceServicer, loader_pb2_grpc.ModelLoaderServiceServicer):
    """GetStatus calls the next server from a worker thread over a blocking channel (as the denoiser calls
    ControlNet); LoadModel streams two events 0.2 s apart."""

    def __init__(self, name: str, next_address: str | None):
        self.name, self.next_address, self.worker = name, next_address, Worker(1)

    async def GetStatus(self, request, context):
        def call_next():
            if self.next_address is None:
                return
            with sync_channel(self.next_address) as channel:
                status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)

        await self.worker.run(call_next)
        return status_pb2.GetStatusResponse(service=self.name)

    async def LoadModel(self, request, context):
        yield loader_pb2.LoadModelResponse(state=loader_pb2.LOAD_STATE_LOADING, model="m")
        await asyncio.sleep(0.2)
        yield loader_pb2.LoadModelResponse(state=loader_pb2.LOAD_STATE_READY, model="m")


async def _start_relay(name: str, next_address: str | None):
    server = grpc.aio.server(interceptors=[telemetry.TelemetryInterceptor(name), ErrorInterceptor()])
    relay = _Relay(name, next_address)
    status_pb2_grpc.add_StatusServiceServicer_to_server(relay, server)
    loader_pb2_grpc.add_ModelLoaderServiceServicer_to_server(relay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_trace_continues_across_servers_streams_and_worker_threads(memory_exporter):
    memory_exporter.clear()

    async def scenario():
        back, back_address = await _start_relay("back", None)
        front, front_address = await _start_relay("front", back_address)
        try:
            with trace.get_tracer("test").start_as_current_span("caller") as root:
                channel = aio_channel(front_address)
                await status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest())
                events = [e async for e in loader_pb2_grpc.ModelLoaderServiceStub(channel).LoadModel(
                    loader_pb2.LoadModelRequest())]
                await channel.close()
            await asyncio.sleep(0.1)  # client spans end from the calls' done callbacks
            return root, events
        finally:
            await front.stop(None)
            await back.stop(None)

    root, events = asyncio.run(scenario())
    assert len(events) == 2
    spans = memory_exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    trace_id = root.get_span_context().trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}, "every span belongs to the caller's trace"
    status = "latentwire.common.v1.StatusService/GetStatus"
    servers = [s for s in spans if s.name == status and s.kind == trace.SpanKind.SERVER]
    assert len(servers) == 2
    # The back server's span descends from the front server's, through the client span made on the worker thread.
    deepest = max(servers, key=lambda s: len(_parent_chain(s, by_id)))
    assert _parent_chain(deepest, by_id) == [status, status, status, status, "caller"]
    assert [by_id[deepest.parent.span_id].kind, by_id[by_id[deepest.parent.span_id].parent.span_id].kind] == [
        trace.SpanKind.CLIENT, trace.SpanKind.SERVER]
    stream = [s for s in spans if s.name.endswith("/LoadModel") and s.kind == trace.SpanKind.SERVER]
    assert len(stream) == 1 and (stream[0].end_time - stream[0].start_time) >= 0.2e9, "a stream's span covers it"
    assert stream[0].attributes["rpc.grpc.status_code"] == 0


# --- the suite: a collector, every service exporting to it ----------------------------------


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span with its service.name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, trace_id: bytes, expected: set[tuple[str, str]], timeout: float) -> list[tuple[str, object]]:
        """The spans of one trace, once ``expected`` (service.name, span name) pairs have all arrived (or at
        ``timeout``): a span is exported when it ends, the request's outermost ones last."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [(s, span) for s, span in self.spans if span.trace_id == trace_id]
            if expected <= {(s, span.name) for s, span in found} or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@pytest.fixture(scope="module")
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    receiver = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    server.stop(None)


@pytest.fixture(scope="module")
def traced_suite(tiny_model, tiny_controlnets, collector, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("observability-logs")
    metrics = ["--metrics-port", "0"]
    running = start_suite(
        tiny_model, ports=dict.fromkeys(STAGES, 0), log_dir=log_dir, controlnet=tiny_controlnets[0],
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
        extra_args=dict.fromkeys(STAGES, metrics),
    )
    yield running
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exit codes {codes}; logs in {log_dir}"


def _control_image() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _generate(address: str):
    """One Generate with a ControlNet unit, from inside the test's root span (its context travels as traceparent)."""
    from latentwire.client import Client

    request = Client.build_request("a red cube", seed=3, steps=STEPS, guidance_scale=2.0,
                                   controlnets=[control(_control_image(), "none")])
    with trace.get_tracer("test").start_as_current_span("client generate") as root:
        with sync_channel(address) as channel:
            events = list(orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate(request, timeout=120))
    return root, events


def _scrape(address: str) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(families, family: str, sample: str, **labels) -> float:
    matches = [s.value for s in families.get(family, []) if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{sample}{labels}: {matches}"
    return matches[0]


@pytest.mark.slow
def test_one_trace_holds_every_stage(traced_suite, collector, memory_exporter):
    memory_exporter.clear()
    root, events = _generate(traced_suite.address)
    assert events[-1].HasField("result") and len(events[-1].result.images) == 1

    local = memory_exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    assert [s.name for s in local if s.context.trace_id == trace_id][-1] == "client generate"
    expected = {("latentwire-orchestrator", "latentwire.orchestrator.v1.OrchestratorService/Generate"),
                ("latentwire-text_encoder", "latentwire.text_encoder.v1.TextEncoderService/Encode"),
                ("latentwire-denoiser", "latentwire.denoiser.v1.DenoiserService/Denoise"),
                ("latentwire-vae", "latentwire.vae.v1.VaeService/Decode"),
                ("latentwire-controlnet", "latentwire.controlnet.v1.ControlNetService/ComputeResiduals")}
    found = collector.wait_for(trace_id.to_bytes(16, "big"), expected, timeout=20)
    services = {service for service, _ in found}
    assert services >= {f"latentwire-{name}" for name in STAGES}, f"spans arrived only from {sorted(services)}"

    by_id = {span.span_id: (service, span) for service, span in found}

    def server_span(service: str, method: str):
        spans = [span for s, span in found if s == f"latentwire-{service}" and span.name.endswith("/" + method)
                 and span.kind == span.SPAN_KIND_SERVER]
        assert len(spans) == 1, f"{service} {method}: {len(spans)} server spans"
        return spans[0]

    def ancestors(span) -> list[str]:
        chain = []
        while span.parent_span_id in by_id:
            service, span = by_id[span.parent_span_id]
            chain.append(f"{service}:{span.name.rpartition('/')[2]}")
        return chain

    # The orchestrator continues the caller's trace: its Generate span's parent is this process's client span.
    generate = server_span("orchestrator", "Generate")
    caller = {s.context.span_id: s for s in local}[int.from_bytes(generate.parent_span_id, "big")]
    assert caller.kind == trace.SpanKind.CLIENT and caller.parent.span_id == root.get_span_context().span_id
    for service, method in (("text_encoder", "Encode"), ("denoiser", "Denoise"), ("vae", "Decode")):
        assert ancestors(server_span(service, method)) == [f"latentwire-orchestrator:{method}",
                                                           "latentwire-orchestrator:Generate"]
    # The denoiser calls the ControlNet service from its worker thread: still under the Denoise span.
    assert ancestors(server_span("controlnet", "ComputeResiduals")) == [
        "latentwire-denoiser:ComputeResiduals", "latentwire-denoiser:Denoise", "latentwire-orchestrator:Denoise",
        "latentwire-orchestrator:Generate"]
    denoise = server_span("denoiser", "Denoise")
    assert denoise.end_time_unix_nano - denoise.start_time_unix_nano > 0


@pytest.mark.slow
def test_metrics_endpoints_serve_the_series(traced_suite, tiny_model):
    # A request of its own, so the counts below are known however the tests are ordered.
    before = {name: _scrape(traced_suite.services[name].metrics_address) for name in ("orchestrator", "denoiser")}
    root, events = _generate(traced_suite.address)
    assert events[-1].HasField("result")
    after = {name: _scrape(s.metrics_address) for name, s in traced_suite.services.items()}

    for name in STAGES:
        assert set(SERIES) <= set(after[name]), f"{name} misses {set(SERIES) - set(after[name])}"

    def delta(process, family, sample, **labels):
        old = before[process]
        has_old = any(s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
                      for s in old.get(family, []))
        return _value(after[process], family, sample, **labels) - (
            _value(old, family, sample, **labels) if has_old else 0.0)

    orchestrator, denoiser = "orchestrator", "denoiser"
    for stage in ("text_encoder", "denoiser", "vae"):
        assert delta(orchestrator, "latentwire_stage_duration_seconds", "latentwire_stage_duration_seconds_count",
                     stage=stage) == 1
    assert delta(denoiser, "latentwire_denoise_step_seconds", "latentwire_denoise_step_seconds_count") == STEPS
    step_sum = delta(denoiser, "latentwire_denoise_step_seconds", "latentwire_denoise_step_seconds_sum")
    assert 0 < step_sum < 60
    generate = "/latentwire.orchestrator.v1.OrchestratorService/Generate"
    assert delta(orchestrator, "latentwire_rpc_duration_seconds", "latentwire_rpc_duration_seconds_count",
                 service="orchestrator", method=generate, code="OK") == 1
    # Bytes: the Denoise request carries the prompt embeddings (batch 2 with guidance, 77 tokens, float32).
    denoise = "/latentwire.denoiser.v1.DenoiserService/Denoise"
    received = delta(denoiser, "latentwire_bytes_received", "latentwire_bytes_received_total",
                     service="denoiser", method=denoise)
    hidden = json.loads((tiny_model / "text_encoder" / "config.json").read_text())["hidden_size"]
    assert received > 2 * 77 * hidden * 4
    sent = delta(orchestrator, "latentwire_bytes_sent", "latentwire_bytes_sent_total",
                 service="orchestrator", method=generate)
    assert sent == sum(event.ByteSize() for event in events), "every serialized response byte is counted"
    assert _value(after[orchestrator], "latentwire_queue_depth", "latentwire_queue_depth") == 0
    assert delta(orchestrator, "latentwire_job_duration_seconds", "latentwire_job_duration_seconds_count",
                 outcome="succeeded") == 1


@pytest.mark.slow
def test_health_is_neither_traced_nor_measured(traced_suite):
    with grpc.insecure_channel(traced_suite.services["vae"].address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    families = _scrape(traced_suite.services["vae"].metrics_address)
    methods = {s.labels.get("method") for s in families["latentwire_rpc_duration_seconds"]}
    assert not any(m and m.startswith("/grpc.health") for m in methods)


# --- no exporter: no span recorded, the caller's context still passes through -----------------

_PASS_THROUGH = r'''
import asyncio, json, sys
import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from services.runtime import telemetry
from services.runtime.channels import aio_channel
from services.runtime.interceptor import ErrorInterceptor

telemetry.setup_tracing("front")  # as a service does, from this (exporter-less) environment
seen = {}


class Back(status_pb2_grpc.StatusServiceServicer):
    async def GetStatus(self, request, context):
        seen["traceparent"] = dict(context.invocation_metadata()).get("traceparent", "")
        return status_pb2.GetStatusResponse(service="back")


class Front(status_pb2_grpc.StatusServiceServicer):
    def __init__(self, back):
        self.back = back

    async def GetStatus(self, request, context):
        seen["recording"] = trace.get_current_span().is_recording()
        channel = aio_channel(self.back)
        await status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
        await channel.close()
        return status_pb2.GetStatusResponse(service="front")


async def start(servicer):
    server = grpc.aio.server(interceptors=[telemetry.TelemetryInterceptor("x"), ErrorInterceptor()])
    status_pb2_grpc.add_StatusServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def main():
    back, back_address = await start(Back())
    front, front_address = await start(Front(back_address))
    async with grpc.aio.insecure_channel(front_address) as channel:
        await status_pb2_grpc.StatusServiceStub(channel).GetStatus(
            status_pb2.GetStatusRequest(), metadata=(("traceparent", sys.argv[1]),), timeout=10)
    await front.stop(None)
    await back.stop(None)
    seen["sdk_provider"] = isinstance(trace.get_tracer_provider(), TracerProvider)
    print(json.dumps(seen))


asyncio.run(main())
'''


def test_without_an_exporter_no_span_is_recorded_and_the_callers_context_passes_through():
    """A service with no exporter configured installs no SDK provider (recording spans nobody exports cost each
    call CPU), yet a call it makes carries its caller's trace and span ids on, so a trace stays whole."""
    import os
    import subprocess
    import sys

    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", _PASS_THROUGH, caller], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"recording": False, "traceparent": caller, "sdk_provider": False}

    # With an exporter (here the console's), the SDK provider is installed and spans are recorded.
    env["OTEL_TRACES_EXPORTER"] = "console"
    done = subprocess.run([sys.executable, "-c", _PASS_THROUGH, caller], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"recording"')))
    assert seen["recording"] is True and seen["sdk_provider"] is True
    # The front service's own CLIENT span is the back's parent now: same trace, another span id.
    trace_id, span_id = caller.split("-")[1:3]
    assert seen["traceparent"].split("-")[1] == trace_id and seen["traceparent"].split("-")[2] != span_id
