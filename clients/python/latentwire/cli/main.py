"""`latentwire`: start the suite, generate images, make models.

    latentwire up [--model PATH]                 start every service on this machine
    latentwire generate "a prompt" -o out.png    generate through a running suite
    latentwire demo                              up + generate + shut down, on the default model
    latentwire generate "a prompt" --init-image in.png [--mask mask.png] [--strength 0.6]
    latentwire generate "a prompt" --control canny:photo.png:0.8   ControlNet (repeatable)
    latentwire models create-tiny PATH [--inpainting | --controlnet]   write a tiny random-weight model
    latentwire schedulers                        list the schedulers a model accepts
    latentwire certs DIR [--hosts h1,h2]         write a development CA and certificates (then: up --tls-dir DIR)
    latentwire classify IMAGE... [--top-k K] [--model REF]   classify images (also: classify export | finetune)
    latentwire models create-tiny-classifier PATH [--full-size]   write a random-weight MobileViT classifier
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

DEFAULT_SERVER = "localhost:50051"


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
    from latentwire.client import Client, LatentwireError

    from .progress import ProgressBar

    if args.images < 1:
        print("error: --images must be at least 1", file=sys.stderr)
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
        model=args.model,
        include_pixels=args.save_pixels is not None,
        init_image=init_image,
        mask_image=mask_image,
        strength=args.strength,
        controlnets=controlnets,
        guess_mode=args.guess_mode,
    )
    from .connection import client_kwargs

    with Client(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
        try:
            result = client.generate(args.prompt, on_event=None if args.quiet else ProgressBar(), **settings)
        except LatentwireError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    paths = _output_paths(Path(args.output), len(result.images))
    for path, png in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    if args.save_pixels is not None:
        import numpy as np

        np.save(args.save_pixels, result.pixels)
    print(f"seed {result.seed}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def _start(model: str | None, args: argparse.Namespace):
    from latentwire.services.runtime.config import default_home
    from latentwire.services.suite.launcher import start_suite
    from latentwire.services.tiny_models import ensure_default_model

    controlnet = getattr(args, "controlnet", None)
    if model is None:
        print("no --model given: using the embedded default (tiny random-weight Stable Diffusion)", file=sys.stderr)
        model = str(ensure_default_model())
        if controlnet is None:
            from latentwire.services.tiny_models.controlnet import ensure_default_controlnet

            controlnet = str(ensure_default_controlnet())
    ports = {"orchestrator": args.port} if args.port is not None else {}
    if args.ephemeral_ports:
        ports = {"orchestrator": ports.get("orchestrator", 0), "text_encoder": 0, "denoiser": 0, "vae": 0,
                 "registry": 0, "controlnet": 0, "classifier": 0}
    log_dir = Path(args.log_dir) if args.log_dir else None
    registry_dir = None if args.no_registry else default_home() / "registry"
    classifier = None  # `up` runs the classifier (on the embedded tiny MobileViT unless told otherwise)
    if not getattr(args, "no_classifier", True):
        from latentwire.services.tiny_models import ensure_default_classifier

        classifier = args.classifier or str(ensure_default_classifier())
    extra_args = {}
    if args.command == "up":  # jobs outlive an `up` (a demo runs one job and ends)
        extra_args["orchestrator"] = ["--jobs-db", str(default_home() / "orchestrator" / "jobs.db")]
    return start_suite(model, host=args.host, ports=ports, log_dir=log_dir, registry_dir=registry_dir,
                       extra_args=extra_args,
                       cache_root=default_home() / "cache", controlnet=controlnet, classifier=classifier,
                       tls_dir=getattr(args, "tls_dir", None),
                       auth_tokens_file=getattr(args, "auth_tokens_file", None))


def cmd_up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        suite = _start(args.model, args)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, service in suite.services.items():
        print(f"  {name:<13} {service.address}  (pid {service.process.pid})", file=sys.stderr)
    print(f"latentwire is up; orchestrator at {suite.address}  (Ctrl-C stops every service)", flush=True)
    while not stop.is_set():
        if any(s.process.poll() is not None for s in suite.services.values()):
            dead = [n for n, s in suite.services.items() if s.process.poll() is not None]
            print(f"error: service(s) exited: {', '.join(dead)}; shutting down", file=sys.stderr)
            suite.stop()
            return 1
        stop.wait(1.0)
    print("shutting down ...", file=sys.stderr)
    codes = suite.stop()
    print("stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.log_dir is None:
        import time

        from latentwire.services.runtime.config import default_home

        home = default_home()
        args.log_dir = str(home / "logs" / time.strftime("demo-%Y%m%d-%H%M%S"))
        print(f"service logs: {args.log_dir}", file=sys.stderr)
    try:
        suite = _start(args.model, args)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with suite:
        print(f"latentwire is up; orchestrator at {suite.address}", file=sys.stderr)
        args.server = suite.address
        return cmd_generate(args)


def cmd_create_tiny(args: argparse.Namespace) -> int:
    if args.controlnet and args.inpainting:
        print("error: choose --controlnet or --inpainting, not both", file=sys.stderr)
        return 2
    if args.controlnet:
        from latentwire.services.tiny_models.controlnet import create_tiny_controlnet

        path = create_tiny_controlnet(args.path, full_size=args.full_size, seed=args.seed)
    else:
        from latentwire.services.tiny_models import create_tiny_sd

        path = create_tiny_sd(args.path, full_size=args.full_size, seed=args.seed, inpainting=args.inpainting)
    print(f"wrote {path}")
    return 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from latentwire.client import Client, LatentwireError

    from .connection import client_kwargs

    with Client(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
        try:
            response = client.list_schedulers(args.model)
        except LatentwireError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    for name in response.schedulers:
        print(name + ("  (default)" if name == response.default_scheduler else ""))
    return 0


def _add_generate_flags(p: argparse.ArgumentParser, *, prompt_required: bool) -> None:
    if prompt_required:
        p.add_argument("prompt", help="what the image should show")
    else:
        p.add_argument("prompt", nargs="?", default="a photo of an astronaut riding a horse on the moon",
                       help="what the image should show")
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write; with --images N also OUT-1.png ... OUT-(N-1).png (default: out.png)")
    p.add_argument("--negative", default="", help="negative prompt (used when --guidance > 1)")
    p.add_argument("--seed", type=int, default=None, help="noise seed; random when omitted (printed either way)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's, 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--width", type=int, default=0, help="width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--height", type=int, default=0, help="height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--images", type=int, default=1, help="images to generate in one batch (default 1)")
    p.add_argument("--scheduler", default="",
                   help="diffusers scheduler class, e.g. EulerAncestralDiscreteScheduler (default: the model's)")
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


def _add_suite_flags(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", default=None,
                       help="diffusers model folder (default: the embedded tiny model, built on first use)")
    p.add_argument("--host", default="127.0.0.1", help="interface every service listens on")
    p.add_argument("--port", type=int, default=None, help="orchestrator port (default 50051)")
    p.add_argument("--ephemeral-ports", action="store_true", help="let every service pick a free port")
    p.add_argument("--no-registry", action="store_true",
                   help="no model registry: every stage loads the model folder directly")
    p.add_argument("--log-dir", default=None, help="write each service's log to DIR/<service>.log")
    p.add_argument("--tls-dir", default=None,
                   help="mutual TLS between every service, with the certificates of this `latentwire certs` folder")
    if with_model:
        p.add_argument("--controlnet", default=None,
                       help="ControlNet model folder for the ControlNet service (default with the embedded model: "
                            "its tiny ControlNet; otherwise no ControlNet service)")
        p.add_argument("--classifier", default=None,
                       help="image-classification model folder for the classifier service (default: the embedded "
                            "tiny MobileViT, built on first use)")
        p.add_argument("--no-classifier", action="store_true", help="do not run the classifier service")
        p.add_argument("--auth-tokens-file", default=None,
                       help="the orchestrator accepts only the bearer tokens of this file ('TOKEN [SCOPE,...]' a line)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentwire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start every service on this machine and wait (Ctrl-C stops them)")
    _add_suite_flags(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("generate", help="generate images through a running suite")
    _add_generate_flags(p, prompt_required=True)
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"orchestrator address (default {DEFAULT_SERVER})")
    from .connection import add_flags; add_flags(p)  # noqa: E702 - --token, --tls-* (cli/connection.py)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="start the suite on the default model, generate one image, shut down")
    _add_generate_flags(p, prompt_required=False)
    _add_suite_flags(p, with_model=False)
    p.set_defaults(func=cmd_demo, ephemeral_ports=True)

    p = sub.add_parser("schedulers", help="list the scheduler class names a model accepts")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"orchestrator address (default {DEFAULT_SERVER})")
    p.add_argument("--model", default="", help="model name on the server")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    add_flags(p)
    p.set_defaults(func=cmd_schedulers)

    models = sub.add_parser("models", help="model tools").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("create-tiny", help="write a tiny random-weight Stable Diffusion model, inpainting model "
                                              "or ControlNet (diffusers format)")
    p.add_argument("path", help="folder to create")
    p.add_argument("--full-size", action="store_true", help="SD 1.5 architecture instead (about 4 GB, for benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--inpainting", action="store_true",
                   help="a dedicated inpainting model (9-channel UNet) instead")
    p.add_argument("--controlnet", action="store_true",
                   help="a ControlNet for the tiny model (or, with --full-size, for SD 1.5) instead")
    p.set_defaults(func=cmd_create_tiny)
    from .models import add_commands; add_commands(models)  # noqa: E702 - the registry commands (cli/models.py)
    from . import classify; classify.add_commands(sub); classify.add_model_commands(models)  # noqa: E702 - cli/classify.py
    from . import jobs; jobs.add_commands(sub)  # noqa: E702 - cli/jobs.py
    from . import certs; certs.add_command(sub)  # noqa: E702 - `latentwire certs` (cli/certs.py)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .classify import normalize_argv

    args = build_parser().parse_args(normalize_argv(argv))  # `classify export` -> `classify-export`
    if args.command == "demo":
        args.model = None
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
