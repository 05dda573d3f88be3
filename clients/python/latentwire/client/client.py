"""A small synchronous client for latentwire.orchestrator.v1.OrchestratorService."""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np

from latentwire.common.v1 import lora_pb2, model_pb2, preview_pb2, tensor_pb2
from latentwire.controlnet.v1 import controlnet_pb2
from latentwire.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from .addresses import DEFAULT_SERVER as DEFAULT_ADDRESS  # noqa: F401 - the name callers import
from .base import BaseClient
from .errors import LatentwireError
from .loras import lora_weight
from .result_chunks import assemble, is_chunked


@dataclass
class GenerationResult:
    """What one Generate call produced."""

    job_id: str
    seed: int
    images: list[bytes]
    timings: dict[str, float]
    total_seconds: float
    pixels: np.ndarray | None = None
    steps: list[orchestrator_pb2.DenoisingStep] = field(default_factory=list)
    #: Seed of the batch that made each image (seed + i * num_images for batch i of a batch count).
    image_seeds: list[int] = field(default_factory=list)


def control(image: bytes, preprocessor: str = "none", *, scale: float | None = None, start: float | None = None,
            end: float | None = None, model: str = "", **options: float) -> controlnet_pb2.ControlNetUnit:
    """One ControlNet unit: ``image`` (PNG/JPEG/WebP bytes) through ``preprocessor`` ("none", "canny", ...)
    with its ``options`` (for canny: low_threshold, high_threshold); None leaves a number to the default."""
    unit = controlnet_pb2.ControlNetUnit(model=model_pb2.ModelReference(name=model), image=image,
                                         preprocessor=preprocessor, preprocessor_options=options)
    if scale is not None:
        unit.conditioning_scale = scale
    if start is not None:
        unit.guidance_start = start
    if end is not None:
        unit.guidance_end = end
    return unit


def pixels_from_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Float32 pixels [n, height, width, 3] from the result's Tensor."""
    if tensor.dtype != tensor_pb2.DataType.DATA_TYPE_FLOAT32:
        raise ValueError(f"expected float32 pixels, got {tensor_pb2.DataType.Name(tensor.dtype)}")
    return np.frombuffer(tensor.raw_contents, dtype="<f4").reshape(list(tensor.shape)).copy()


