"""LoRAs applied per job on a shared loaded model: forward hooks that add ``scale * lora_B(lora_A(x))``.

A stage runs several jobs at once on one loaded model (services/runtime/worker.py), so a LoRA may not change the
model's weights or flip a flag on its modules: one job would see another's LoRA. Instead:

- ``load_lora`` reads a LoRA file of any format (diffusers / PEFT keys, the older diffusers layouts, kohya's
  ``lora_unet_*`` / ``lora_te*_*`` with alphas) with diffusers' own converters, exactly as diffusers'
  ``load_lora_weights`` does before it hands the weights to PEFT: the family's pipeline's ``lora_state_dict``,
  then per component ``convert_unet_state_dict_to_peft`` (UNet / transformer) or
  ``convert_state_dict_to_diffusers`` + ``convert_state_dict_to_peft`` (text encoders), and the LoraConfig values
  (rank, alpha, their per-module patterns) from diffusers' ``get_peft_kwargs`` or the file's adapter metadata.
  The result: per component, per module path, ``(lora_A, lora_B, alpha / r)`` (PEFT's unfused LoraLayer scaling).
- ``applied(...)`` (a context manager around a job's work, on the job's compute thread) puts each targeted
  Linear / Conv2d module's deltas into a context variable and makes sure the module carries this module's
  forward hook (installed once per module, kept: with no LoRA active for the calling thread it costs one lookup).
  The hook adds ``delta * weight`` for every LoRA of the calling job, in request order, as PEFT's
  ``LoraLayer.forward`` does (``result + lora_B(lora_A(dropout(x))) * scaling`` with ``scaling = weight *
  alpha / r`` after ``set_adapters([...], weights)``), so the output equals diffusers' ``load_lora_weights`` +
  ``set_adapters`` while other jobs on the same modules see none of it.

Loaded LoRAs are cached per pinned version ("name@VERSION": its file never changes) and per device and dtype.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import inspect
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from .errors import InvalidArgument, quote
from .limits import MAX_LORA_WEIGHT, MAX_LORAS, check_lora_weights as check_weights  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

#: LoRAs kept loaded per process (each its tensors on one device and dtype).
CACHE_SIZE = 16

#: The family's pipeline class whose ``lora_state_dict`` reads its LoRA files, and its components that LoRAs
#: target: the denoiser's and the text encoders.
_PIPELINES = {
    "sd": ("StableDiffusionPipeline", ("unet", "text_encoder")),
    "sdxl": ("StableDiffusionXLPipeline", ("unet", "text_encoder", "text_encoder_2")),
    "sdxl-refiner": ("StableDiffusionXLPipeline", ("unet", "text_encoder", "text_encoder_2")),
    "sd3": ("StableDiffusion3Pipeline", ("transformer", "text_encoder", "text_encoder_2")),
    "flux": ("FluxPipeline", ("transformer", "text_encoder")),
}
DENOISER_COMPONENTS = ("unet", "transformer")


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank pair: ``lora_B(lora_A(x)) * scale`` is added to its output."""

    down: torch.Tensor  # lora_A.weight: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # lora_B.weight: (out, r) or (out, r, 1, 1)
    up_bias: torch.Tensor | None
    #: alpha / r (alpha / sqrt(r) for rsLoRA), before the request's weight.
    scale: float

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraModule:
        bias = self.up_bias.to(device, dtype) if self.up_bias is not None else None
        return LoraModule(self.down.to(device, dtype), self.up.to(device, dtype), bias, self.scale)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read and converted: per component ("unet", "text_encoder", ...), per module path, its pair."""

    name: str
    components: dict[str, dict[str, LoraModule]]

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraFile:
        return LoraFile(self.name, {c: {p: m.to(device, dtype) for p, m in mods.items()}
                                    for c, mods in self.components.items()})


@dataclass(frozen=True)
class LoraUse:
    """A LoRA a job applies, with the weight for the stage applying it."""

    lora: LoraFile
    weight: float


# ----------------------------------------------------------------------------------------------
# Reading a file


def _pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, _PIPELINES[family][0])


def load_lora(path: Path, family: str, name: str, unet_config=None) -> LoraFile:
    """Read a LoRA file for a model of ``family`` ("sd", "sdxl", ...); InvalidArgument (LORA_INVALID) when it is
    no LoRA diffusers reads, (LORA_NOT_SUPPORTED) for a kind of adapter these hooks do not compute (DoRA).
    ``unet_config``: an SDXL UNet's config, with which diffusers maps kohya's SGM block names (input_blocks_4_1)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs

    pipeline, components = _PIPELINES[family]
    reader = _pipeline_class(family).lora_state_dict
    # As the pipeline's load_lora_weights asks: Flux's returns alphas only when asked, SD3's has none.
    options = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(reader).parameters:
        options["return_alphas"] = True
    if family in ("sdxl", "sdxl-refiner") and unet_config is not None:  # as StableDiffusionXLPipeline passes it
        options["unet_config"] = unet_config
    try:
        read = reader(str(path), **options)
        state_dict, network_alphas, metadata = read if len(read) == 3 else (read[0], None, read[1])
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        log.info("LoRA %s: %s.lora_state_dict refused it: %s", name, pipeline, error)  # may name server paths
        raise InvalidArgument(f"LoRA {quote(name)} is not a LoRA file diffusers' {pipeline} reads (its tensors are in "
                              "no LoRA layout it knows for this model family)", reason="LORA_INVALID",
                              metadata={"lora": name}) from None
    if not all("lora" in k for k in state_dict):  # load_lora_weights' own check ("Invalid LoRA checkpoint")
        raise InvalidArgument(f"LoRA {quote(name)} holds tensors that are no LoRA weights (every name must contain "
                              "'lora')", reason="LORA_INVALID", metadata={"lora": name})
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in state_dict):
        raise InvalidArgument(f"LoRA {quote(name)} is a DoRA adapter; latentwire applies plain LoRAs only",
                              reason="LORA_NOT_SUPPORTED", metadata={"lora": name})
    prefixes = {k.split(".", 1)[0] for k in state_dict}
    unknown = prefixes - set(components)
    if unknown:
        raise InvalidArgument(
            f"LoRA {quote(name)} targets {', '.join(sorted(unknown))}, which a {family} model does not have (its "
            f"LoRAs target {', '.join(components)}): it is a LoRA for another model family",
            reason="LORA_MODEL_MISMATCH", metadata={"lora": name, "family": family})
    result: dict[str, dict[str, LoraModule]] = {}
    for component in components:
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        alphas = None
        if network_alphas:
            alphas = {k.removeprefix(f"{component}."): v for k, v in network_alphas.items()
                      if k.split(".")[0] == component}
        is_denoiser = component in DENOISER_COMPONENTS
        # As diffusers' load_lora_adapter (UNet / transformer) and _load_lora_into_text_encoder do.
        if is_denoiser:
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
            ranks = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            ranks = {k: v.shape[1] for k, v in part.items() if k.endswith(".lora_B.weight") and v.ndim > 1}
        if not ranks:
            raise InvalidArgument(f"LoRA {quote(name)} has no lora_B weights for {component}", reason="LORA_INVALID",
                                  metadata={"lora": name})
        # A file saved with adapter metadata carries its LoraConfig per component ("unet.r", "unet.lora_alpha", ...).
        meta = {k.removeprefix(f"{component}."): v for k, v in (metadata or {}).items()
                if k.startswith(f"{component}.")} or None
        config = meta if meta is not None else get_peft_kwargs(ranks, network_alpha_dict=alphas, peft_state_dict=part,
                                                               is_unet=is_denoiser)
        result[component] = _modules(part, config, name)
    if not result:
        raise InvalidArgument(f"LoRA {quote(name)} holds no LoRA weights", reason="LORA_INVALID",
                              metadata={"lora": name})
    return LoraFile(name, result)


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern matching the end of ``key`` at a '.' boundary, else default."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _modules(part: dict[str, torch.Tensor], config: dict, name: str) -> dict[str, LoraModule]:
    """Module path -> LoraModule, scaled as PEFT's LoraLayer.update_layer scales (lora_alpha / r)."""
    modules = {}
    for key, down in part.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        up = part.get(f"{path}.lora_B.weight")
        if up is None:
            raise InvalidArgument(f"LoRA {quote(name)} has lora_A but no lora_B for {quote(path)}",
                                  reason="LORA_INVALID", metadata={"lora": name})
        r = _pattern_value(config.get("rank_pattern"), path, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[path] = LoraModule(down.float(), up.float(), part.get(f"{path}.lora_B.bias"), float(scale))
    return modules


# ----------------------------------------------------------------------------------------------
# A cache of loaded LoRAs


class LoraCache:
    """Loaded LoRAs by pinned version key, family, device and dtype; least recently used dropped first."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._items: collections.OrderedDict[tuple, LoraFile] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[tuple, threading.Lock] = collections.defaultdict(threading.Lock)

    def get(self, key: str, path: Path, family: str, device: torch.device, dtype: torch.dtype,
            unet_config=None) -> LoraFile:
        """The LoRA ``key`` ("name@VERSION") read from ``path`` for ``family``, on ``device`` in ``dtype``."""
        cache_key = (key, family, str(device), dtype)
        with self._load_locks[cache_key]:
            with self._lock:
                if cache_key in self._items:
                    self._items.move_to_end(cache_key)
                    return self._items[cache_key]
            loaded = load_lora(path, family, key, unet_config).to(device, dtype)
            with self._lock:
                self._items[cache_key] = loaded
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return loaded


def stage_weight(entry, stage: str) -> float:
    """The weight of a LoraWeight on a stage: "text_encoder" reads text_encoder_weight, "denoiser" unet_weight,
    each falling back to weight."""
    attribute = "text_encoder_weight" if stage == "text_encoder" else "unet_weight"
    return getattr(entry, attribute) if entry.HasField(attribute) else entry.weight


# ----------------------------------------------------------------------------------------------
# Applying: hooks scoped to the calling job


#: For the calling context (a job's compute thread): id(module) -> [(LoraModule, weight), ...].
_ACTIVE: contextvars.ContextVar[dict[int, list[tuple[LoraModule, float]]] | None] = contextvars.ContextVar(
    "latentwire_loras", default=None)
_INSTALL_LOCK = threading.Lock()
_HOOKED = "_latentwire_lora_hook"


def _delta(module: torch.nn.Module, x: torch.Tensor, lora: LoraModule) -> torch.Tensor:
    """lora_B(lora_A(x)) as PEFT's Linear / Conv2d LoraLayer computes it (lora_A takes the base layer's kernel,
    stride and padding; lora_B is 1x1)."""
    x = x.to(lora.down.dtype)
    if isinstance(module, torch.nn.Conv2d):
        hidden = F.conv2d(x, lora.down, None, module.stride, module.padding)
        return F.conv2d(hidden, lora.up, lora.up_bias)
    return F.linear(F.linear(x, lora.down), lora.up, lora.up_bias)


def _hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    active = _ACTIVE.get()
    if active is None:
        return None
    uses = active.get(id(module))
    if not uses:
        return None
    x = args[0]
    dtype = output.dtype
    for lora, weight in uses:
        output = output + _delta(module, x, lora) * (lora.scale * weight)
    return output.to(dtype)


def _resolve(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at ``path``; CLIPTextModel is flattened in recent transformers, older LoRAs say text_model.*"""
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _check_shape(module: torch.nn.Module, lora: LoraModule) -> bool:
    if isinstance(module, torch.nn.Linear):
        return lora.down.ndim == 2 and lora.down.shape[1] == module.in_features \
            and lora.up.shape[0] == module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return lora.down.ndim == 4 and lora.down.shape[1] == module.in_channels \
            and tuple(lora.down.shape[2:]) == tuple(module.kernel_size) and lora.up.shape[0] == module.out_channels
    return False


