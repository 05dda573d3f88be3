"""Work that stops inside a step: the running job of a thread, the deadline of the call being served, and
hooks on a model's modules that end the work when its job is cancelled, interrupted or past its deadline.

One UNet step or one VAE encode can take minutes on a large image (on CPU, the self-attention over every
latent pixel alone), so checking only between denoising steps is not enough. ``install(model)`` runs once
per loaded model: a forward-pre-hook on the down, mid and up blocks of a UNet, transformer or ControlNet,
the VAE's encoder and decoder blocks, and their resnets, attentions, transformer blocks and samplers; on
CPU on every layer inside those too (one convolution over a large image takes a second there, while on an
accelerator a layer is fast and each hook's few microseconds of Python would show). diffusers' default
attention processors (AttnProcessor2_0; SD3's JointAttnProcessor2_0; Flux's FluxAttnProcessor on the native
attention backend) are replaced by copies that compute attention in slices of queries and check between
them. Each check reads the job of the calling thread from a context variable (``running(job)``, set by the
worker for the job's thread): with no job set it costs one lookup; jobs on
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
#: An attention up to this many slices' work runs whole: cut into two or three, it costs more than it gains
#: (tiny Flux at 1024x1024, 1.3 slices' work: 5 ms more per forward, split 3640 + 968 queries; SDXL's self-attention
#: there, 4 slices' work, is faster sliced), and a cancel still lands within that much work.
WHOLE_UP_TO_SLICES = 2

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
    from diffusers.models.attention_processor import Attention

    replacements = _interruptible_processors()
    parameter = next(model.parameters(), None)
    every_layer = parameter is None or parameter.device.type == "cpu"
    hooks = 0
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        # diffusers' default processors of UNets (AttnProcessor2_0), SD3 (JointAttnProcessor2_0) and Flux
        # (FluxAttnProcessor, on the native attention backend only) become their sliced copies below.
        replacement = replacements.get(type(processor))
        if replacement is not None and getattr(processor, "_attention_backend", None) is None \
                and getattr(processor, "_parallel_config", None) is None:
            module.set_processor(replacement)
        if name and (every_layer or isinstance(module, Attention) or processor is not None
                     or _BLOCK_PATH.search(name)):
            module.register_forward_pre_hook(_check_before)
            hooks += 1
    model._latentwire_interruptible = True
    return hooks


def uninstall(model: torch.nn.Module) -> int:
    """Undo ``install``: remove the hooks and give the attention modules diffusers' processors back (for a network
    that is compiled: services/denoiser/acceleration.py). Returns the number of hooks removed."""
    originals = {type(replacement): original for original, replacement in _interruptible_processors().items()}
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _check_before:
                del module._forward_pre_hooks[key]
                removed += 1
        original = originals.get(type(getattr(module, "processor", None)))
        if original is not None:
            module.set_processor(original())
    model._latentwire_interruptible = False
    return removed


def sliced_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over slices of the queries, checking the running job between slices.

    Each query's output depends on its own row only, so slicing changes no result (an SD 1.5-size UNet at
    512x512, ten slices per self-attention on CPU, gave bitwise-equal outputs); attention of at most
    ``WHOLE_UP_TO_SLICES`` slices' work (the tiny models at test sizes) is the very same single call.
    """
    import torch
    import torch.nn.functional as F

    *lead, queries, head_dim = query.shape
    batch_heads = 1
    for size in lead:
        batch_heads *= size
    budget = CPU_SLICE_UNITS if query.device.type == "cpu" else ACCELERATOR_SLICE_UNITS
    per_query = max(1, batch_heads * key.shape[-2] * max(head_dim, 32))
    rows = max(1, budget // per_query)
    if per_query * queries <= WHOLE_UP_TO_SLICES * budget:
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


def _interruptible_processors() -> dict:
    """diffusers' attention processor classes -> the sliced copy that replaces them (one instance each).

    Flux's processor calls diffusers' attention dispatcher; it is replaced only while the dispatcher's active
    backend is the native one (``F.scaled_dot_product_attention``, the default), which the copy keeps.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    replacements = {AttnProcessor2_0: InterruptibleAttnProcessor(),
                    JointAttnProcessor2_0: InterruptibleJointAttnProcessor()}
    if _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE:
        replacements[FluxAttnProcessor] = InterruptibleFluxAttnProcessor()
    return replacements


class InterruptibleJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3's joint attention) with the attention computed by ``sliced_attention``.

    Copied from diffusers.models.attention_processor.JointAttnProcessor2_0 (diffusers 0.42); only the
    ``F.scaled_dot_product_attention`` call differs. Keep it in step.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch

        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections.
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        hidden_states = sliced_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


class InterruptibleFluxAttnProcessor:
    """diffusers' FluxAttnProcessor with the attention computed by ``sliced_attention``.

    Copied from diffusers.models.transformers.transformer_flux.FluxAttnProcessor (diffusers 0.42); the
    ``dispatch_attention_fn`` call becomes what its native backend does (permute to [batch, heads, tokens,
    head_dim], ``F.scaled_dot_product_attention``, permute back), sliced. Keep it in step.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import torch
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attention_mask is None:
            query, key, value = (x.permute(0, 2, 1, 3) for x in (query, key, value))
            hidden_states = sliced_attention(query, key, value).permute(0, 2, 1, 3)
        else:  # a mask (not used by FluxPipeline): the dispatcher's own handling, unsliced
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states
