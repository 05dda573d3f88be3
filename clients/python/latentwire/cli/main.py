"""`latentwire`: start the suite, generate images, make models.

    latentwire up [--model PATH]                 start every service on this machine
    latentwire generate "a prompt" -o out.png    generate through a running suite
    latentwire demo                              up + generate + shut down, on the default model
    latentwire generate "a prompt" --init-image in.png [--mask mask.png] [--strength 0.6]
    latentwire generate "a prompt" --control canny:photo.png:0.8   ControlNet (repeatable)
    latentwire generate "a prompt" --model sdxl --refiner sdxl-refiner [--refiner-switch-at 0.8]
    latentwire models create-tiny PATH [--family sdxl|sdxl-refiner|sd3|flux | --inpainting | --controlnet]
                                                 write a tiny random-weight model (default family sd15)
    latentwire generate "a prompt" --sampler "DPM++ 2M" [--schedule-type Karras]   an A1111 / SD.Next sampler
    latentwire png-info FILE.png [--json]        print the generation parameters of a latentwire or A1111 PNG
    latentwire generate --from FILE.png [--steps 30 ...]   make a PNG's image again (flags given override the file's)
    latentwire samplers [--model NAME]           list sampler names, schedule types and their diffusers schedulers
    latentwire upscalers                         list hires fix upscalers, built in and registry models
    latentwire schedulers                        list the schedulers a model accepts
    latentwire grid "a prompt" --x 'Seed: 1-3' [--y 'Steps: 10, 20'] [--z ...] [-o grid.png] [--cells-dir DIR]
                                                 X/Y/Z grid (A1111's X/Y/Z plot) as one job
    latentwire certs DIR [--hosts h1,h2]         write a development CA and certificates (then: up --tls-dir DIR)
    latentwire classify IMAGE... [--top-k K] [--model REF]   classify images (also: classify export | finetune)
    latentwire models create-tiny-classifier PATH [--full-size]   write a random-weight MobileViT classifier

The client commands find the orchestrator at --server, else $LATENTWIRE_SERVER, else localhost:50051,
and the registry (`models ...`) at --registry, else $LATENTWIRE_REGISTRY, else localhost:50055.
Ctrl-C cancels what a command started (for generate: the job) and exits with status 130.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from .connection import SERVER_HELP


def parse_control(spec: str):
    """``PREPROCESSOR[@MODEL][,OPTION=VALUE...]:IMAGE[:SCALE[:START:END]]`` -> a ControlNetUnit.

    For example ``canny:photo.png``, ``canny,low_threshold=50:photo.png:0.8`` or
    ``none@cn-depth:depth.png:1.0:0.0:0.6``.
    """
    from latentwire.client import control

    parts = spec.split(":")
    if len(parts) not in (2, 3, 5) or not parts[1]:
        raise ValueError(f"--control {spec!r}: use PREPROCESSOR[@MODEL][,OPTION=VALUE...]:IMAGE[:SCALE[:START:END]]")
    kind, *option_texts = parts[0].split(",")
    preprocessor, _, model = kind.partition("@")
    options = {}
    for text in option_texts:
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--control {spec!r}: option {text!r} is not OPTION=VALUE")
        options[key] = float(value)
    numbers = [float(x) for x in parts[2:]]
    scale = numbers[0] if numbers else None
    start, end = (numbers[1], numbers[2]) if len(numbers) == 3 else (None, None)
    image = Path(parts[1]).read_bytes()
    return control(image, preprocessor or "none", scale=scale, start=start, end=end, model=model, **options)


def _output_paths(output: Path, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ... for a batch of ``count`` images."""
    return [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    from latentwire.client import Client
    from latentwire.client.loras import lora_weight

    from .progress import ProgressBar

    if args.images < 1:
        print("error: --images must be at least 1", file=sys.stderr)
        return 2
    source = getattr(args, "from_png", None)
    if args.prompt is None and source is None:
        print("error: give a prompt, or --from FILE.png to make a PNG's image again", file=sys.stderr)
        return 2
    try:
        controlnets = [parse_control(spec) for spec in args.control]
        init_image = Path(args.init_image).read_bytes() if args.init_image else b""
        mask_image = Path(args.mask).read_bytes() if args.mask else b""
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = dict(
        negative_prompt=args.negative,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.images,
        scheduler=args.scheduler,
        sampler=args.sampler,
        schedule_type=args.schedule_type,
        model=args.model,
        include_pixels=args.save_pixels is not None,
        init_image=init_image,
        mask_image=mask_image,
        strength=args.strength,
        controlnets=controlnets,
        guess_mode=args.guess_mode,
        refiner=args.refiner,
        refiner_switch_at=args.refiner_switch_at,
        preview_every=0 if args.preview_every is None and args.preview_dir is not None else args.preview_every,
        preview_format=args.preview_format,
        preview_method=args.preview_method,
        preview_vae=args.preview_vae,
        tiling=args.tiling,
        vae_tiling="" if args.vae_tiling == "auto" else args.vae_tiling,
        clip_skip=args.clip_skip,
    )
    try:
        settings["loras"] = [lora_weight(spec) for spec in args.lora]  # A1111 <lora:...> tags work in the prompt too
        settings["embeddings"] = args.embedding
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        settings.update(_seed_and_hires_settings(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prompt, pick = args.prompt, None
    if source is not None:
        try:
            prompt, settings, pick = _settings_from_png(Path(source), args, settings)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    from .connection import client_kwargs

    if getattr(args, "grid_command", False):  # `latentwire grid` (cli/grid.py): this request, swept over its axes
        from .grid import run_grid

        return run_grid(args, prompt, settings, client_kwargs(args))
    # Ctrl-C here cancels the call, and with it the job (the request asks cancel_on_disconnect); run() reports it.
    with Client(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
        on_event = None if args.quiet else ProgressBar()
        if args.preview_dir is not None:
            from .previews import PreviewWriter

            on_event = PreviewWriter(Path(args.preview_dir), on_event)
        result = client.generate(prompt, on_event=on_event, **settings)
    images, pixels = result.images, result.pixels
    if pick is not None:  # the one image of a batch that --from asked for
        images = images[pick:pick + 1]
        pixels = None if pixels is None else pixels[pick:pick + 1]
    paths = _output_paths(Path(args.output), len(images))
    for path, png in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    if args.save_pixels is not None:
        import numpy as np

        np.save(args.save_pixels, pixels)
    print(f"seed {result.seed}")
    for path in paths:
        print(f"wrote {path}")
    return 0


#: Generate flags (argparse dests) and the Client.generate keyword each sets; with --from FILE.png, a flag given
#: on the command line overrides the file's setting.
_FLAG_KWARGS = {"prompt": "prompt", "negative": "negative_prompt", "seed": "seed", "steps": "steps",
                "guidance": "guidance_scale", "width": "width", "height": "height", "images": "num_images",
                "scheduler": "scheduler", "sampler": "sampler", "schedule_type": "schedule_type", "model": "model",
                "strength": "strength", "refiner": "refiner", "refiner_switch_at": "refiner_switch_at",
                "tiling": "tiling", "subseed": "subseed", "subseed_strength": "subseed_strength",
                "seed_resize_from": "seed_resize_from", "batch_count": "batch_count", "hires_scale": "hires",
                "hires_upscaler": "hires", "hires_steps": "hires", "hires_denoising": "hires", "hires_resize": "hires",
                "hires_refiner": "hires", "clip_skip": "clip_skip"}


def _size_flag(text: str | None, flag: str) -> tuple[int, int] | None:
    """A WIDTHxHEIGHT flag value as (width, height); None when not given."""
    if text is None:
        return None
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise ValueError(f"{flag} {text!r}: give WIDTHxHEIGHT in pixels, e.g. 512x512")
    return int(width), int(height)


def _hires_over(from_file, from_flags, given: frozenset) -> object:
    """The file's HiresFix with the settings of the --hires-* flags ``given`` (argparse dests) taken from the
    flags' HiresFix."""
    fix = type(from_file)()
    fix.CopyFrom(from_file)
    for dest, fields in (("hires_scale", ("scale",)), ("hires_upscaler", ("upscaler",)), ("hires_steps", ("steps",)),
                         ("hires_denoising", ("denoising_strength",)), ("hires_refiner", ("refiner_pass",)),
                         ("hires_resize", ("resize_width", "resize_height"))):
        if dest in given:
            for field in fields:
                setattr(fix, field, getattr(from_flags, field))
            if dest == "hires_resize":
                fix.scale = 0.0
            elif dest == "hires_scale":
                fix.resize_width = fix.resize_height = 0
    return fix


def _seed_and_hires_settings(args: argparse.Namespace) -> dict[str, object]:
    """Client.generate settings of the variation seed, seed resize, batch count and hires fix flags; a hires fix
    is asked for when any --hires-* flag is given."""
    from latentwire.client.hires import hires_fix

    settings: dict[str, object] = dict(subseed=args.subseed, subseed_strength=args.subseed_strength,
                                       seed_resize_from=_size_flag(args.seed_resize_from, "--seed-resize-from"),
                                       batch_count=args.batch_count)
    resize = _size_flag(args.hires_resize, "--hires-resize")
    if any(value is not None for value in (args.hires_scale, args.hires_upscaler, args.hires_steps,
                                           args.hires_denoising, resize, args.hires_refiner)):
        settings["hires"] = hires_fix(args.hires_upscaler or "", scale=args.hires_scale or 0.0,
                                      resize=resize or (0, 0), steps=args.hires_steps or 0,
                                      denoising_strength=args.hires_denoising,
                                      refiner_pass=args.hires_refiner or "")
    return settings


def _settings_from_png(source: Path, args: argparse.Namespace,
                       settings: dict[str, object]) -> tuple[str, dict[str, object], int | None]:
    """The prompt, the Client.generate settings and the batch index to keep for `generate --from FILE.png`: the
    file's settings (latentwire.client.infotext), then every flag given on the command line on top. Raises
    ValueError (printed as the error) when the file has no parameters or needs inputs the flags do not give."""
    from latentwire.client import infotext

    text = infotext.png_parameters(source.read_bytes())
    if not text:
        raise ValueError(f"{source.name} has no generation parameters (no PNG \"parameters\" text)")
    params = infotext.parse_parameters(text)
    from_file = infotext.request_kwargs(params)
    explicit = {_FLAG_KWARGS[dest] for dest in args.explicit if dest in _FLAG_KWARGS}
    if args.prompt is not None:
        explicit.add("prompt")
    if args.init_image or args.mask:
        explicit.add("init_image")
    if explicit & {"sampler", "scheduler"}:  # a sampler given replaces the file's scheduler, and the reverse
        for key in ("sampler", "scheduler", "schedule_type"):
            from_file.pop(key, None)
    given = {"--init-image": bool(args.init_image), "--mask": bool(args.mask), "--control": bool(args.control)}
    missing = [hint for hint in infotext.missing_inputs(params) if not given[hint.split()[0]]]
    if missing:
        raise ValueError(f"{source.name} needs inputs its PNG does not hold; add " + "; ".join(missing))
    not_applied = infotext.unused_fields(params)
    if not_applied:
        print("note: not applied from " + source.name + ": " + ", ".join(not_applied), file=sys.stderr)
    merged = dict(settings)
    merged.update({key: value for key, value in from_file.items() if key not in explicit})
    if "hires" in explicit and "hires" in from_file:  # --hires-* flags change those settings of the file's fix
        merged["hires"] = _hires_over(from_file["hires"], merged["hires"], args.explicit)
    prompt = args.prompt if "prompt" in explicit else merged.pop("prompt")
    merged.pop("prompt", None)
    pick = None
    if "num_images" not in explicit and merged.get("num_images", 1) > 1:
        pick = infotext.batch_position(params)
        if not 0 <= pick < merged["num_images"]:
            raise ValueError(f"{source.name}: Batch pos {pick} is outside its batch of {merged['num_images']}")
    return prompt, merged, pick


def cmd_png_info(args: argparse.Namespace) -> int:
    """Print a PNG's generation parameters: the text as stored, then the fields parsed (or all of it as JSON)."""
    from latentwire.client import infotext

    try:
        text = infotext.png_parameters(Path(args.file).read_bytes())
    except (OSError, ValueError) as error:
        print(f"error: {args.file}: {error}", file=sys.stderr)
        return 2
    if not text:
        print(f"error: {args.file} has no generation parameters (no PNG \"parameters\" text)", file=sys.stderr)
        return 1
    params = infotext.parse_parameters(text)
    try:
        request = infotext.request_kwargs(params)
    except ValueError as error:
        request = {"error": str(error)}
    if args.json:
        print(json.dumps({"parameters": text, "fields": params, "request": request,
                          "batch_position": infotext.batch_position(params) if "Batch pos" in params else None,
                          "missing_inputs": infotext.missing_inputs(params),
                          "not_applied": infotext.unused_fields(params)}, indent=2, ensure_ascii=False))
        return 0
    print(text)
    print()
    width = max(len(key) for key in params)
    for key, value in params.items():
        print(f"{key + ':':<{width + 1}} {value}")
    for hint in infotext.missing_inputs(params):
        print(f"generate --from needs: {hint}")
    not_applied = infotext.unused_fields(params)
    if not_applied:
        print("generate --from does not apply: " + ", ".join(not_applied))
    return 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from latentwire.client import Client

    from .connection import client_kwargs

    with Client(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
        response = client.list_schedulers(args.model)
    for name in response.schedulers:
        print(name + ("  (default)" if name == response.default_scheduler else ""))
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    """List the sampler names and schedule types with the diffusers scheduler and options each stands for; with
    --model, only the samplers that model accepts (asks the server)."""
    from latentwire.client import samplers

    offered = None
    if args.model:
        from latentwire.client import Client

        from .connection import client_kwargs

        with Client(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
            offered = set(client.list_schedulers(args.model).schedulers)
    print("Samplers (name: diffusers scheduler, options; schedule types; families)")
    for sampler in samplers.SAMPLERS:
        if offered is not None and sampler.scheduler not in offered:
            continue
        options = ", ".join(f"{k}={v!r}" for k, v in sampler.options)
        print(f"  {sampler.name}: {sampler.scheduler}{' (' + options + ')' if options else ''}; "
              f"{', '.join(sampler.schedule_types)}; {', '.join(sampler.families)}")
    print("Schedule types (name: options)")
    for schedule_type in samplers.SCHEDULE_TYPES:
        options = ", ".join(f"{k}={v!r}" for k, v in schedule_type.options) or "none: " + schedule_type.description
        print(f"  {schedule_type.name}: {options}")
    print('Combined names ("DPM++ 2M Karras") are a sampler followed by a schedule type.')
    return 0


def _add_generate_flags(p: argparse.ArgumentParser, *, prompt_required: bool, from_png: bool = False) -> None:
    """The flags of `generate` (and `demo`). ``from_png`` adds --from FILE.png, which makes the prompt optional and
    records in ``args.explicit`` the flags given on the command line (they override the file's settings)."""
    if from_png:
        p.add_argument("prompt", nargs="?", default=None,
                       help="what the image should show (with --from: optional, replaces the file's prompt)")
        p.add_argument("--from", dest="from_png", default=None, metavar="FILE.png",
                       help="make the image of a latentwire or A1111 PNG again from its parameters text; flags "
                            "given as well override the file's settings")
    elif prompt_required:
        p.add_argument("prompt", help="what the image should show")
    else:
        # `demo`: the embedded default model draws one shape in one colour on a plain background (docs/models.md).
        p.add_argument("prompt", nargs="?", default="a red circle on a white background",
                       help="what the image should show (the embedded default model draws prompts such as this one)")
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write; with --images N also OUT-1.png ... OUT-(N-1).png (default: out.png)")
    p.add_argument("--negative", default="", help="negative prompt (used when --guidance > 1)")
    p.add_argument("--seed", type=int, default=None, help="noise seed; random when omitted (printed either way)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's, 20)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's: 7.5 SD 1.x/2.x, 5 SDXL, 7 SD3); for "
                        "Flux its distilled guidance (default 3.5)")
    p.add_argument("--width", type=int, default=0, help="width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--height", type=int, default=0, help="height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--images", type=int, default=1, help="images to generate in one batch (default 1)")
    p.add_argument("--scheduler", default="",
                   help="diffusers scheduler class, e.g. EulerAncestralDiscreteScheduler (default: the model's)")
    p.add_argument("--sampler", default="", metavar="NAME",
                   help='sampler by its A1111 / SD.Next name, e.g. "DPM++ 2M" or "DPM++ 2M Karras" (instead of '
                        "--scheduler; `latentwire samplers` lists them)")
    p.add_argument("--schedule-type", default="", metavar="TYPE",
                   help="schedule type of --sampler: Automatic (default), Uniform, Karras, Exponential, Beta or "
                        "SGM Uniform")
    p.add_argument("--model", default="", help="model name on the server (default: its default model)")
    p.add_argument("--timeout", type=float, default=None, help="deadline for the whole request, in seconds")
    p.add_argument("--save-pixels", default=None, metavar="PATH.npy",
                   help="also save the float32 pixels before PNG quantisation, shape [N, H, W, 3]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--init-image", default=None, metavar="IMAGE",
                   help="start from this image (image-to-image); the output takes its size unless --width/--height")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the init image is repainted, 0 to 1 (default 0.8, or 1.0 with --mask)")
    p.add_argument("--mask", default=None, metavar="IMAGE",
                   help="inpainting mask of the init image's size: white is repainted, black kept")
    p.add_argument("--control", action="append", default=[],
                   metavar="PREPROCESSOR[@MODEL][,OPT=V...]:IMAGE[:SCALE[:START:END]]",
                   help="apply a ControlNet (repeatable), e.g. canny:photo.png:0.8 or none:edges.png; "
                        "START and END are fractions of the steps")
    p.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode")
    p.add_argument("--refiner", default="", metavar="MODEL",
                   help="SDXL refiner model (server name) that finishes the image from --refiner-switch-at")
    p.add_argument("--refiner-switch-at", type=float, default=None, metavar="FRACTION",
                   help="fraction of the steps after which the refiner takes over, between 0 and 1 (default 0.8)")
    p.add_argument("--preview-every", type=int, default=None, metavar="N",
                   help="a live preview of the latents every N steps (0: every 5); with --preview-dir they are saved")
    p.add_argument("--preview-dir", default=None, metavar="DIR",
                   help="write the previews to DIR/step-NNNN.jpg (implies --preview-every 0 unless given)")
    p.add_argument("--preview-format", default="", choices=("", "jpeg", "webp"),
                   help="preview image format (default jpeg)")
    p.add_argument("--preview-method", default="", choices=("", "approx", "tiny-vae"),
                   help="how previews are made: approx (default; A1111's Approx cheap) or tiny-vae (a tiny preview VAE "
                        "such as TAESD decodes them, nearly the final image; implies --preview-every 0 unless given)")
    p.add_argument("--preview-vae", default="", metavar="NAME",
                   help="with --preview-method tiny-vae: the registry preview VAE (kind MODEL_KIND_PREVIEW_VAE, e.g. "
                        "an imported TAESD folder); default: the one the denoiser's --preview-vae sets for the model's "
                        "family")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:W]",
                   help="apply a LoRA from the registry with weight W (default 1; NAME:TE:UNET for two weights); "
                        "repeatable; <lora:NAME:W> in the prompt works too")
    p.add_argument("--embedding", action="append", default=[], metavar="NAME",
                   help="a textual-inversion embedding from the registry the prompts use by NAME; repeatable")
    p.add_argument("--clip-skip", type=int, default=0, metavar="N",
                   help="A1111's Clip skip: 1 uses the text encoder's last layer (the default), 2 the one before it")
    p.add_argument("--tiling", action="store_true",
                   help="seamless tiling: the image wraps at its edges (A1111's Tiling; circular padding)")
    p.add_argument("--vae-tiling", default="auto", choices=("auto", "on", "off"),
                   help="decode in tiles, one image at a time (default auto: above the VAE service's size)")
    p.add_argument("--subseed", type=int, default=None,
                   help="variation seed (A1111): its noise is slerped into the seed's by --subseed-strength")
    p.add_argument("--subseed-strength", type=float, default=0.0, metavar="F",
                   help="variation strength, 0 (the seed) to 1 (the subseed); default 0")
    p.add_argument("--seed-resize-from", default=None, metavar="WxH",
                   help="draw the seed's noise as for an image of this size (A1111's seed resize)")
    p.add_argument("--batch-count", type=int, default=0, metavar="N",
                   help="run N batches of --images one after another, seeds counted up (default 1)")
    p.add_argument("--hires-scale", type=float, default=None, metavar="F",
                   help="hires fix: upscale by F and denoise again (default 2 when another --hires-* flag is given)")
    p.add_argument("--hires-resize", default=None, metavar="WxH", help="hires fix: upscale to this size instead")
    p.add_argument("--hires-upscaler", default=None, metavar="NAME",
                   help='hires fix upscaler: "Latent" (default), "Latent (antialiased)", "Latent (bicubic)", '
                        '"Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)", "Lanczos", '
                        '"Nearest", or a registry upscaler model (ESRGAN-type; `latentwire upscalers` lists them)')
    p.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="hires fix: steps of the second pass (default: the first pass's)")
    p.add_argument("--hires-denoising", type=float, default=None, metavar="F",
                   help="hires fix: denoising strength of the second pass, 0 to 1 (default 0.7)")
    p.add_argument("--hires-refiner", default=None, metavar="PASS",
                   help='hires fix with --refiner: the pass the refiner takes over in, "first", "second" (default) or '
                        '"both" (A1111\'s "Hires refiner" setting)')
    if from_png:
        _record_explicit(p)


def _record_explicit(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` record in ``args.explicit`` the dests of the options given on its command line.

    argparse fills defaults and given values alike, and a default cannot be told from the same value typed (say
    ``--images 1``); --from needs the difference. Each option's action is given a subclass of its own class that
    also records its dest, so every action keeps its parsing (store, store_true, append) unchanged.
    """
    parser.set_defaults(explicit=frozenset())
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            action.__class__ = _recording(type(action))


@functools.lru_cache(maxsize=None)
def _recording(cls: type) -> type:
    def __call__(self, parser, namespace, values, option_string=None):
        cls.__call__(self, parser, namespace, values, option_string)
        namespace.explicit = getattr(namespace, "explicit", frozenset()) | {self.dest}

    return type(cls.__name__, (cls,), {"__call__": __call__})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentwire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate images through a running suite")
    _add_generate_flags(p, prompt_required=True, from_png=True)
    p.add_argument("--server", default=None, help=SERVER_HELP)
    from .connection import add_flags; add_flags(p)  # noqa: E702 - --token, --tls-* (cli/connection.py)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("png-info", help="print the generation parameters of a latentwire or A1111 PNG")
    p.add_argument("file", help="PNG file")
    p.add_argument("--json", action="store_true",
                   help="print JSON: the text, its fields, the request --from makes and what it needs")
    p.set_defaults(func=cmd_png_info)

    p = sub.add_parser("samplers", help="list sampler names and schedule types with their diffusers schedulers")
    p.add_argument("--model", default="",
                   help="only the samplers this model (name on the server) accepts; asks the server")
    p.add_argument("--server", default=None, help=SERVER_HELP)
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    add_flags(p)
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("schedulers", help="list the scheduler class names a model accepts")
    p.add_argument("--server", default=None, help=SERVER_HELP)
    p.add_argument("--model", default="", help="model name on the server")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    add_flags(p)
    p.set_defaults(func=cmd_schedulers)

    models = sub.add_parser("models", help="model tools").add_subparsers(dest="models_command", required=True)
    from .models import add_commands; add_commands(models)  # noqa: E702 - the registry commands (cli/models.py)
    from . import classify; classify.add_commands(sub)  # noqa: E702 - cli/classify.py
    from . import jobs; jobs.add_commands(sub)  # noqa: E702 - cli/jobs.py
    from . import grid; grid.add_command(sub)  # noqa: E702 - `latentwire grid` (cli/grid.py)
    from . import certs; certs.add_command(sub)  # noqa: E702 - `latentwire certs` (cli/certs.py)
    from . import upscalers; upscalers.add_command(sub)  # noqa: E702 - `latentwire upscalers` (cli/upscalers.py)
    _add_server_commands(sub, models)
    return parser


#: Commands the server distribution adds; without it they explain how to get them.
SERVER_COMMANDS = ("up", "demo", "classify-export", "classify-finetune")


def _add_server_commands(sub: argparse._SubParsersAction, models: argparse._SubParsersAction) -> None:
    """Commands of installed plugins (entry point group ``latentwire.cli``: the suite's `up`, `demo`, ...).

    With the client distribution alone, `up` and the other server commands are still listed and say
    how to install the suite, rather than argparse's "invalid choice".
    """
    from importlib.metadata import entry_points

    plugins = list(entry_points(group="latentwire.cli"))
    for plugin in plugins:
        plugin.load()(sub, models)
    if not plugins:
        for name in SERVER_COMMANDS:
            p = sub.add_parser(name, help="(needs the server suite: pip install latentwire)", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_needs_suite)


def _needs_suite(args: argparse.Namespace) -> int:
    print(f"error: `latentwire {args.command}` runs the services, which this install does not have: it has only "
          "the client (latentwire-client). Install the suite from the repository root with `pip install .`, or "
          "point this client at a running suite with --server HOST:PORT.", file=sys.stderr)
    return 2


#: Exit status after Ctrl-C (128 + SIGINT), as shells report a process SIGINT ended.
EXIT_INTERRUPTED = 130
#: Exit status when the reader of stdout went away (128 + SIGPIPE), as `yes | head` gives.
EXIT_BROKEN_PIPE = 141


def run(args: argparse.Namespace) -> int:
    """Run one command and return its exit status. Whatever ends it early ends it with one line on
    stderr and no traceback: a refused or failed call, Ctrl-C, or a closed pipe (`... | head`)."""
    from latentwire.client import LatentwireError

    from .connection import ConnectionFlagsError

    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        # The command's `with` blocks have closed their channels, cancelling the calls in flight.
        print(getattr(args, "interrupted", None) or "cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python's documented way out: point stdout at devnull so the final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except LatentwireError as error:
        print(describe_error(error, args), file=sys.stderr)
        return 1
    except ConnectionFlagsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def describe_error(error, args: argparse.Namespace) -> str:
    """The line a failed call prints: where to start the suite when nothing listens, else code, message, reason."""
    if error.connection_refused:
        from latentwire.client.addresses import REGISTRY_ENV, SERVER_ENV, registry_address, server_address

        registry = hasattr(args, "registry")  # `models ...` talks to the registry
        flag, env = ("--registry", REGISTRY_ENV) if registry else ("--server", SERVER_ENV)
        address = error.address or (registry_address(args.registry) if registry
                                    else server_address(getattr(args, "server", None)))
        return (f"error: nothing listens at {address}. Start the suite with `latentwire up`, or point this "
                f"command at a running one with {flag} HOST:PORT (or {env}).")
    return f"error: {error.code.name}: {error.message}" + (f" [{error.reason}]" if error.reason else "")


def main(argv: list[str] | None = None) -> None:
    from .classify import normalize_argv

    args = build_parser().parse_args(normalize_argv(argv))  # `classify export` -> `classify-export`
    sys.exit(run(args))


if __name__ == "__main__":
    main()
