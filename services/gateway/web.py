"""The gateway's web page: the static UI at ``/`` and the JSON / server-sent-events endpoints it calls, ``/ui/api/...``.

The page is plain HTML, CSS and JavaScript (services/gateway/static/; nothing is fetched at run time). Every
endpoint is a thin translation onto the suite's gRPC calls made for the calling user (``current_user``, with the
user's suite token, so the user sees and cancels only the user's own jobs):

==================================  ======================================================================
POST /ui/api/generate               Generate through the orchestrator's queue; answers the call's events as
                                    server-sent events: accepted, queued, stage, progress (step, total, live
                                    preview), result, failure, end (the job runs on if the page goes away)
GET  /ui/api/jobs/{id}/events       the same events for a job already running, fed by WatchJob (re-attach)
POST /ui/api/jobs/{id}/cancel       CancelJob
GET  /ui/api/jobs                   ListJobs: the gallery, newest first, a page at a time
GET  /ui/api/jobs/{id}              GetJob: state, parameters (the first image's infotext) and image URLs
GET  /ui/api/jobs/{id}/images/{i}   the PNG of image i of a succeeded job
GET  /ui/api/options                samplers, schedule types and models for the pickers
POST /ui/api/classify               ClassifierService.Classify through the orchestrator, top 5
==================================  ======================================================================

Images travel as data URLs in JSON bodies (no multipart parser needed). Errors are answered as the REST API's
(services/gateway/errors.py): ``{"error", "detail", "reason"}``, a suite error keeping its ErrorInfo reason.
"""
from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Annotated, AsyncIterator

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from latentwire.classifier.v1 import classifier_pb2
from latentwire.client.infotext import parse_parameters, png_parameters
from latentwire.client.result_chunks import ResultAssembler, assemble_async, is_chunked
from latentwire.client.samplers import SAMPLERS, SCHEDULE_TYPES
from latentwire.common.v1 import model_pb2, preview_pb2, status_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.registry.v1 import registry_pb2
from services.runtime.errors import InvalidArgument, NotFound

from . import routes
from .a1111 import decode_image
from .auth import User, current_user
from .errors import SuiteCallError

__all__ = ["router", "sse_event"]

router = APIRouter()

#: The page's files, by the name the page asks for (a fixed list: no path from a request reaches the disk).
STATIC_DIR = Path(__file__).parent / "static"
_STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}

#: Gallery page size.
GALLERY_PAGE_SIZE = 24
#: Labels the classify tab shows.
CLASSIFY_TOP_K = 5
#: Job ids the orchestrator hands out (uuid hex); anything else never reaches a gRPC call.
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_STATE_NAMES = {status_pb2.JOB_STATE_QUEUED: "queued", status_pb2.JOB_STATE_RUNNING: "running",
                status_pb2.JOB_STATE_SUCCEEDED: "succeeded", status_pb2.JOB_STATE_FAILED: "failed",
                status_pb2.JOB_STATE_CANCELLED: "cancelled"}
#: google.rpc.Code number -> grpc.StatusCode (a classifier ImageError carries the number).
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _job_id(value: str) -> str:
    """A job id from the URL, checked before it reaches a gRPC call."""
    if not _JOB_ID.match(value):
        raise NotFound("no such job: take a job id from the gallery", reason="JOB_NOT_FOUND")
    return value


class ControlNetUnitBody(BaseModel):
    """The page's ControlNet unit."""

    image: str = Field(min_length=1, description="control image, a base64 data URL")
    model: str = Field("", max_length=256, description="ControlNet model; empty: the ControlNet service's default")
    preprocessor: str = Field("none", max_length=64, description='preprocessor ("none" passes the image through)')
    weight: float = Field(1.0, ge=0, le=10, description="conditioning scale")


class GenerateBody(BaseModel):
    """What the page's form sends to start a generation."""

    prompt: str = Field(min_length=1, max_length=20000)
    negative_prompt: str = Field("", max_length=20000)
    model: str = Field("", max_length=256, description="model name; empty: the suite's default")
    width: int = Field(0, ge=0, le=8192, description="pixels, a multiple of 8; 0: the model's default")
    height: int = Field(0, ge=0, le=8192, description="pixels, a multiple of 8; 0: the model's default")
    steps: int = Field(20, ge=1, le=10000)
    sampler: str = Field("", max_length=64, description="A1111 sampler name; empty: the model's own scheduler")
    schedule_type: str = Field("", max_length=64)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    seed: int = Field(-1, ge=-1, lt=2**64, description="-1: a random seed")
    batch_size: int = Field(1, ge=1, le=64)
    init_image: str = Field("", description="image-to-image / inpainting source, a base64 data URL")
    mask: str = Field("", description="inpainting mask (white: repaint), a base64 data URL; needs init_image")
    strength: float | None = Field(None, ge=0, le=1, description="denoising strength of image-to-image")
    controlnet: ControlNetUnitBody | None = None