def plan(roots: dict[str, torch.nn.Module], uses: Iterable[LoraUse]) -> dict[int, list[tuple[LoraModule, float]]]:
    """id(module) -> its deltas, for the components in ``roots`` ("unet", "text_encoder", ...); installs the hook on
    each targeted module once. InvalidArgument (LORA_MODEL_MISMATCH) when a LoRA's module is missing or its shape
    does not fit: a LoRA for another model."""
    active: dict[int, list[tuple[LoraModule, float]]] = {}
    for use in uses:
        for component, modules in use.lora.components.items():
            root = roots.get(component)
            if root is None:
                continue  # a component another stage (or another replica) applies
            for path, lora in modules.items():
                module = _resolve(root, path)
                if module is None or not _check_shape(module, lora):
                    what = "has no module" if module is None else "has a module of another shape at"
                    raise InvalidArgument(
                        f"LoRA {quote(use.lora.name)} does not fit this model: its {component} {what} "
                        f"{quote(path, 120)}; use a LoRA trained for this model's family and size",
                        reason="LORA_MODEL_MISMATCH", metadata={"lora": use.lora.name, "component": component})
                _install(module)
                active.setdefault(id(module), []).append((lora, use.weight))
    return active


def _install(module: torch.nn.Module) -> None:
    if getattr(module, _HOOKED, False):
        return
    with _INSTALL_LOCK:
        if not getattr(module, _HOOKED, False):
            module.register_forward_hook(_hook)
            setattr(module, _HOOKED, True)


