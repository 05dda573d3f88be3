"""Step-level (continuous) batching: concurrent denoising loops of one model share each step's network forward.

Every Denoise runs its loop on its own worker thread (services/runtime/worker.py) with its own scheduler,
timesteps, guidance and generator. Without batching, N jobs of one model make N UNet calls per step, each on a
small batch, which leaves most of a device (and, on CPU, much of the per-call overhead) unshared. Here a loop asks
its ``StepSession`` for the forward instead of calling the UNet: jobs whose step inputs fit together (same latent
channels and size, dtype and device, same conditioning shapes, ControlNet residuals present in both or neither,
SDXL's added conditioning alike) are stacked along dim 0 into one call with a per-row timestep (the UNet takes a
1-D timestep of the batch's size), and the output is split back per job. Only the network forward is shared:
each loop keeps its scheduler.step, guidance split, checkpoints, previews, cancellation and Finish. Jobs join and
leave between steps, whatever their schedulers, step counts and start times.

Gathering: a job whose forward comes in while other jobs of the same key are in their loops waits for them: while
a forward of that key runs (its jobs come back right after it), then as long as they keep coming, until ``wait_s``
has passed since the latest arrival or the end of that forward (so a straggler held up by the interpreter lock
still joins, and one busy elsewhere, e.g. decoding a preview, costs the others at most ``wait_s``); a batch holds at
most ``max_rows`` rows (a job with more rows than that runs alone). A job that is the only one of its key in a
loop calls the network at once, in its own thread, with its own tensors: bit for bit the unbatched call. Whoever
finds the batch ready runs it, on its own thread, under a check that stops the forward only when every job in it
stopped (one job's cancel must not fail the others: it leaves at the end of the forward, or at once if it was
waiting); an error of the forward fails every job in the batch.

The key leaves out the rows, so jobs with and without classifier-free guidance, or of different batch sizes,
share a forward; the timestep's dtype may differ too (the UNet's time projection casts it to float32 either way).

Two calling conventions (``UNET``, ``TRANSFORMER``) say how a loop calls its network and what of a call is per row:
the UNet loops (model.py, sdxl.py) call the UNet through ``StepSession.forward``; the transformer loops (flow.py:
SD3 and Flux) call theirs through ``StepSession.transformer``, whose latent tokens, per-row timestep, text
embeddings, pooled projection and (Flux) distilled guidance are stacked, while Flux's image and text position ids,
shared by every row, must be the same (the same latent size) for two jobs to share a forward.

Jobs that patch the network per thread (LoRA hooks, circular tiling: both read the calling thread's context) do
not use a session: their forward would run on another job's thread without their patch.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from services.runtime import interrupt
from services.runtime.errors import LatentwireError

#: How often a waiting job looks at its own cancellation and deadline (the batch's forward may take seconds).
_POLL_S = 0.05


class _AllOf:
    """The running job of a batched forward, as interrupt.py's hooks see it: the forward stops only when every job
    in the batch has stopped (then with the first one's error)."""

    def __init__(self, jobs):
        self.jobs = jobs

    def check(self) -> None:
        first = None
        for job in self.jobs:
            try:
                job.check()
            except LatentwireError as error:
                first = first or error
            else:
                return
        if first is not None:
            raise first


class _Request:
    """One job's forward waiting to run (alone or in a batch)."""

    __slots__ = ("session", "args", "rows", "arrived", "done", "result", "error")

    def __init__(self, session: StepSession, args: dict[str, Any], rows: int):
        self.session = session
        self.args = args
        self.rows = rows
        self.arrived = time.monotonic()
        self.done = False
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None


def _shape(tensor: torch.Tensor | None):
    return None if tensor is None else (tuple(tensor.shape[1:]), tensor.dtype, tensor.device)


class UNetCall:
    """How the UNet loops (model.py, sdxl.py) call a UNet2DConditionModel: the latents as ``sample``, a 0-d (or
    per-row) timestep, the text embeddings, LCM's timestep_cond, ControlNet residuals, SDXL's added conditioning."""

    @staticmethod
    def rows(args: dict[str, Any]) -> int:
        return int(args["sample"].shape[0])

    @staticmethod
    def key(args: dict[str, Any]) -> tuple:
        """What must be equal for two jobs' step inputs to share one forward (everything but the rows)."""
        down = args["down_block_additional_residuals"]
        added = args["added_cond_kwargs"]
        return (
            _shape(args["sample"]),
            _shape(args["encoder_hidden_states"]),
            _shape(args["timestep_cond"]),
            None if down is None else tuple(_shape(d) for d in down),
            _shape(args["mid_block_additional_residual"]),
            None if added is None else tuple(sorted((name, _shape(value)) for name, value in added.items())),
        )

    @staticmethod
    def call(network, args: dict[str, Any]) -> torch.Tensor:
        return network(args["sample"], args["timestep"], encoder_hidden_states=args["encoder_hidden_states"],
                       timestep_cond=args["timestep_cond"],
                       down_block_additional_residuals=args["down_block_additional_residuals"],
                       mid_block_additional_residual=args["mid_block_additional_residual"],
                       added_cond_kwargs=args["added_cond_kwargs"], return_dict=False)[0]

    @staticmethod
    def call_batched(network, all_args: list[dict[str, Any]]) -> list[torch.Tensor]:
        first = all_args[0]
        rows = [UNetCall.rows(a) for a in all_args]

        def cat(name: str):
            return None if first[name] is None else torch.cat([a[name] for a in all_args])

        sample = cat("sample")
        # One timestep per row (UNet2DConditionModel expands a 0-d timestep to the batch; a 1-D one is per row).
        timestep = _per_row([a["timestep"] for a in all_args], rows, sample.device)
        down = first["down_block_additional_residuals"]
        if down is not None:
            down = [torch.cat([a["down_block_additional_residuals"][i] for a in all_args]) for i in range(len(down))]
        added = first["added_cond_kwargs"]
        if added is not None:
            added = {name: torch.cat([a["added_cond_kwargs"][name] for a in all_args]) for name in added}
        output = network(sample, timestep, encoder_hidden_states=cat("encoder_hidden_states"),
                         timestep_cond=cat("timestep_cond"), down_block_additional_residuals=down,
                         mid_block_additional_residual=cat("mid_block_additional_residual"),
                         added_cond_kwargs=added, return_dict=False)[0]
        return list(output.split(rows))


class TransformerCall:
    """How the flow loops (flow.py) call an SD3Transformer2DModel or a FluxTransformer2DModel: keyword arguments
    only. ``hidden_states`` (the latents: SD3's [B, C, H, W], Flux's packed tokens), ``timestep`` (one per row),
    ``encoder_hidden_states``, ``pooled_projections`` and Flux's ``guidance`` (one per row, or None) are per row;
    the rest (Flux's ``txt_ids`` and ``img_ids``, ``joint_attention_kwargs``) is the same for every row."""

    PER_ROW = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance")

    @staticmethod
    def rows(args: dict[str, Any]) -> int:
        return int(args["hidden_states"].shape[0])

    @staticmethod
    def key(args: dict[str, Any]) -> tuple:
        """Per-row inputs alike in shape, dtype and device; the shared ones equal. Flux's position ids follow from
        the latent size alone (FluxPipeline._prepare_latent_image_ids: a grid whose last row is (0, h - 1, w - 1)),
        so their shape and last row stand for them. A job with attention arguments (a LoRA scale) never shares."""
        shared = []
        for name, value in sorted(args.items()):
            if name in TransformerCall.PER_ROW:
                shared.append((name, _shape(value)))
            elif isinstance(value, torch.Tensor):
                last = tuple(value.reshape(-1, value.shape[-1])[-1].tolist()) if value.numel() else ()
                shared.append((name, tuple(value.shape), value.dtype, value.device, last))
            elif value:  # joint_attention_kwargs with entries: only this job's forward
                shared.append((name, object()))
            else:
                shared.append((name, None))
        return tuple(shared)

    @staticmethod
    def call(network, args: dict[str, Any]) -> torch.Tensor:
        return network(**args, return_dict=False)[0]

    @staticmethod
    def call_batched(network, all_args: list[dict[str, Any]]) -> list[torch.Tensor]:
        first = all_args[0]
        rows = [TransformerCall.rows(a) for a in all_args]
        device = first["hidden_states"].device
        merged = dict(first)
        for name in TransformerCall.PER_ROW:
            if first.get(name) is None:
                continue
            if name in ("timestep", "guidance"):
                merged[name] = _per_row([a[name] for a in all_args], rows, device)
            else:
                merged[name] = torch.cat([a[name] for a in all_args])
        return list(network(**merged, return_dict=False)[0].split(rows))


def _per_row(values, rows: list[int], device) -> torch.Tensor:
    """Each job's timestep (0-d, one element or one per row) as one per row, stacked."""
    return torch.cat([torch.as_tensor(v, device=device).reshape(-1).expand(n) for v, n in zip(values, rows)])


#: The calling conventions: StepBatcher(network, calling=...).
UNET = UNetCall()
TRANSFORMER = TransformerCall()


class StepBatcher:
    """Batches the network forwards of concurrent loops on one model (one instance per loaded model).

    ``network``: the UNet or transformer (called as the loop calls it); ``calling``: how (``UNET``: through
    ``StepSession.forward``; ``TRANSFORMER``: through ``StepSession.transformer``); ``max_rows``: most rows (latent
    images, guidance halves counted) in one forward; ``wait_s``: how long a forward waits for the next of the other
    jobs of its key (0: it never waits);
    ``observe(jobs, rows)``: called once per forward, with how many jobs and rows it held.
    """

    def __init__(self, network: Callable[..., Any], *, max_rows: int, wait_s: float,
                 observe: Callable[[int, int], None] | None = None, calling: UNetCall | TransformerCall = UNET):
        if max_rows < 1 or wait_s < 0:
            raise ValueError("max_rows must be at least 1 and wait_s at least 0")
        self.network = network
        self.calling = calling
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.observe = observe
        self._cond = threading.Condition()
        #: Jobs in their loops, by the key of their latest forward.
        self._active: dict[tuple, int] = {}
        self._pending: dict[tuple, list[_Request]] = {}
        #: Forwards of each key now running.
        self._running: dict[tuple, int] = {}
        #: When the last forward of each key ended (time.monotonic()).
        self._ended: dict[tuple, float] = {}
        #: Forwards run and jobs served, for tests and logs.
        self.forwards = 0
        self.batched_forwards = 0

    def join(self, job) -> StepSession:
        """A job's loop begins: its forwards go through the returned session; ``leave()`` it when the loop ends."""
        return StepSession(self, job)

    # -- bookkeeping (under self._cond) ----------------------------------------------------------------------

    def _move(self, session: StepSession, key: tuple | None) -> None:
        if session.key == key:
            return
        if session.key is not None:
            left = self._active[session.key] - 1
            if left:
                self._active[session.key] = left
            else:
                del self._active[session.key]
                self._ended.pop(session.key, None)
        session.key = key
        if key is not None:
            self._active[key] = self._active.get(key, 0) + 1
        self._cond.notify_all()  # waiters of the old key may now have every job of it

    def _ready(self, key: tuple, pending: list[_Request], now: float) -> bool:
        if sum(r.rows for r in pending) >= self.max_rows or len(pending) >= self._active.get(key, 0):
            return True
        if self.wait_s == 0:
            return True
        if self._running.get(key, 0):
            return False  # its jobs come back right after that forward: wait for them
        opened = max(pending[-1].arrived, self._ended.get(key, 0.0))
        return now >= opened + self.wait_s

    def _ended_forward(self, key: tuple) -> None:
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]
        if key in self._active:
            self._ended[key] = time.monotonic()
        self._cond.notify_all()

    def _take(self, own: _Request, pending: list[_Request]) -> list[_Request]:
        batch, rows = [own], own.rows
        for request in pending:
            if request is not own and rows + request.rows <= self.max_rows:
                batch.append(request)
                rows += request.rows
        for request in batch:
            pending.remove(request)
        return batch

    # -- the forward ---------------------------------------------------------------------------------------

    def _forward(self, session: StepSession, args: dict[str, Any]) -> torch.Tensor:
        key = self.calling.key(args)
        rows = self.calling.rows(args)
        with self._cond:
            self._move(session, key)
            alone = (self._active.get(key, 0) == 1 and not self._pending.get(key) and not self._running.get(key))
            if alone:
                self._running[key] = 1
        if alone:  # exactly the unbatched call, on the job's own thread
            try:
                self._count(1, rows)
                return self.calling.call(self.network, args)
            finally:
                with self._cond:
                    self._ended_forward(key)
        request = _Request(session, args, rows)
        job = session.job
        with self._cond:
            pending = self._pending.setdefault(key, [])
            pending.append(request)
            self._cond.notify_all()
            while not request.done:
                if request in pending:
                    try:
                        job.check()
                    except LatentwireError:
                        pending.remove(request)
                        self._cond.notify_all()
                        raise
                    now = time.monotonic()
                    if self._ready(key, pending, now):
                        batch = self._take(request, pending)
                        self._running[key] = self._running.get(key, 0) + 1
                        self._cond.release()
                        try:
                            self._run(batch)
                        finally:
                            self._cond.acquire()
                            self._ended_forward(key)
                        break
                    timeout = _POLL_S
                    if not self._running.get(key) and self.wait_s:
                        opened = max(pending[-1].arrived, self._ended.get(key, 0.0))
                        timeout = min(timeout, max(opened + self.wait_s - now, 0.0) + 1e-4)
                    self._cond.wait(timeout)
                else:  # taken by another thread, whose forward is running
                    job.check()  # cancelled: leave now; the batch's forward goes on for the others
                    self._cond.wait(_POLL_S)
        job.check()  # a job cancelled during the batch's forward ends here, as it would between its blocks
        if request.error is not None:
            raise request.error
        return request.result

    def _run(self, batch: list[_Request]) -> None:
        """Run one forward for ``batch`` (on the calling thread) and hand each request its rows, or the error."""
        try:
            self._count(len(batch), sum(r.rows for r in batch))
            if len(batch) == 1:
                results = [self.calling.call(self.network, batch[0].args)]
            else:
                with interrupt.running(_AllOf([r.session.job for r in batch])):
                    results = self.calling.call_batched(self.network, [r.args for r in batch])
        except BaseException as error:  # noqa: BLE001 - every job of the batch fails with it
            with self._cond:
                for request in batch:
                    request.error, request.done = error, True
                self._cond.notify_all()
            return
        with self._cond:
            for request, result in zip(batch, results):
                request.result, request.done = result, True
            self._cond.notify_all()

    def _count(self, jobs: int, rows: int) -> None:
        self.forwards += 1
        if jobs > 1:
            self.batched_forwards += 1
        if self.observe is not None:
            self.observe(jobs, rows)