def generate_request(body: GenerateBody, preview_interval: int) -> orchestrator_pb2.GenerateRequest:
    """The orchestrator request the page's form stands for."""
    request = orchestrator_pb2.GenerateRequest(
        model=model_pb2.ModelReference(name=body.model), prompt=body.prompt, negative_prompt=body.negative_prompt,
        num_inference_steps=body.steps, guidance_scale=body.cfg_scale, width=body.width, height=body.height,
        num_images=body.batch_size, sampler=body.sampler,
        schedule_type=body.schedule_type if body.sampler else "")
    if body.seed >= 0:
        request.seed = body.seed
    if preview_interval > 0:
        request.previews.CopyFrom(preview_pb2.PreviewOptions(interval=preview_interval, format="jpeg"))
    if body.mask and not body.init_image:
        raise InvalidArgument("mask: upload the image the mask is drawn on as well", reason="MISSING_INIT_IMAGE",
                              metadata={"field": "mask"})
    if body.init_image:
        request.init_image = decode_image(body.init_image, "init_image")
        if body.mask:
            request.mask_image = decode_image(body.mask, "mask")
        if body.strength is not None:
            request.strength = body.strength
    if body.controlnet is not None:
        unit = controlnet_pb2.ControlNetUnit(
            model=model_pb2.ModelReference(name=body.controlnet.model),
            image=decode_image(body.controlnet.image, "controlnet.image"),
            preprocessor=body.controlnet.preprocessor or "none", conditioning_scale=body.controlnet.weight)
        request.controlnets.append(unit)
    return request


def _suite(request: Request):
    return request.app.state.suite


def _preview_interval(request: Request) -> int:
    """Steps between two live previews (--preview-interval; 0: none)."""
    return request.app.state.settings.preview_interval


Caller = Annotated[User, Depends(current_user)]


@router.get("/", include_in_schema=False)
async def page(user: Caller) -> FileResponse:
    """The web page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/ui/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    """The page's script and style sheet (public, like any page asset)."""
    media_type = _STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound("no such file", reason="NOT_FOUND")
    return FileResponse(STATIC_DIR / name, media_type=media_type)


@router.get("/ui/api/options", tags=["web page"])
async def options(request: Request, user: Caller) -> dict:
    """Samplers with their schedule types, every schedule type, and the models the pickers offer: the suite's
    own (--model) and the registry's pipeline models (as /sdapi/v1/sd-models lists them), the registry's
    ControlNets."""
    names = list(request.app.state.settings.models)
    try:
        registry = await routes._registry_models(request, user)
    except SuiteCallError:
        registry = []  # the pickers still take a typed name, and empty for the default
    names += [name for name, kind in registry if kind in routes.CHECKPOINT_KINDS and name not in names]
    return {
        "samplers": [{"name": s.name, "schedule_types": list(s.schedule_types), "flow_matching": s.flow_matching}
                     for s in SAMPLERS],
        "schedule_types": [t.name for t in SCHEDULE_TYPES],
        "models": names,
        # The checkpoint the REST API runs on (/sdapi/v1/options), which the page's picker starts with.
        "current_model": request.app.state.options.get("sd_model_checkpoint", ""),
        "controlnet_models": [name for name, kind in registry if kind == registry_pb2.MODEL_KIND_CONTROLNET],
        "preview_interval": _preview_interval(request),
    }


@router.post("/ui/api/generate", tags=["web page"])
async def generate(body: GenerateBody, request: Request, user: Caller) -> Response:
    """Queue a generation and stream its events (server-sent events, as ``/ui/api/jobs/{id}/events`` does),
    straight from the Generate call, so no step is missed however fast the job runs.

    A refusal (bad settings, a full queue) is answered as an HTTP error before the stream starts: the first event
    is read first. Leaving the stream does not cancel the job (cancel_on_disconnect is off): the gallery has it, and
    the events endpoint re-attaches to it."""
    message = generate_request(body, _preview_interval(request))
    suite = _suite(request)
    call = suite.orchestrator.Generate(message, metadata=suite.call_metadata(user))
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise SuiteCallError.of(error) from None
    if first is grpc.aio.EOF or first.WhichOneof("event") != "accepted":
        call.cancel()
        raise SuiteCallError(grpc.StatusCode.INTERNAL, "the suite ended the job without accepting it", "INTERNAL")
    return _event_stream(first.accepted.job_id, call, first)