@contextlib.contextmanager
def applied(roots: dict[str, torch.nn.Module], uses: Iterable[LoraUse]) -> Iterator[None]:
    """Run the block with ``uses`` added to ``roots``' modules for the calling context only (a job's thread)."""
    uses = [u for u in uses if u.weight != 0.0]
    if not uses:
        yield
        return
    token = _ACTIVE.set(plan(roots, uses))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ----------------------------------------------------------------------------------------------
# A stage's side: the request's LoraWeight messages -> LoraUse


_CACHE = LoraCache()


async def uses_of(service, model, entries, stage: str) -> list[LoraUse]:
    """The LoRAs a stage's request names (``entries``: LoraWeight messages), fetched from the registry through the
    service's model store and read for ``model``'s family, each with the ``stage``'s weight ("text_encoder" or
    "denoiser"). NOT_FOUND (LORA_NOT_FOUND) for a LoRA the registry lacks."""
    check_weights(entries)
    family = model.family.name
    unet = getattr(model, "unet", None)  # the denoiser's (SDXL kohya names need its config)
    unet_config = unet.config if isinstance(unet, torch.nn.Module) else None
    uses = []
    for entry in entries:
        key, path = await service.worker.run(service.models.fetch_one_file, entry.model.name,
                                           "MODEL_KIND_LORA")
        loaded = await service.worker.run(_CACHE.get, key, path, family, service.device, service.dtype, unet_config)
        uses.append(LoraUse(loaded, stage_weight(entry, stage)))
    return uses


def call(roots: dict[str, torch.nn.Module], uses: list[LoraUse], fn, *args):
    """``fn(*args)`` with ``uses`` applied to ``roots`` for this call only (on the job's thread)."""
    with applied(roots, uses):
        return fn(*args)
