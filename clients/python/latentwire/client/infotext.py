"""PNG infotext: read AUTOMATIC1111's "parameters" text and turn it back into a generation request.

latentwire's orchestrator writes the settings of every image it makes into the PNG's "parameters" text chunk in
the format AUTOMATIC1111 (and SD.Next, Forge) write::

    a castle on a hill
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 64x64, Model: tiny-sd

:func:`parse_parameters` reads that text as A1111's ``parse_generation_parameters`` does; :func:`request_kwargs`
turns the parsed fields into :meth:`latentwire.client.Client.generate` keyword arguments, so an image can be made
again (``latentwire generate --from FILE.png``). Torch-free, like the rest of the client.
"""
from __future__ import annotations

import json
import re
import struct
import zlib

from . import hires, samplers

__all__ = ["batch_position", "controlnet_units", "made_from_init_image", "missing_inputs", "parse_parameters",
           "png_parameters", "request_kwargs", "unused_fields"]

# Copied from AUTOMATIC1111 stable-diffusion-webui modules/infotext_utils.py (re_param_code, re_imagesize):
# a "key: value" pair of the settings line, the value either a JSON-quoted string or text up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
#: A checkpoint hash A1111 writes after a model name ("sd_xl_refiner_1.0 [7440042bbd]").
_HASH_SUFFIX = re.compile(r"\s+\[[0-9a-fA-F]{8,12}\]$")
#: What the orchestrator writes as the model when the request named none (the server's default model).
DEFAULT_MODEL = "default"

#: Fields request_kwargs turns into request settings (with the derived Size-1 / Size-2).
_APPLIED = frozenset({"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale",
                      "Distilled CFG Scale", "Seed", "Size-1", "Size-2", "Model", "Denoising strength", "Refiner",
                      "Refiner switch at", "Batch size", "Batch pos", "Tiling", "Clip skip", "Embeddings"})
#: Seed and hires fix fields request_kwargs applies (AUTOMATIC1111's names; "WxH" values split as Key-1 / Key-2).
_APPLIED_SEEDS_HIRES = frozenset({"Variation seed", "Variation seed strength", "Seed resize from-1",
                                  "Seed resize from-2", "Hires upscale", "Hires upscaler", "Hires steps",
                                  "Hires resize-1", "Hires resize-2", "Hires sampler", "Hires refiner"})
#: Fields that only describe the image and change nothing when it is made again.
_DESCRIPTIVE = frozenset({"Model hash", "Version", "VAE hash", "Refiner hash"})


