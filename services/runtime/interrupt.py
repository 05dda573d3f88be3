"""Work that stops inside a step: the running job of a thread, the deadline of the call being served, and
hooks on a model's modules that end the work when its job is cancelled, interrupted or past its deadline.

One UNet step or one VAE encode can take minutes on a large image (on CPU, the self-attention over every
latent pixel alone), so checking only between denoising steps is not enough. ``install(model)`` runs once
per loaded model: a check before the forward (``_checked_forward``, cheaper than a forward-pre-hook) of the
down, mid and up blocks of a UNet, transformer or ControlNet, the VAE's encoder and decoder blocks, and their
resnets, attentions, transformer blocks and samplers; on CPU also of every layer inside those that holds a
weight matrix or kernel (one convolution over a large image takes a second there, while on an accelerator a
layer is fast and each check's Python would show; norms and activations are elementwise, checked around).
diffusers' default attention processors (AttnProcessor2_0; SD3's JointAttnProcessor2_0; Flux's FluxAttnProcessor
on the native attention backend) are replaced by copies that compute attention in slices of queries and check between
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
#: CPU core (exp() dominates for small heads, hence the floor of 32): 2 ** 30 units took 49 to 71 ms on one
#: core here (float32 SDPA, 4096 queries, head sizes 16 to 64), so a slice is 2 ** 31. On an accelerator slices
#: are larger.
CPU_SLICE_UNITS = 2 ** 31
ACCELERATOR_SLICE_UNITS = 2 ** 38
#: An attention up to this many slices' work runs whole: cut into two or three, it costs more than it gains
#: (the slices of a transposed query are copied, the output concatenated, and the attention's output projection
#: then copies again: tiny SDXL at 1024x1024, twelve self-attentions of 2 slices' work, ran 7.5 ms slower per
#: forward cut in four 2 ** 30 slices; tiny Flux there, 1.3 slices' work then, 5 ms), and a cancel still lands
#: within that much work.
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


def _checked_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """A checked module's ``forward``: the running job's check, then the module's own forward.

    Bound to the module as an instance attribute rather than registered as a forward-pre-hook: a module with hooks
    takes torch's slow call path (about 3 us more per call here; SDXL's 400 layers made that +5 ms per forward),
    while this costs one Python call and a context-variable lookup. ``torch.nn.Module.__call__`` calls
    ``self.forward``, so the check runs on every call; deep copies rebind it to the copy.
    """
    check()
    inner = self._latentwire_inner_forward
    if inner is None:
        return type(self).forward(self, *args, **kwargs)
    return inner(*args, **kwargs)


def _checks(module: Any) -> bool:
    return "_latentwire_inner_forward" in module.__dict__


def _add_check(module: Any) -> None:
    import types

    # A forward set on the instance already (accelerate's offload hooks do that) runs after the check.
    module._latentwire_inner_forward = module.__dict__.get("forward")
    module.forward = types.MethodType(_checked_forward, module)


def _remove_check(module: Any) -> None:
    inner = module.__dict__.pop("_latentwire_inner_forward")
    if inner is None:
        del module.forward
    else:
        module.forward = inner


def checked(model: torch.nn.Module) -> int:
    """How many of ``model``'s modules check the running job before their forward."""
    return sum(1 for module in model.modules() if _checks(module))


def install(model: torch.nn.Module) -> int:
    """Make ``model`` stop between its blocks and attention slices when its running job says so.

    Idempotent; returns the number of modules given a check. Call it once per loaded model (each check costs a
    context-variable lookup when no job is running, a flag and a clock read when one is).
    """
    if getattr(model, "_latentwire_interruptible", False):
        return 0
    from diffusers.models.attention_processor import Attention

    # On CPU every layer that holds a weight matrix or kernel (linear, convolution, embedding) is checked, besides
    # the blocks and attentions: the work between two checks is then one such layer plus elementwise work
    # (norms, activations), and a forward makes fewer checks (tiny SDXL: 244, not 456 on every module). Containers
    # (ModuleList) hold no parameter of their own and match no block path, so they get none: they are never called.
    def weighty(module: Any) -> bool:
        return any(p.dim() >= 2 for p in module.parameters(recurse=False))

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
        if name and not _checks(module) \
                and ((every_layer and weighty(module)) or isinstance(module, Attention) or processor is not None
                     or _BLOCK_PATH.search(name)):
            _add_check(module)
            hooks += 1
    model._latentwire_interruptible = True
    return hooks


def uninstall(model: torch.nn.Module) -> int:
    """Undo ``install``: remove the checks and give the attention modules diffusers' processors back (for a network
    that is compiled: services/denoiser/acceleration.py). Returns the number of checks removed."""
    originals = {type(replacement): original for original, replacement in _interruptible_processors().items()}
    removed = 0
    for module in model.modules():
        if _checks(module):
            _remove_check(module)
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
    # Called for every attention of every step: no import statement and few attribute reads on the way to the
    # single call most attentions are (about 4 us of Python per call here).
    sdpa = _functional().scaled_dot_product_attention
    shape = query.shape
    queries, head_dim = shape[-2], shape[-1]
    budget = CPU_SLICE_UNITS if query.is_cpu else ACCELERATOR_SLICE_UNITS
    per_query = max(1, query.numel() // max(1, queries * head_dim) * key.shape[-2] * max(head_dim, 32))
    if per_query * queries <= WHOLE_UP_TO_SLICES * budget:
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    import torch

    rows = max(1, budget // per_query)
    out = []
    for start in range(0, queries, rows):
        check()
        mask = attn_mask
        if mask is not None and mask.shape[-2] == queries:
            mask = mask[..., start:start + rows, :]
        out.append(sdpa(query[..., start:start + rows, :], key, value, attn_mask=mask, dropout_p=0.0,
                        is_causal=False))
    return torch.cat(out, dim=-2)


_FUNCTIONAL: Any = None


def _functional() -> Any:
    """``torch.nn.functional``, imported once (this module imports torch only when it is used)."""
    global _FUNCTIONAL
    if _FUNCTIONAL is None:
        import torch.nn.functional

        _FUNCTIONAL = torch.nn.functional
    return _FUNCTIONAL


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
