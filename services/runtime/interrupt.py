"""Work that stops inside a step: the running job of a thread, the deadline of the call being served, and
hooks on a model's modules that end the work when its job is cancelled, interrupted or past its deadline.

One UNet step or one VAE encode can take minutes on a large image (on CPU, the self-attention over every
latent pixel alone), so checking only between denoising steps is not enough. ``install(model)`` runs once
per loaded model: a forward-pre-hook on the down, mid and up blocks of a UNet, transformer or ControlNet,
the VAE's encoder and decoder blocks, and their resnets, attentions, transformer blocks and samplers; on
CPU on every layer inside those too (one convolution over a large image takes a second there, while on an
accelerator a layer is fast and each hook's few microseconds of Python would show). diffusers' default
attention processor is replaced by ``InterruptibleAttnProcessor``, which computes attention in slices of
queries and checks between them. Each check reads the job of the calling thread from a context variable
(``running(job)``, set by the worker for the job's thread): with no job set it costs one lookup; jobs on
several threads share one model and each sees only its own job. A check raises the job's error:
``Cancelled``, ``DeadlineExceeded`` or, when the service is shutting down, ``Unavailable``.

The deadline of a call is set by the server for every call it serves (``set_call_deadline``, from the gRPC
context's ``time_remaining()``); ``JobTracker.start`` gives it to the job, so a stage honours the deadline of
whoever calls it directly. torch is imported only by the functions that need it: the orchestrator imports
this module through the runtime and holds no model.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import time
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

    from .jobs import Job

_JOB: contextvars.ContextVar[Job | None] = contextvars.ContextVar("latentwire_job", default=None)
_CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("latentwire_call_deadline",
                                                                             default=None)

#: Work units of one attention slice: batch x heads x queries x keys x max(head_dim, 32). About 0.1 s on one
#: CPU core (exp() dominates for small heads, hence the floor of 32); on an accelerator slices are larger.
CPU_SLICE_UNITS = 2 ** 30
ACCELERATOR_SLICE_UNITS = 2 ** 38

#: Modules hooked on an accelerator (by attribute path, so new block classes of diffusers are covered too).
_BLOCK_PATH = re.compile(r"(^|\.)((down|up)_blocks|transformer_blocks|single_transformer_blocks"
                         r"|controlnet_down_blocks|resnets|attentions|downsamplers|upsamplers|layers)\.\d+$"
                         r"|(^|\.)(mid_block|encoder|decoder)$")


# -- the job of this thread and the deadline of this call ------------------------------------------------


@contextlib.contextmanager
def running(job: Job) -> Iterator[Job]:
    """Make ``job`` the running job of the current context (the worker thread's) while the block runs."""
    token = _JOB.set(job)
    try:
        yield job
    finally:
        _JOB.reset(token)


def check() -> None:
    """Raise the running job's error if it was cancelled, interrupted or is past its deadline; else nothing."""
    job = _JOB.get()
    if job is not None:
        job.check()


def set_call_deadline(time_remaining: float | None) -> None:
    """Record the deadline of the call being served (``context.time_remaining()``; None: none)."""
    _CALL_DEADLINE.set(None if time_remaining is None else time.monotonic() + time_remaining)


def call_deadline() -> float | None:
    """The deadline of the call being served, in ``time.monotonic()`` seconds, or None."""
    return _CALL_DEADLINE.get()


def earliest(*deadlines: float | None) -> float | None:
    """The first of several deadlines (``time.monotonic()`` seconds; None: none)."""
    present = [d for d in deadlines if d is not None]
    return min(present) if present else None


# -- hooks on a model ----------------------------------------------------------------------------------


def _check_before(module: Any, args: Any) -> None:
    check()


def install(model: torch.nn.Module) -> int:
    """Make ``model`` stop between its blocks and attention slices when its running job says so.

    Idempotent; returns the number of hooks installed. Call it once per loaded model (the hooks cost a
    context-variable lookup each when no job is running).
    """
    if getattr(model, "_latentwire_interruptible", False):
        return 0
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    processor = InterruptibleAttnProcessor()
    parameter = next(model.parameters(), None)
    every_layer = parameter is None or parameter.device.type == "cpu"
    hooks = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
            module.set_processor(processor)
        if name and (every_layer or isinstance(module, Attention) or _BLOCK_PATH.search(name)):
            module.register_forward_pre_hook(_check_before)
            hooks += 1
    model._latentwire_interruptible = True
    return hooks


def sliced_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over slices of the queries, checking the running job between slices.

    Each query's output depends on its own row only, so slicing changes no result (an SD 1.5-size UNet at
    512x512, ten slices per self-attention on CPU, gave bitwise-equal outputs); attention that fits one
    slice (the tiny models at test sizes) is the very same single call.
    """
    import torch
    import torch.nn.functional as F

    *lead, queries, head_dim = query.shape
    batch_heads = 1
    for size in lead:
        batch_heads *= size
    budget = CPU_SLICE_UNITS if query.device.type == "cpu" else ACCELERATOR_SLICE_UNITS
    rows = max(1, budget // max(1, batch_heads * key.shape[-2] * max(head_dim, 32)))
    if rows >= queries:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    out = []
    for start in range(0, queries, rows):
        check()
        mask = attn_mask
        if mask is not None and mask.shape[-2] == queries:
            mask = mask[..., start:start + rows, :]
        out.append(F.scaled_dot_product_attention(query[..., start:start + rows, :], key, value, attn_mask=mask,
                                                  dropout_p=0.0, is_causal=False))
    return torch.cat(out, dim=-2)


class InterruptibleAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention computed by ``sliced_attention``.

    Copied from diffusers.models.attention_processor.AttnProcessor2_0 (diffusers 0.42), less the deprecated
    ``scale`` argument; only the ``F.scaled_dot_product_attention`` call differs. Keep it in step.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = sliced_attention(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states