def _unquote(text: str) -> str:
    # As A1111's unquote: a JSON string when it parses as one, else the text as it stands.
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of an A1111 "parameters" text, as A1111's ``parse_generation_parameters`` reads them.

    Every line before the settings line is the prompt (joined with newlines, each line stripped) until one starts
    with "Negative prompt:", which starts the negative prompt. The last line is the settings line when it holds at
    least three "key: value" pairs; values in double quotes are JSON strings; "Size: 64x48" gives "Size-1": "64"
    and "Size-2": "48" (likewise any other WxH value). Unknown keys are kept. Unlike A1111, no field is filled
    with a default of its UI when the text lacks it; every value is a string.
    """
    result: dict[str, str] = {}
    prompt: list[str] = []
    negative: list[str] = []
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    for key, value in _PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = _unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


#: The eight bytes every PNG starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_parameters(png: bytes, key: str = "parameters") -> str:
    """The "parameters" text of a PNG ("" when it has none). Raises ValueError when ``png`` is not a PNG.

    Reads the tEXt, zTXt and iTXt chunks (PNG 1.2 section 11.3.4) itself rather than through Pillow, which the
    client distribution does not depend on: Pillow (and so A1111 and latentwire's VAE stage) writes the text as
    tEXt when it is Latin-1, else as iTXt in UTF-8.
    """
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    offset, wanted = len(PNG_SIGNATURE), key.encode("latin-1")
    while offset + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        data = png[offset + 8:offset + 8 + length]
        offset += 12 + length  # length, type, data, CRC
        if kind == b"IEND" or len(data) < length:
            break
        name, _, rest = data.partition(b"\0")
        if name != wanted:
            continue
        try:
            if kind == b"tEXt":
                return rest.decode("latin-1")
            if kind == b"zTXt":  # compression method byte (0: zlib), then the compressed text
                return zlib.decompress(rest[1:]).decode("latin-1")
            if kind == b"iTXt":  # compressed flag, method, language tag NUL, translated keyword NUL, UTF-8 text
                compressed, text = rest[0], rest[2:].split(b"\0", 2)[2]
                return (zlib.decompress(text) if compressed else text).decode("utf-8")
        except (IndexError, zlib.error, UnicodeDecodeError) as error:
            raise ValueError(f"its {kind.decode()} chunk {key!r} is damaged") from error
    return ""


def _model_name(value: str) -> str:
    value = _HASH_SUFFIX.sub("", value.strip())
    return "" if value == DEFAULT_MODEL else value


def _number(params: dict[str, str], key: str, kind: type):
    try:
        return kind(params[key])
    except ValueError:
        raise ValueError(f"{key}: {params[key][:40]!r} is not a number") from None


def request_kwargs(params: dict[str, str]) -> dict[str, object]:
    """Keyword arguments of :meth:`Client.generate` (the prompt under "prompt") that make the image of ``params``
    (from :func:`parse_parameters`) again.

    - "Sampler" is a sampler of :mod:`latentwire.client.samplers` (a pre-1.9 combined name such as
      "DPM++ 2M Karras" split into sampler and schedule type) -> ``sampler`` and ``schedule_type``; a diffusers
      class name (what latentwire writes when the request named a ``scheduler``) -> ``scheduler``; any other
      name is passed as ``sampler`` and the server refuses it naming the samplers it knows.
    - "Distilled CFG Scale" (Flux, as Forge writes it) is the ``guidance_scale``; else "CFG scale".
    - "Batch size" N: latentwire draws a batch's noise from one generator seeded with the batch's seed, so an
      image of a batch is made again only with its whole batch: ``num_images`` is N and the image is number
      :func:`batch_position` of the result.
    - "Denoising strength" (not hires fix's) -> ``strength``; the init image (and mask) it needs are not in the PNG:
      :func:`missing_inputs` says what to add. ControlNet units likewise.
    - "Model: default" (no model named) -> the server's default model; a " [hash]" after a name is dropped.
    Raises ValueError when a number field is not a number.
    """
    kwargs: dict[str, object] = {"prompt": params.get("Prompt", ""),
                                 "negative_prompt": params.get("Negative prompt", "")}
    if "Steps" in params:
        kwargs["steps"] = _number(params, "Steps", int)
    if "Distilled CFG Scale" in params:
        kwargs["guidance_scale"] = _number(params, "Distilled CFG Scale", float)
    elif "CFG scale" in params:
        kwargs["guidance_scale"] = _number(params, "CFG scale", float)
    if "Seed" in params:
        kwargs["seed"] = _number(params, "Seed", int)
    if "Size-1" in params and "Size-2" in params:
        kwargs["width"], kwargs["height"] = _number(params, "Size-1", int), _number(params, "Size-2", int)
    if "Model" in params:
        kwargs["model"] = _model_name(params["Model"])
    kwargs.update(_sampler_kwargs(params))
    if made_from_init_image(params):
        kwargs["strength"] = _number(params, "Denoising strength", float)
    if params.get("Refiner"):
        kwargs["refiner"] = _model_name(params["Refiner"])
        if "Refiner switch at" in params:
            kwargs["refiner_switch_at"] = _number(params, "Refiner switch at", float)
    if "Batch size" in params:
        kwargs["num_images"] = _number(params, "Batch size", int)
    if "Clip skip" in params:
        kwargs["clip_skip"] = _number(params, "Clip skip", int)
    if params.get("Embeddings"):  # latentwire's pinned references (A1111's "TI hashes" name its own files)
        kwargs["embeddings"] = [name.strip() for name in params["Embeddings"].split(",") if name.strip()]
    kwargs.update(_seed_and_hires_kwargs(params))
    if params.get("Tiling", "").strip().lower() == "true":  # A1111 writes "Tiling: True" only when it tiled
        kwargs["tiling"] = True
    return kwargs


def _seed_and_hires_kwargs(params: dict[str, str]) -> dict[str, object]:
    """A1111's variation seed, seed resize and hires fix fields as Client.generate keywords (``hires`` a HiresFix,
    its "Denoising strength" the second pass's)."""
    kwargs: dict[str, object] = {}
    if "Variation seed strength" in params:
        kwargs["subseed_strength"] = _number(params, "Variation seed strength", float)
        if "Variation seed" in params:
            kwargs["subseed"] = _number(params, "Variation seed", int)
    if "Seed resize from-1" in params and "Seed resize from-2" in params:
        size = (_number(params, "Seed resize from-1", int), _number(params, "Seed resize from-2", int))
        if size[0] > 0 and size[1] > 0:  # A1111 writes -1x-1 for none
            kwargs["seed_resize_from"] = size
    if any(key.startswith("Hires ") for key in params):
        resize = (0, 0)
        if "Hires resize-1" in params and "Hires resize-2" in params:
            resize = (_number(params, "Hires resize-1", int), _number(params, "Hires resize-2", int))
        kwargs["hires"] = hires.hires_fix(
            params.get("Hires upscaler", "").strip(),
            scale=0.0 if any(resize) else (_number(params, "Hires upscale", float) if "Hires upscale" in params
                                           else 0.0),
            resize=resize, steps=_number(params, "Hires steps", int) if "Hires steps" in params else 0,
            denoising_strength=(_number(params, "Denoising strength", float) if "Denoising strength" in params
                                else None),
            sampler=params.get("Hires sampler", "").strip(),
            # A1111's hires_fix_refiner_pass, written when not its default "second pass" (hires_refiner.py)
            refiner_pass=params.get("Hires refiner", "").strip() if params.get("Refiner") else "")
    return kwargs


def _sampler_kwargs(params: dict[str, str]) -> dict[str, str]:
    name = params.get("Sampler", "").strip()
    if not name:
        return {}
    found = samplers.split_combined(name)
    if found is not None:
        sampler, combined_type = found
        schedule_type = params.get("Schedule type", "").strip()
        if combined_type is not None and schedule_type in ("", samplers.AUTOMATIC):
            schedule_type = combined_type.name
        return {"sampler": sampler.name, "schedule_type": schedule_type}
    if name.isidentifier() and name.endswith("Scheduler"):
        return {"scheduler": name}
    return {"sampler": name, "schedule_type": params.get("Schedule type", "").strip()}


def made_from_init_image(params: dict[str, str]) -> bool:
    """Whether ``params`` describe image-to-image or inpainting: a "Denoising strength" that is not hires fix's
    (A1111 writes its second pass's strength under the same key, beside "Hires ..." fields)."""
    return "Denoising strength" in params and not any(key.startswith("Hires ") for key in params)


def batch_position(params: dict[str, str]) -> int:
    """Which image of the batch :func:`request_kwargs` asks for is this one ("Batch pos", 0 without a batch)."""
    return _number(params, "Batch pos", int) if "Batch pos" in params else 0


def controlnet_units(params: dict[str, str]) -> list[dict[str, str]]:
    """The ControlNet units of ``params`` ("ControlNet 0: "Module: canny, Model: cn, Weight: 0.8, ..."") as
    dicts of their fields, in unit order."""
    units = []
    for key in sorted((k for k in params if re.fullmatch(r"ControlNet \d+", k)), key=lambda k: int(k.split()[1])):
        units.append({k: v for k, v in _PARAM.findall(params[key])})
    return units


def missing_inputs(params: dict[str, str]) -> list[str]:
    """What making the image of ``params`` again needs beyond the PNG, as hints for the user ([] for none):
    an init image for image-to-image ("Denoising strength"), a mask when A1111 says it inpainted ("Mask blur"),
    the control images of ControlNet units (with the --control spec each unit had)."""
    needed = []
    if made_from_init_image(params):
        needed.append(f"--init-image IMAGE: it was made from an init image (Denoising strength: "
                      f"{params['Denoising strength']})" + ("" if "Mask blur" in params else
                                                            "; add --mask MASK too if it was inpainted"))
    if "Mask blur" in params:
        needed.append("--mask MASK: it was inpainted")
    for i, unit in enumerate(controlnet_units(params)):
        module = unit.get("Module", "none")
        model = unit.get("Model", "default")
        spec = module + ("" if model in ("", "default", "None") else f"@{_HASH_SUFFIX.sub('', model)}")
        numbers = [unit.get(k) for k in ("Weight", "Guidance Start", "Guidance End")]
        tail = ":".join(n for n in numbers if n is not None) if all(numbers) else (numbers[0] or "")
        needed.append(f"--control {spec}:IMAGE{':' + tail if tail else ''}: ControlNet {i} needs its control image")
    return needed


def unused_fields(params: dict[str, str]) -> list[str]:
    """The fields of ``params`` that :func:`request_kwargs` does not apply and that may change the image
    (Hires ..., unknown keys); hashes ("Model hash", "Lora hashes"), versions and empty values are left out."""
    def applied(key: str) -> bool:
        if key == "Denoising strength":  # the init image's, or the hires fix's second pass's
            return True
        if key in _APPLIED_SEEDS_HIRES:
            return True
        # ControlNet units and the mask are applied from the flags missing_inputs asks for.
        return key in _APPLIED or key == "Mask blur" or key.startswith("ControlNet ")

    def descriptive(key: str) -> bool:
        return key in _DESCRIPTIVE or key.endswith((" hash", " hashes"))

    return [key for key, value in params.items() if value != "" and not applied(key) and not descriptive(key)]