def sse_event(kind: str, data: dict) -> bytes:
    """One server-sent event: ``event: KIND`` and its JSON ``data`` line."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def page_event(job_id: str, event: orchestrator_pb2.GenerateResponse) -> tuple[str, dict] | None:
    """A Generate / WatchJob event as the page's (kind, data); None for an event the page does not show."""
    kind = event.WhichOneof("event")
    if kind == "accepted":
        return "accepted", {"job_id": event.accepted.job_id, "seed": str(event.accepted.seed),
                            "model": event.accepted.model}
    if kind == "queued":
        return "queued", {"position": event.queued.position, "queue_length": event.queued.queue_length}
    if kind == "step":
        step = event.step
        preview = (f"data:image/{step.preview_format or 'jpeg'};base64,{base64.b64encode(step.preview_image).decode()}"
                   if step.preview_image else None)
        return "progress", {"step": step.step, "total": step.total_steps,
                            "elapsed_seconds": round(step.elapsed_seconds, 3), "preview": preview}
    if kind == "result":
        result = event.result
        return "result", {
            "job_id": job_id, "seed": str(result.seed), "model": result.model,
            "total_seconds": round(result.total_seconds, 3),
            "images": [f"/ui/api/jobs/{job_id}/images/{image.index}" for image in result.images],
            "parameters": _infotext(result.images[0].png) if result.images else ""}
    if kind == "model_loading":
        return "stage", {"stage": event.model_loading.stage,
                         "text": f"{'loaded' if event.model_loading.done else 'loading'} {event.model_loading.model}"}
    if kind in ("text_encoded", "image_encoded", "decoded"):
        return "stage", {"stage": kind, "text": kind.replace("_", " ")}
    if kind == "grid_cell":
        return "stage", {"stage": "grid_cell", "text": f"grid cell {event.grid_cell.cell.index + 1} of "
                                                       f"{event.grid_cell.cell_count}"}
    return None


def _infotext(png: bytes) -> str:
    try:
        return png_parameters(png)
    except (ValueError, OSError):
        return ""


@router.get("/ui/api/jobs/{job_id}/events", tags=["web page"])
async def job_events(job_id: str, request: Request, user: Caller) -> Response:
    """Re-attach to a job (WatchJob): its events as server-sent events, ``accepted`` and its current state first."""
    job_id = _job_id(job_id)
    suite = _suite(request)
    call = suite.orchestrator.WatchJob(orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}"),
                                       metadata=suite.call_metadata(user))
    return _event_stream(job_id, call)


def _event_stream(job_id: str, call, first: orchestrator_pb2.GenerateResponse | None = None) -> StreamingResponse:
    """A Generate or WatchJob call as server-sent events: ``accepted``, ``queued``, ``stage``, ``progress`` (step,
    total, live preview as a data URL), then ``result`` or ``failure`` (code, reason, message), and last ``end``.
    Every event carries ``sent_at``, the gateway's clock when it forwards it (bench/gateway_page.py)."""

    def encoded(event: orchestrator_pb2.GenerateResponse) -> bytes | None:
        converted = page_event(job_id, event)
        if converted is None:
            return None
        kind, data = converted
        data["sent_at"] = time.time()
        return sse_event(kind, data)

    async def stream() -> AsyncIterator[bytes]:
        assembler = ResultAssembler()  # a large result arrives in ResultChunk events before it
        try:
            if first is not None:
                yield encoded(first)
            async for response in call:
                # Generate streams GenerateResponse; WatchJob wraps it in WatchJobResponse.event.
                event = assembler.feed(response.event if isinstance(response, orchestrator_pb2.WatchJobResponse)
                                       else response)
                chunk = encoded(event) if event is not None else None
                if chunk is not None:
                    yield chunk
        except grpc.aio.AioRpcError as error:
            failure = SuiteCallError.of(error)
            yield sse_event("failure", {"code": failure.code.name, "reason": failure.reason,
                                        "message": failure.message})
        finally:
            call.cancel()  # the browser went away, or the job ended: the job itself is not cancelled by this
        yield sse_event("end", {})

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/ui/api/jobs/{job_id}/cancel", tags=["web page"])
async def cancel_job(job_id: str, request: Request, user: Caller) -> Response:
    """Cancel a queued or running job; answers its state afterwards."""
    job_id = _job_id(job_id)
    suite = _suite(request)
    try:
        answer = await suite.orchestrator.CancelJob(orchestrator_pb2.CancelJobRequest(name=f"jobs/{job_id}"),
                                                    metadata=suite.call_metadata(user), timeout=60)
    except grpc.aio.AioRpcError as error:
        raise SuiteCallError.of(error) from None
    return JSONResponse(_job_summary(answer.job))


