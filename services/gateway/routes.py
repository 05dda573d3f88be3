"""The /sdapi/v1 routes: each REST call becomes calls on the suite's gRPC services (grpc.aio, never blocking
the event loop); bodies and their mapping live in a1111.py, live progress in progress.py.

Every generation goes through the orchestrator's queue (Generate), so concurrent REST calls queue as the
suite's jobs; the calling user's suite token goes with each call (clients.SuiteClients.call_metadata), so its
principal owns the job.
"""
from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from latentwire.client import hires as hires_table
from latentwire.client import samplers as sampler_table
from latentwire.client.infotext import parse_parameters
from latentwire.client.result_chunks import assemble_async
from latentwire.orchestrator.v1 import orchestrator_pb2
from latentwire.registry.v1 import registry_pb2
from services.runtime.errors import InvalidArgument, LatentwireError, NotFound, quote

from . import a1111
from .auth import User, current_user
from .errors import SuiteCallError
from .img2img import apply_overlay
from .progress import ProgressTracker

log = logging.getLogger(__name__)

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

#: Registry kinds listed as checkpoints (sd-models): by ModelKind value.
CHECKPOINT_KINDS = {registry_pb2.MODEL_KIND_STABLE_DIFFUSION, registry_pb2.MODEL_KIND_STABLE_DIFFUSION_XL,
                    registry_pb2.MODEL_KIND_STABLE_DIFFUSION_XL_REFINER, registry_pb2.MODEL_KIND_STABLE_DIFFUSION_3,
                    registry_pb2.MODEL_KIND_FLUX}
#: MODEL_KIND_UPSCALER (ESRGAN-type upscalers) where this build's registry has it.
UPSCALER_KIND = getattr(registry_pb2, "MODEL_KIND_UPSCALER", None)


def _suite(request: Request):
    return request.app.state.suite


def _progress_user(request: Request, user: User) -> str | None:
    """Whose jobs /progress, interrupt and skip act on: the user's under --api-auth, anyone's without it."""
    return None if not request.app.state.settings.api_users else user.name


# -- generation ------------------------------------------------------------------------------------------------

async def _generate(request: Request, body: a1111.GenerationBody, user: User) -> dict[str, Any]:
    state = request.app.state
    tracker: ProgressTracker = state.progress
    prepared = await asyncio.to_thread(a1111.prepare_img2img, body) if isinstance(body, a1111.Img2ImgBody) else None
    generate_request = await asyncio.to_thread(
        a1111.to_generate_request, body, state.options, preview_interval=state.settings.preview_interval,
        prepared=prepared)
    timestamp = a1111.job_timestamp()
    live = tracker.start(user.name, job_count=body.n_iter, job_timestamp=timestamp)
    suite = _suite(request)
    result = None
    try:
        call = suite.orchestrator.Generate(generate_request, metadata=suite.call_metadata(user),
                                           timeout=state.settings.request_timeout_s)
        live.call = call
        try:
            async for event in assemble_async(call):  # a large result comes in ResultChunk events before it
                live.observe(event)
                if event.WhichOneof("event") == "accepted" and (live.interrupted or live.skipped):
                    call.cancel()  # interrupted before the job had an id
                if event.WhichOneof("event") == "result":
                    result = event.result
        except grpc.aio.AioRpcError as error:
            if not (live.interrupted or live.skipped):
                raise SuiteCallError.of(error) from None
        except asyncio.CancelledError:
            if not (live.interrupted or live.skipped):
                raise
    finally:
        tracker.finish(live)
    images = [image.png for image in result.images] if result is not None else []
    if prepared is not None and prepared.overlay is not None:  # A1111's overlay (and inpaint_full_res paste-back)
        images = await asyncio.to_thread(lambda: [apply_overlay(png, prepared) for png in images])
    infotexts = [a1111.png_infotext(png) for png in images]
    if result is None:
        result = orchestrator_pb2.GenerateResult(model=generate_request.model.name)
    parameters = body.model_dump(mode="json")
    if isinstance(body, a1111.Img2ImgBody):  # as A1111: the images are not sent back in the parameters
        parameters.update(init_images=None, mask=None)
    return {
        "images": [base64.b64encode(png).decode() for png in images] if body.send_images else [],
        "parameters": parameters,
        "info": a1111.info_json(body, generate_request, result, infotexts, job_timestamp=timestamp),
    }


@router.post("/txt2img", response_model=a1111.GenerationResponse, summary="Text to image")
async def txt2img(request: Request, body: a1111.Txt2ImgBody, user: User = Depends(current_user)):
    """A1111's txt2img: the body's settings as one job in the orchestrator's queue (docs/gateway.md)."""
    return await _generate(request, body, user)