class StepSession:
    """One job's loop as the batcher sees it; ``forward`` is called as the loop would call the UNet."""

    def __init__(self, batcher: StepBatcher, job):
        self.batcher = batcher
        self.job = job
        #: The key of this job's latest forward (None before its first).
        self.key: tuple | None = None

    def forward(self, sample: torch.Tensor, timestep, *, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None, down_block_additional_residuals=None,
                mid_block_additional_residual: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        """The UNet's output for this job's step inputs, as ``(noise_pred,)`` (the call's ``return_dict=False``
        form), computed alone or in a batch with other jobs."""
        if return_dict:
            raise ValueError("StepSession.forward returns a tuple only (return_dict=False)")
        args = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                    timestep_cond=timestep_cond, down_block_additional_residuals=down_block_additional_residuals,
                    mid_block_additional_residual=mid_block_additional_residual, added_cond_kwargs=added_cond_kwargs)
        return (self.batcher._forward(self, args),)

    def transformer(self, *, return_dict: bool = False, **kwargs) -> tuple[torch.Tensor]:
        """The transformer's output for this job's step inputs (the flow loops' keyword call), as ``(noise_pred,)``,
        computed alone or in a batch with other jobs (a batcher with the ``TRANSFORMER`` calling convention)."""
        if return_dict:
            raise ValueError("StepSession.transformer returns a tuple only (return_dict=False)")
        return (self.batcher._forward(self, kwargs),)

    def leave(self) -> None:
        """The loop ended (done, cancelled or failed): others stop waiting for this job."""
        with self.batcher._cond:
            self.batcher._move(self, None)