def _job_summary(job: orchestrator_pb2.Job) -> dict:
    summary = {
        "job_id": job.job_id, "state": _STATE_NAMES.get(job.state, "unknown"), "prompt": job.prompt,
        "seed": str(job.seed), "model": job.model, "completed_steps": job.completed_steps,
        "total_steps": job.total_steps,
        "create_time": job.create_time.ToJsonString() if job.HasField("create_time") else None,
    }
    if job.HasField("error"):
        summary["error"] = {"code": job.error.code, "reason": job.error.reason, "message": job.error.message}
    return summary


@router.get("/ui/api/jobs", tags=["web page"])
async def list_jobs(request: Request, user: Caller, page_token: str = "") -> Response:
    """The gallery: the user's jobs, newest first, ``GALLERY_PAGE_SIZE`` a page; a succeeded job links its first
    image as a thumbnail."""
    suite = _suite(request)
    try:
        answer = await suite.orchestrator.ListJobs(
            orchestrator_pb2.ListJobsRequest(page_size=GALLERY_PAGE_SIZE, page_token=page_token[:512]),
            metadata=suite.call_metadata(user), timeout=30)
    except grpc.aio.AioRpcError as error:
        raise SuiteCallError.of(error) from None
    jobs = []
    for job in answer.jobs:
        summary = _job_summary(job)
        if job.state == status_pb2.JOB_STATE_SUCCEEDED:
            summary["thumbnail"] = f"/ui/api/jobs/{job.job_id}/images/0"
        jobs.append(summary)
    return JSONResponse({"jobs": jobs, "next_page_token": answer.next_page_token})


async def _get_job(request: Request, user: User, job_id: str) -> orchestrator_pb2.Job:
    suite = _suite(request)
    try:
        answer = await suite.orchestrator.GetJob(orchestrator_pb2.GetJobRequest(name=f"jobs/{_job_id(job_id)}"),
                                                 metadata=suite.call_metadata(user), timeout=60)
        job = answer.job
        if job.HasField("result") and is_chunked(job.result):
            # GetJob leaves a large result's PNGs out; WatchJob on the finished job replays them in chunks.
            watch = suite.orchestrator.WatchJob(orchestrator_pb2.WatchJobRequest(name=job.name),
                                                metadata=suite.call_metadata(user), timeout=60)
            async for event in assemble_async(response.event async for response in watch):
                if event.WhichOneof("event") == "result":
                    job.result.CopyFrom(event.result)
    except grpc.aio.AioRpcError as error:
        raise SuiteCallError.of(error) from None
    return job


@router.get("/ui/api/jobs/{job_id}", tags=["web page"])
async def get_job(job_id: str, request: Request, user: Caller) -> Response:
    """One job of the gallery: its summary, its generation parameters (the first image's infotext, raw and parsed)
    and its image URLs."""
    job = await _get_job(request, user, job_id)
    summary = _job_summary(job)
    infotext = _infotext(job.result.images[0].png) if job.result.images else ""
    summary["parameters"] = infotext
    summary["parsed_parameters"] = parse_parameters(infotext) if infotext else {}
    summary["images"] = [f"/ui/api/jobs/{job.job_id}/images/{image.index}" for image in job.result.images]
    return JSONResponse(summary)


@router.get("/ui/api/jobs/{job_id}/images/{index}", tags=["web page"])
async def job_image(job_id: str, index: int, request: Request, user: Caller) -> Response:
    """The PNG of one image of a succeeded job (with its ``parameters`` text chunk)."""
    job = await _get_job(request, user, job_id)
    for image in job.result.images:
        if image.index == index:
            return Response(image.png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    raise NotFound("the job has no image with that index (it has not succeeded, or has fewer images)",
                   reason="IMAGE_NOT_FOUND")


class ClassifyBody(BaseModel):
    """An image to classify."""

    image: str = Field(min_length=1, description="the image, a base64 data URL")


@router.post("/ui/api/classify", tags=["web page"])
async def classify(body: ClassifyBody, request: Request, user: Caller) -> Response:
    """The top 5 labels of an image (ClassifierService.Classify, forwarded by the orchestrator)."""
    image = decode_image(body.image, "image")
    suite = _suite(request)
    try:
        answer = await suite.classifier.Classify(
            classifier_pb2.ClassifyRequest(images=[classifier_pb2.ImageInput(encoded_image=image)],
                                           top_k=CLASSIFY_TOP_K),
            metadata=suite.call_metadata(user), timeout=60)
    except grpc.aio.AioRpcError as error:
        raise SuiteCallError.of(error) from None
    result = answer.results[0]
    if result.HasField("error"):  # this image failed (the call itself succeeded): answered as a failed call
        code = _CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
        raise SuiteCallError(code, result.error.message, result.error.reason or code.name)
    return JSONResponse({"model": answer.model,
                         "classes": [{"label": c.label, "index": c.class_index, "score": round(float(c.score), 6)}
                                     for c in result.classes]})