@router.post("/img2img", response_model=a1111.GenerationResponse, summary="Image to image (and inpainting)")
async def img2img(request: Request, body: a1111.Img2ImgBody, user: User = Depends(current_user)):
    """A1111's img2img: init_images[0] (and mask: inpainting) as one job in the orchestrator's queue."""
    response = await _generate(request, body, user)
    if body.include_init_images:
        response["images"] += [image.split(",", 1)[-1] for image in body.init_images]
    return response


@router.get("/progress", response_model=a1111.ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False, user: User = Depends(current_user)):
    """The caller's newest running generation (anyone's without --api-auth): steps, ETA, live preview."""
    return request.app.state.progress.report(_progress_user(request, user), skip_current_image=skip_current_image)


async def _stop(request: Request, user: User, *, skip: bool) -> None:
    """Finish the caller's running generations early (CancelJob with INTERRUPT, or SKIP: the current batch only);
    each REST call then answers with the images so far, as A1111's does. A job still queued is cancelled (it has
    no image yet); a call interrupted before its job was accepted is cancelled when it is."""
    suite = _suite(request)
    mode = orchestrator_pb2.CANCEL_MODE_SKIP if skip else orchestrator_pb2.CANCEL_MODE_INTERRUPT
    for live in request.app.state.progress.running(_progress_user(request, user)):
        if skip:
            live.skipped = True
        else:
            live.interrupted = True
        if not live.job_id:
            continue  # _generate cancels it on acceptance
        try:
            await suite.orchestrator.CancelJob(orchestrator_pb2.CancelJobRequest(name=f"jobs/{live.job_id}",
                                                                                 mode=mode),
                                               metadata=suite.call_metadata(user), timeout=10)
        except grpc.aio.AioRpcError as error:  # it ended meanwhile, or cannot finish early: stop the call
            log.info("interrupting job %s: %s", live.job_id, error.code().name)
            call = getattr(live, "call", None)
            if call is not None:
                call.cancel()


@router.post("/interrupt")
async def interrupt(request: Request, user: User = Depends(current_user)):
    """Stop the caller's running generation (A1111's Interrupt)."""
    await _stop(request, user, skip=False)
    return {}


@router.post("/skip")
async def skip(request: Request, user: User = Depends(current_user)):
    """A1111's Skip: the current batch of the caller's generation finishes early, the next batch (n_iter) runs."""
    await _stop(request, user, skip=True)
    return {}


# -- lists ---------------------------------------------------------------------------------------------------------

@router.get("/samplers")
async def samplers(user: User = Depends(current_user)):
    """Every sampler by its A1111 name, with the schedule types it takes."""
    return [{"name": s.name, "aliases": [s.scheduler],
             "options": {"schedule_types": ", ".join(s.schedule_types)}} for s in sampler_table.SAMPLERS]


@router.get("/schedulers")
async def schedulers(user: User = Depends(current_user)):
    """The schedule types (A1111 1.9+'s "scheduler" field)."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in a1111.SCHEDULER_NAMES.items()]


async def _registry_models(request: Request, user: User) -> list[tuple[str, int]]:
    """(name, kind) of every registry model's latest version; [] without a registry."""
    suite = _suite(request)
    if suite.registry is None:
        return []
    metadata = suite.call_metadata(user)
    models, token = [], ""
    try:
        while True:
            page = await suite.registry.ListModels(registry_pb2.ListModelsRequest(page_size=1000, page_token=token),
                                                   metadata=metadata, timeout=30)
            models.extend(page.models)
            token = page.next_page_token
            if not token:
                break
        versions = await asyncio.gather(*(
            suite.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=f"models/{m.model_id}/versions/{m.latest_version}"),
                metadata=metadata, timeout=30) for m in models if m.latest_version))
    except grpc.aio.AioRpcError as error:
        raise SuiteCallError.of(error) from None
    return [(v.model_version.model_id, v.model_version.kind) for v in versions]


def _title(name: str) -> dict[str, Any]:
    return {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}


@router.get("/sd-models")
async def sd_models(request: Request, user: User = Depends(current_user)):
    """The checkpoints: the suite's models (--model) and the registry's pipeline models."""
    names = list(request.app.state.settings.models)
    names += [name for name, kind in await _registry_models(request, user) if kind in CHECKPOINT_KINDS
              and name not in names]
    return [_title(name) for name in names]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request, user: User = Depends(current_user)):
    """Nothing to rescan: sd-models asks the registry afresh on every call."""
    return {}


@router.get("/sd-vae")
async def sd_vae(user: User = Depends(current_user)):
    """The suite uses each model's own VAE; there are no separate VAE files to pick."""
    return []