class Client(BaseClient):
    """Talks to the orchestrator at ``address`` (host:port; default $LATENTWIRE_SERVER, else localhost:50051).

    ``timeout`` is the deadline of each call in seconds (None: none); ``token``, ``tls_ca``,
    ``tls_cert``, ``tls_key`` and ``security`` as in :class:`~latentwire.client.base.BaseClient`.
    Every failed call raises :class:`LatentwireError`.
    """

    stub_class = orchestrator_pb2_grpc.OrchestratorServiceStub

    @staticmethod
    def build_request(
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int = 0,
        height: int = 0,
        num_images: int = 1,
        scheduler: str = "",
        model: str = "",
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        include_pixels: bool = False,
        init_image: bytes = b"",
        mask_image: bytes = b"",
        strength: float | None = None,
        controlnets: list[controlnet_pb2.ControlNetUnit] | tuple = (),
        guess_mode: bool = False,
        priority: int = 0,
        stage_devices: dict[str, str] | None = None,
        cancel_on_disconnect: bool = True,
        refiner: str = "",
        refiner_switch_at: float | None = None,
        sampler: str = "",
        schedule_type: str = "",
        preview_every: int | None = None,
        preview_format: str = "",
        preview_method: str = "",
        preview_vae: str = "",
        tiling: bool = False,
        vae_tiling: str = "",
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        batch_count: int = 0,
        hires: orchestrator_pb2.HiresFix | None = None,
        clip_skip: int = 0,
        loras: Iterable[str | lora_pb2.LoraWeight] = (),
        embeddings: Iterable[str] = (),
        step_event_interval_ms: int = 0,
    ) -> orchestrator_pb2.GenerateRequest:
        """A GenerateRequest; None, 0 and "" leave a setting to the server's default.

        ``init_image`` (with ``strength``) makes it image-to-image, adding ``mask_image`` inpainting;
        ``controlnets`` are units made with :func:`control`. ``refiner`` names an SDXL refiner that finishes
        the image from ``refiner_switch_at`` of the schedule (default 0.8). ``guidance_scale`` None leaves it to the
        model (7.5 SD 1.x/2.x, 5 SDXL, 7 SD3; Flux's distilled guidance 3.5). This client cancels the job when its
        call ends early (``cancel_on_disconnect``); pass False to leave it running (re-attach with watch_job).
        ``sampler`` names the sampler as AUTOMATIC1111 / SD.Next do ("DPM++ 2M", or "DPM++ 2M Karras"), with an
        optional ``schedule_type`` ("Karras"); see :mod:`latentwire.client.samplers`. It replaces ``scheduler``.
        ``preview_every`` N asks for a live preview image (``preview_format`` "jpeg" or "webp") in every N-th step
        event (0: every 5; None: none), made by ``preview_method`` ("approx", the default, or "tiny-vae": a tiny
        preview VAE: ``preview_vae``, a registry model of kind MODEL_KIND_PREVIEW_VAE, or "" for the denoiser's
        configured one; naming one implies "tiny-vae"; either asks for previews every 5 steps when ``preview_every``
        is None). ``tiling`` makes a seamless texture (A1111's Tiling); ``vae_tiling`` "on" /
        "off" decodes in tiles or not ("": automatic, above the VAE service's size).
        ``subseed`` / ``subseed_strength`` are A1111's variation seed, ``seed_resize_from`` (width, height) its seed
        resize; ``batch_count`` batches of ``num_images`` run one after another with seeds counted up; ``hires`` is a
        hires fix made with :func:`latentwire.client.hires.hires_fix`. ``clip_skip`` is A1111's "Clip skip" (1 or 0: the
        last layer, 2: the one before it). Prompts may use A1111's syntax: (word:1.3), [word], BREAK, prompt editing
        [from:to:when], alternation [a|b], and more than 75 tokens. ``loras`` are registry LoRAs as "NAME[:W]" (or
        "NAME:TE:UNET", or LoraWeight messages), added to the prompt's ``<lora:NAME:W>`` tags; ``embeddings`` name
        registry textual-inversion embeddings the prompts use by name. ``step_event_interval_ms`` N > 0 asks for a
        step event at most every N ms (each run's last step and previews always come) instead of every step.
        """
        request = orchestrator_pb2.GenerateRequest(
            model=model_pb2.ModelReference(name=model),
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_images=num_images,
            scheduler=scheduler,
            guidance_rescale=guidance_rescale,
            eta=eta,
            include_pixels=include_pixels,
            init_image=init_image,
            mask_image=mask_image,
            controlnets=list(controlnets),
            guess_mode=guess_mode,
            priority=priority,
            stage_devices=stage_devices or {},
            cancel_on_disconnect=cancel_on_disconnect,
            sampler=sampler,
            schedule_type=schedule_type,
        )
        if strength is not None:
            request.strength = strength
        if seed is not None:
            request.seed = seed
        if steps is not None:
            request.num_inference_steps = steps
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        if refiner:
            request.refiner.name = refiner
        if refiner_switch_at is not None:
            request.refiner_switch_at = refiner_switch_at  # without a refiner the server refuses it
        if preview_every is not None or preview_method or preview_vae:
            request.previews.interval, request.previews.format = preview_every or 0, preview_format
            # Naming a preview VAE asks for the method that uses one.
            request.previews.method = preview_method or ("tiny-vae" if preview_vae else "")
            if preview_vae:
                request.previews.preview_vae.name = preview_vae
        request.tiling = tiling
        if subseed is not None:
            request.subseed = subseed
        request.subseed_strength = subseed_strength
        if seed_resize_from is not None:
            request.seed_resize_from_w, request.seed_resize_from_h = seed_resize_from
        request.batch_count = batch_count
        request.clip_skip = clip_skip
        request.step_event_interval_ms = step_event_interval_ms
        request.loras.extend(lora_weight(spec) for spec in loras)  # "NAME[:W[:UNET]]" or LoraWeight
        request.embeddings.extend(model_pb2.ModelReference(name=name) for name in embeddings)
        if hires is not None:
            request.hires.CopyFrom(hires)
        if vae_tiling:
            request.vae_tiling = preview_pb2.VaeTiling.Value(f"VAE_TILING_{vae_tiling.upper()}")
        return request

    def stream(self, request: orchestrator_pb2.GenerateRequest):
        """Start Generate and return the raw call: iterate it for events, ``.cancel()`` it to stop the job.

        It is read on the thread that iterates it (``base.SINGLE_THREADED_STREAMS``): ``.cancel()`` works from any
        thread; its ``code()``, ``details()`` and metadata are known once it has ended (asked earlier they raise).
        Its failures are grpc.RpcError; :meth:`events` gives the same events with LatentwireError instead, and a
        large result reassembled (here it comes as ResultChunk events before a result with those parts empty:
        ``latentwire.client.result_chunks.assemble`` puts it together).
        """
        return self._stub.Generate(request, timeout=self.timeout)

    def events(self, request: orchestrator_pb2.GenerateRequest) -> Iterator[orchestrator_pb2.GenerateResponse]:
        """The events of one Generate call; stopping early (an exception, Ctrl-C) cancels the call, and with
        it the job (the request's ``cancel_on_disconnect``). A large result's chunks (ResultChunk events) are
        reassembled: the result event comes complete, as if it had been one message."""
        return _assembled(self._stream(self._stub.Generate, request))

    def generate(
        self, prompt: str, *, on_event: Callable[[orchestrator_pb2.GenerateResponse], None] | None = None, **settings
    ) -> GenerationResult:
        """Run one generation to the end; ``on_event`` sees every progress event (``print_progress`` prints
        them readably). Raises LatentwireError."""
        request = self.build_request(prompt, **settings)
        job_id, steps = "", []
        with closing(self.events(request)) as events:
            for event in events:
                if on_event is not None:
                    on_event(event)
                kind = event.WhichOneof("event")
                if kind == "accepted":
                    job_id = event.accepted.job_id
                elif kind == "step":
                    steps.append(event.step)
                elif kind == "result":
                    result = event.result
                    return GenerationResult(
                        job_id=job_id,
                        seed=result.seed,
                        images=[image.png for image in result.images],
                        timings={t.stage: t.seconds for t in result.timings},
                        total_seconds=result.total_seconds,
                        pixels=pixels_from_tensor(result.pixels) if result.HasField("pixels") else None,
                        steps=steps,
                        image_seeds=list(result.image_seeds),
                    )
        raise LatentwireError(grpc.StatusCode.INTERNAL, "the stream ended without a result", address=self.address)

    def list_schedulers(self, model: str = "") -> orchestrator_pb2.ListSchedulersResponse:
        """Scheduler class names the model accepts."""
        return self._call(self._stub.ListSchedulers,
                          orchestrator_pb2.ListSchedulersRequest(model=model_pb2.ModelReference(name=model)))

    def get_job(self, job_id: str) -> orchestrator_pb2.Job:
        """A job's state, progress and (once it succeeded) result. GetJob leaves a large result's PNGs and pixels
        out (flagged png_chunked / pixels_chunked); they are fetched here with WatchJob, so the result is complete."""
        job = self._call(self._stub.GetJob, orchestrator_pb2.GetJobRequest(name=f"jobs/{job_id}")).job
        if job.HasField("result") and is_chunked(job.result):
            for event in self.watch_job(job_id):
                if event.WhichOneof("event") == "result":
                    job.result.CopyFrom(event.result)
        return job

    def list_jobs(self, *, page_size: int = 0, page_token: str = "", state: int = 0) -> orchestrator_pb2.ListJobsResponse:
        """One page of jobs, newest first."""
        return self._call(self._stub.ListJobs, orchestrator_pb2.ListJobsRequest(
            page_size=page_size, page_token=page_token, state=state))

    def cancel_job(self, job_id: str) -> orchestrator_pb2.Job:
        """Cancel a queued or running job."""
        return self._call(self._stub.CancelJob, orchestrator_pb2.CancelJobRequest(name=f"jobs/{job_id}")).job

    def watch_job(self, job_id: str) -> Iterator[orchestrator_pb2.GenerateResponse]:
        """Re-attach to a job: the events so far, then live ones to the result. Stopping early ends only
        the watch, not the job. A large result comes complete, as in :meth:`events`."""
        responses = self._stream(self._stub.WatchJob, orchestrator_pb2.WatchJobRequest(name=f"jobs/{job_id}"))
        try:
            yield from _assembled(response.event for response in responses)
        finally:
            responses.close()

    def iter_events(self, prompt: str, **settings) -> Iterator[orchestrator_pb2.GenerateResponse]:
        """Yield the events of one generation (as :meth:`events`: failures raise LatentwireError)."""
        yield from self.events(self.build_request(prompt, **settings))


def _assembled(events: Iterator[orchestrator_pb2.GenerateResponse]) -> Iterator[orchestrator_pb2.GenerateResponse]:
    """``events`` with a chunked result put back together; closing it closes ``events`` (which cancels the call)."""
    try:
        yield from assemble(events)
    finally:
        events.close()