@router.get("/loras")
async def loras(request: Request, user: User = Depends(current_user)):
    """Registry LoRAs (<lora:NAME:WEIGHT> in a prompt)."""
    return [{"name": name, "alias": name, "path": name, "metadata": {}}
            for name, kind in await _registry_models(request, user) if kind == registry_pb2.MODEL_KIND_LORA]


@router.get("/embeddings")
async def embeddings(request: Request, user: User = Depends(current_user)):
    """Registry textual-inversion embeddings."""
    loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
              for name, kind in await _registry_models(request, user)
              if kind == registry_pb2.MODEL_KIND_TEXTUAL_INVERSION}
    return {"loaded": loaded, "skipped": {}}


@router.get("/upscalers")
async def upscalers(request: Request, user: User = Depends(current_user)):
    """Hires fix upscalers: the built-in ones, then registry upscaler models."""
    names = ["None", *hires_table.upscaler_names()]
    if UPSCALER_KIND is not None:
        names += [name for name, kind in await _registry_models(request, user) if kind == UPSCALER_KIND]
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None} for name in names]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes(user: User = Depends(current_user)):
    return [{"name": upscaler.name} for upscaler in hires_table.LATENT_UPSCALERS]


@router.get("/memory")
async def memory(user: User = Depends(current_user)):
    """The gateway process's memory (the models live in the stage services: `latentwire status` shows theirs)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ram": {"free": None, "used": rss, "total": None}, "cuda": {"error": "the gateway holds no models"}}


@router.get("/scripts")
async def scripts(user: User = Depends(current_user)):
    """The always-on scripts the gateway maps (sd-webui-controlnet's units)."""
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


@router.get("/prompt-styles")
async def prompt_styles(user: User = Depends(current_user)):
    return []


@router.get("/cmd-flags")
async def cmd_flags(request: Request, user: User = Depends(current_user)):
    return {"api": True, "api_auth": "***" if request.app.state.settings.api_users else None}


# -- options ---------------------------------------------------------------------------------------------------

@router.get("/options")
async def get_options(request: Request, user: User = Depends(current_user)):
    """The options the gateway keeps (sd_model_checkpoint, CLIP_stop_at_last_layers, samples_format, ...)."""
    return request.app.state.options


@router.post("/options")
async def set_options(request: Request, options: dict[str, Any], user: User = Depends(current_user)):
    """Change options; sd_model_checkpoint switches the model later requests run on (for every caller, as A1111)."""
    current = request.app.state.options
    if "sd_model_checkpoint" in options:
        value = options["sd_model_checkpoint"]
        if not isinstance(value, str):
            raise InvalidArgument("sd_model_checkpoint: give a model title from /sdapi/v1/sd-models",
                                  reason="INVALID_OPTION", metadata={"field": "sd_model_checkpoint"})
        known = {m["title"] for m in await sd_models(request, user)}
        if a1111.strip_hash(value) not in known:
            raise NotFound(f"sd_model_checkpoint {quote(value)} is not a model of this suite; "
                                  "/sdapi/v1/sd-models lists them", reason="MODEL_NOT_FOUND",
                                  metadata={"field": "sd_model_checkpoint"})
        options = {**options, "sd_model_checkpoint": a1111.strip_hash(value)}
    if "CLIP_stop_at_last_layers" in options:
        value = options["CLIP_stop_at_last_layers"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
            raise InvalidArgument("CLIP_stop_at_last_layers: give a whole number from 1 to 12", reason="INVALID_OPTION",
                                  metadata={"field": "CLIP_stop_at_last_layers"})
    if "samples_format" in options and str(options["samples_format"]).lower() != "png":
        raise InvalidArgument("samples_format: the suite returns PNG images (with their infotext) only",
                              reason="INVALID_OPTION", metadata={"field": "samples_format"})
    current.update(options)
    return None


@router.post("/png-info", response_model=a1111.PngInfoResponse)
async def png_info(body: a1111.PngInfoBody, user: User = Depends(current_user)):
    """The infotext of a PNG (its "parameters" text) and its fields."""
    raw = a1111.decode_image(body.image, "image")
    text = a1111.png_infotext(raw)
    if not text:
        return {"info": "", "items": {}, "parameters": {}}
    return {"info": text, "items": {"parameters": text}, "parameters": parse_parameters(text)}


def error_response(error: LatentwireError) -> JSONResponse:
    """A domain error raised in the gateway as the suite's errors are answered (errors.py)."""
    from .errors import http_status

    return JSONResponse(status_code=http_status(error.code), content={
        "error": error.code.name, "detail": error.message, "reason": error.reason,
        **({"field": error.metadata["field"]} if "field" in error.metadata else {})})
