"""The server commands of `latentwire`: `up`, `demo`, `models create-tiny[-classifier]`,
`models convert-single-file`, `classify export|finetune`.

The `latentwire` command belongs to the client distribution (clients/python/latentwire/cli); these
commands need the suite's models and services, so the server distribution adds them through the
``latentwire.cli`` entry point (pyproject.toml) when it is installed.
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from latentwire.cli.main import _add_generate_flags, cmd_generate


def _start(model: str | None, args: argparse.Namespace):
    from services.runtime.config import default_home
    from services.suite.launcher import start_suite
    from services import default_models

    controlnet = getattr(args, "controlnet", None)
    loras = []
    if model is None:
        # The project's own trained model (services/default_models, docs/models.md): one shape in one colour on a
        # plain background, 64x64, prompted as "a red circle on a white background". Its canny ControlNet
        # (services/default_models/shapes-controlnet) is served only when given: --controlnet FOLDER.
        print("no --model given: using the embedded default (shapes-sd, trained by the project: prompts such as "
              "\"a red circle on a white background\"; see docs/models.md)", file=sys.stderr)
        model = str(default_models.pipeline_path())
        # Its LoRA that draws every shape purple, for <lora:purple-shapes:1> (LoRAs come from the registry).
        loras = [] if args.no_registry else [default_models.lora_path()]
    from services.suite.ports import PORT_ORDER, suite_ports

    ports = suite_ports(args.port) if args.port is not None else {}
    if args.ephemeral_ports:  # with --port too, the orchestrator keeps its port (the one clients are told)
        ports = {**dict.fromkeys(PORT_ORDER, 0), "orchestrator": ports.get("orchestrator", 0), "gateway": 0}
    if getattr(args, "gateway_port", None) is not None:
        ports["gateway"] = args.gateway_port
    log_dir = Path(args.log_dir) if args.log_dir else None
    registry_dir = None if args.no_registry else default_home() / "registry"
    classifier = None  # `up` runs the classifier (on the embedded shape classifier unless told otherwise)
    if not getattr(args, "no_classifier", True):
        classifier = args.classifier or str(default_models.classifier_path())
    extra_args = {}
    if args.command == "up":  # jobs outlive an `up` (a demo runs one job and ends)
        extra_args["orchestrator"] = ["--jobs-db", str(default_home() / "orchestrator" / "jobs.db")]
    return start_suite(model, host=args.host, ports=ports, log_dir=log_dir, registry_dir=registry_dir,
                       extra_args=extra_args,
                       cache_root=default_home() / "cache", controlnet=controlnet, classifier=classifier,
                       tls_dir=getattr(args, "tls_dir", None),
                       auth_tokens_file=getattr(args, "auth_tokens_file", None),
                       more_models=getattr(args, "add_model", None) or (),
                       text_encoder_replicas=[spec.split(",") for spec in getattr(args, "text_encoder_replica", None)
                                              or []] or None,
                       gateway=args.command == "up", loras=loras)  # the REST gateway (A1111's API, the page) on 7860


def _session_log_dir(prefix: str = "") -> Path:
    """``$LATENTWIRE_HOME/logs/<prefix><timestamp>/``: one folder per run, so logs of earlier runs stay."""
    from services.runtime.config import default_home

    return default_home() / "logs" / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def services_table(suite) -> str:
    """One table of the running services: name, address, pid and log file, orchestrator first."""
    from services.suite.ports import PORT_ORDER

    rows = [("SERVICE", "ADDRESS", "PID", "LOG")]
    for name in sorted(suite.services, key=lambda n: PORT_ORDER.index(n) if n in PORT_ORDER else len(PORT_ORDER)):
        service = suite.services[name]
        log = str(service.log_file) if service.log_file is not None else "(this terminal)"
        rows.append((name, service.address, str(service.process.pid), log))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows)


def cmd_up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.log_dir is None and not args.stream_logs:
        args.log_dir = str(_session_log_dir())
    try:
        suite = _start(args.model, args)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(services_table(suite))
    if len(suite.models) > 1:
        print(f"models: {suite.models[0]} (default), {', '.join(suite.models[1:])}")
    print(f"latentwire is up; orchestrator at {suite.address}  (Ctrl-C stops every service)", flush=True)
    if "gateway" in suite.services:
        print(f"web page and AUTOMATIC1111 API at http://{suite.services['gateway'].address}/", flush=True)
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
    if args.log_dir is None and not args.stream_logs:
        args.log_dir = str(_session_log_dir("demo-"))
        print(f"service logs: {args.log_dir}", file=sys.stderr)
    try:
        suite = _start(None, args)  # the embedded default; --model names the server's model to generate with
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
    if args.family != "sd15":
        # --full-size, --inpainting and --controlnet build SD 1.5 shapes only.
        chosen = [flag for flag, on in (("--full-size", args.full_size), ("--inpainting", args.inpainting),
                                        ("--controlnet", args.controlnet)) if on]
        if chosen:
            print(f"error: {chosen[0]} is only for --family sd15", file=sys.stderr)
            return 2
        from services.tiny_models.families import create_tiny_model

        path = create_tiny_model(args.path, args.family, seed=args.seed)
    elif args.controlnet:
        from services.tiny_models.controlnet import create_tiny_controlnet

        path = create_tiny_controlnet(args.path, full_size=args.full_size, seed=args.seed)
    else:
        from services.tiny_models import create_tiny_sd

        path = create_tiny_sd(args.path, full_size=args.full_size, seed=args.seed, inpainting=args.inpainting)
    print(f"wrote {path}")
    return 0


def cmd_convert_single_file(args: argparse.Namespace) -> int:
    from services.registry.single_file import convert_single_file
    from services.runtime.errors import LatentwireError

    try:
        out = convert_single_file(args.checkpoint, args.out_dir, family=args.family, config=args.config,
                                  tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    except LatentwireError as error:
        print(f"error: {error.message} [{error.reason}]", file=sys.stderr)
        return 2
    print(f"wrote {out}; upload it with `latentwire models import {out}`", file=sys.stderr)
    print(out)  # stdout holds just the folder, for scripts
    return 0


def _add_suite_flags(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", default=None,
                       help="diffusers model folder of any family: SD 1.x/2.x, SDXL (and its refiner), SD3, Flux "
                            "(default: the embedded shapes-sd, trained by the project: services/default_models)")
    from services.suite.ports import DEFAULT_BASE_PORT, PORT_ORDER

    p.add_argument("--host", default="127.0.0.1", help="interface every service listens on")
    order = ", ".join(f"{name} N+{offset}" for offset, name in enumerate(PORT_ORDER) if offset)
    p.add_argument("--port", "--base-port", dest="port", type=int, default=None, metavar="N",
                   help=f"orchestrator port N (the address clients use); every other service moves with it: "
                        f"{order} (default {DEFAULT_BASE_PORT})")
    p.add_argument("--ephemeral-ports", action="store_true",
                   help="let every service pick a free port (the orchestrator too, unless --port)")
    p.add_argument("--no-registry", action="store_true",
                   help="no model registry: every stage loads the model folder directly")
    logs = p.add_mutually_exclusive_group()
    logs.add_argument("--log-dir", default=None,
                      help="write each service's log to DIR/<service>.log (default $LATENTWIRE_HOME/logs/<timestamp>/)")
    logs.add_argument("--stream-logs", action="store_true",
                      help="let every service log to this terminal instead of to files")
    p.add_argument("--tls-dir", default=None,
                   help="mutual TLS between every service, with the certificates of this `latentwire certs` folder "
                        "(the launcher seeds the registry as its 'operator')")
    if with_model:
        p.add_argument("--controlnet", default=None,
                       help="ControlNet model folder for the ControlNet service (default: no ControlNet service)")
        p.add_argument("--classifier", default=None,
                       help="image-classification model folder for the classifier service (default: the embedded "
                            "shapes-classifier, trained by the project: names the shape in an image)")
        p.add_argument("--no-classifier", action="store_true", help="do not run the classifier service")
        p.add_argument("--add-model", action="append", default=[], metavar="PATH",
                       help="another model folder the stages serve (repeatable), by its folder name: an SDXL "
                            "refiner for `generate --refiner NAME`, a second model for `generate --model NAME`")
        p.add_argument("--text-encoder-replica", action="append", default=[], metavar="ENCODER[,ENCODER...]",
                       help="run a text-encoder replica hosting only these encoders (repeatable: one replica each), "
                            "e.g. --text-encoder-replica text_encoder --text-encoder-replica text_encoder_2 puts "
                            "Flux's T5 on its own process; the orchestrator combines them")
        p.add_argument("--auth-tokens-file", default=None,
                       help="the orchestrator (and, with --tls-dir, the classifier) accepts only the bearer tokens "
                            "of this file ('TOKEN [SCOPE,...] [principal=NAME]' a line); under `up` the REST gateway "
                            "calls with its own token (the line with principal=gateway, else one made for this run)")


# -- latentwire classify export ---------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from services.classifier.export import export_onnx
    from services.runtime.errors import ConfigurationError, ModelFolderError

    if args.calibration_data is not None and not (args.int8 and args.format == "onnx"):
        print("error: --calibration-data calibrates static int8: use it with --format onnx --int8", file=sys.stderr)
        return 2
    if args.int8 and args.format == "onnx" and args.calibration_data is None:
        print("error: --format onnx --int8 is static int8 and needs --calibration-data DIR (a folder of PNG/JPEG "
              "images like the ones the model will classify)", file=sys.stderr)
        return 2
    if args.int8 and args.format == "onnx" and args.output is not None:
        print("error: --output does not go with --format onnx --int8: both files go into FOLDER (model.onnx, "
              "model.int8.onnx), where the onnx and onnx-int8 backends look", file=sys.stderr)
        return 2
    if args.store and args.output is not None:
        print("error: --store keeps the folder with its exports as a registry version: the export goes into "
              "FOLDER, so leave out --output", file=sys.stderr)
        return 2
    if args.format != "onnx":
        return _export_mobile(args)
    try:
        if args.int8:  # refuse a bad image folder before exporting anything
            from services.classifier.quantize import list_images

            list_images(args.calibration_data)
            if args.heldout_data is not None:
                list_images(args.heldout_data, "--heldout-data")
        result = export_onnx(args.folder, args.output, opset=args.opset, tolerance=args.tolerance,
                             allow_pickle=args.allow_pickle)
        print(f"ONNX Runtime vs PyTorch: max abs logit difference {result.max_abs_difference:.2e} "
              f"(input [batch, 3, {result.input_size[0]}, {result.input_size[1]}], {result.num_labels} labels, "
              f"{result.size_bytes / 1e6:.1f} MB)", file=sys.stderr)
        print(f"wrote {result.path}")
        if args.int8:
            from services.classifier.quantize import quantize_static_onnx

            print(f"static int8: calibrating on {args.calibration_data} ...", file=sys.stderr)
            path, report = quantize_static_onnx(args.folder, args.calibration_data, heldout_dir=args.heldout_data,
                                                min_agreement=args.min_agreement)
            print(f"static int8 vs float32 on {report.heldout_images} held-out images ({report.heldout_source}): "
                  f"top-1 agreement {report.top1_agreement:.1%}, max score difference "
                  f"{report.max_score_difference:.3g} ({report.calibration_images} calibration images, "
                  f"{report.int8_size_bytes / 1e6:.1f} MB)", file=sys.stderr)
            for note in report.notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"wrote {path}")
            print(f"wrote {path.with_suffix('.json')}")
    except (ModelFolderError, ConfigurationError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return _store_export(args, ["onnx", "onnx-int8"] if args.int8 else ["onnx"])


def _store_export(args: argparse.Namespace, formats: list[str]) -> int:
    """--store: FOLDER with its exports as a new registry version, tagged with what each export is."""
    if not args.store:
        return 0
    from latentwire.client.registry import ModelFilesError, RegistryError
    from services.classifier.export import store_exports

    try:
        version = store_exports(args.folder, name=args.name, registry=args.registry, aliases=args.alias,
                                formats=formats)
    except (RegistryError, ModelFilesError, ValueError, OSError) as error:
        print(f"error: storing in the registry: {error}", file=sys.stderr)
        return 1
    print(f"stored {version.model_id}@{version.version} (exports {version.tags['exports']})")
    return 0


def _export_mobile(args: argparse.Namespace) -> int:
    """`classify export --format coreml|tflite`: the converter runs where it is installed."""
    from services.classifier import export
    from services.runtime.errors import ConfigurationError, ModelFolderError

    convert = export.export_coreml if args.format == "coreml" else export.export_tflite
    try:
        result = convert(args.folder, args.output, int8=args.int8, allow_pickle=args.allow_pickle)
    except (ModelFolderError, ConfigurationError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in result.checks:
        print(line, file=sys.stderr)
    print(f"wrote {result.path}")
    return _store_export(args, [args.format + ("-int8" if args.int8 else "")])


# -- latentwire classify finetune ----------------------------------------------------------------


class _FinetuneProgress:
    """A step bar on terminals; one line per epoch (loss, held-out accuracy) everywhere."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream, self.quiet, self.tty = stream, quiet, stream.isatty()

    def __call__(self, progress) -> None:
        if self.quiet:
            return
        head = f"epoch {progress.epoch}/{progress.epochs} step {progress.step}/{progress.steps} loss {progress.loss:.4f}"
        if progress.heldout_accuracy is not None:
            end = "\n"
            text = f"{head}  held-out accuracy {progress.heldout_accuracy:.3f}  ({progress.elapsed_seconds:.1f} s)"
        elif self.tty:
            end, text = "", head
        else:
            return
        self.stream.write(("\r" if self.tty else "") + text + end)
        self.stream.flush()


def _base_model(reference: str | None, registry_address: str | None, workdir: Path) -> tuple[Path, str, str]:
    """The base model's local folder, a name for it and where it came from: a folder as is, else a
    registry reference fetched (then the source is "name@VERSION")."""
    from services.tiny_models import ensure_default_classifier

    if reference is None:
        folder = ensure_default_classifier()
        return folder, folder.name, str(folder)
    folder = Path(reference).expanduser()
    if folder.is_dir():
        return folder, folder.name, str(folder.resolve())
    from latentwire.client.registry import RegistryClient

    with RegistryClient(registry_address) as registry:
        version = registry.resolve(reference)
        fetched = registry.download_files(version, workdir / "base")
    print(f"base model {version.model_id}@{version.version} from the registry", file=sys.stderr)
    return fetched.folder, version.model_id, f"{version.model_id}@{version.version}"


def cmd_finetune(args: argparse.Namespace) -> int:
    from latentwire.client.registry import ModelFilesError, RegistryClient, RegistryError
    from services.classifier.finetune import FinetuneSettings, finetune
    from services.runtime.errors import ModelFolderError

    if args.no_registry and not args.output:
        print("error: --no-registry needs --output DIR (where to keep the fine-tuned model)", file=sys.stderr)
        return 2
    settings = FinetuneSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                backbone_learning_rate=args.backbone_learning_rate,
                                unfreeze_backbone=args.unfreeze_backbone, heldout_fraction=args.heldout_fraction,
                                seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="latentwire-finetune-") as tmp:
        workdir = Path(tmp)
        try:
            base, base_name, source = _base_model(args.model, args.registry, workdir)
            output = Path(args.output) if args.output else workdir / "finetuned"
            print(f"fine-tuning {base} on {args.data} ("
                  + ("backbone unfrozen" if args.unfreeze_backbone else "head only") + ")", file=sys.stderr)
            result = finetune(base, args.data, output, settings, heldout_dir=args.heldout_data,
                              on_progress=_FinetuneProgress(quiet=args.quiet), allow_pickle=args.allow_pickle)
            print(f"labels {', '.join(result.labels)}; {result.train_count} training and {result.heldout_count} "
                  f"held-out images; held-out accuracy {result.heldout_accuracy:.3f}", file=sys.stderr)
            if args.output:
                print(f"wrote {result.folder}", file=sys.stderr)
            if args.no_registry:
                print(result.folder)
                return 0
            name = args.name or base_name
            tags = {"finetuned_from": source,
                    "heldout_accuracy": f"{result.heldout_accuracy:.4f}", "labels": ",".join(result.labels),
                    "epochs": str(args.epochs), "unfreeze_backbone": str(args.unfreeze_backbone).lower()}
            with RegistryClient(args.registry) as registry:
                version = registry.import_folder(result.folder, name, aliases=args.alias, tags=tags,
                                                 description=f"fine-tuned on {Path(args.data).name}").model_version
        except (RegistryError, ModelFilesError, ModelFolderError, ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(f"{version.model_id}@{version.version}")  # stdout holds just the reference, for scripts
    return 0


# -- latentwire models create-tiny-classifier ----------------------------------------------------


def cmd_create_tiny_classifier(args: argparse.Namespace) -> int:
    from services.tiny_models import create_tiny_classifier

    try:
        path = create_tiny_classifier(args.path, full_size=args.full_size, seed=args.seed)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def add_commands(sub: argparse._SubParsersAction, models: argparse._SubParsersAction) -> None:
    """Add `up`, `demo`, `classify-export`, `classify-finetune`, `models create-tiny` and `models create-tiny-classifier`."""
    p = sub.add_parser("up", help="start every service on this machine and wait (Ctrl-C stops them)")
    _add_suite_flags(p)
    p.add_argument("--gateway-port", type=int, default=None, metavar="PORT",
                   help="port of the REST gateway (AUTOMATIC1111's API and the web page; default 7860, A1111's, "
                        "also with --port; a free one with --ephemeral-ports); 0 picks a free one")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="start the suite on the default model, generate one image, shut down")
    _add_generate_flags(p, prompt_required=False)
    _add_suite_flags(p, with_model=False)
    p.set_defaults(func=cmd_demo, ephemeral_ports=True)

    p = sub.add_parser("classify-export", help="export a classifier folder to ONNX (model.onnx) for the onnx backend, "
                                               "with --int8 also static int8 (model.int8.onnx); or to CoreML / TFLite")
    p.add_argument("folder", help="transformers image-classification folder")
    p.add_argument("--format", choices=("onnx", "coreml", "tflite"), default="onnx",
                   help="onnx (default; ONNX Runtime backends), coreml (.mlpackage, needs coremltools) or tflite "
                        "(.tflite, needs litert-torch and ai-edge-litert)")
    p.add_argument("--int8", action="store_true",
                   help="also an int8 variant: with onnx static int8 (convolutions included) calibrated on "
                        "--calibration-data, written as FOLDER/model.int8.onnx with its accuracy report "
                        "model.int8.json, for the onnx-int8 backend; with coreml / tflite int8 weights")
    p.add_argument("--calibration-data", default=None, metavar="DIR",
                   help="folder of PNG/JPEG/WebP images (searched recursively) that calibrate static int8; one in "
                        "five is held out for the accuracy report unless --heldout-data is given")
    p.add_argument("--heldout-data", default=None, metavar="DIR",
                   help="folder of images for the accuracy report of static int8 against float32 (default: one "
                        "in five --calibration-data images, not used to calibrate)")
    p.add_argument("--min-agreement", type=float, default=0.98,
                   help="least top-1 agreement of static int8 with float32 on the held-out images for the int8 "
                        "model to be written (default 0.98)")
    p.add_argument("--output", default=None,
                   help="file to write (default FOLDER/model.onnx, FOLDER/model.mlpackage, FOLDER/model.tflite; "
                        "int8 variants model.int8.*)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest max abs logit difference ONNX Runtime may show against PyTorch (default 1e-4)")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle-based weights")
    p.add_argument("--store", action="store_true",
                   help="then store FOLDER with its exports as a new version in the registry, tagged exports=... "
                        "and export.NAME=FILE per export (registry clients and the classifier fetch them with it)")
    p.add_argument("--name", default=None, help="with --store: registry model the version joins (default: the "
                                                "folder's name)")
    p.add_argument("--alias", action="append", default=[], help="with --store: alias to point at the new version; "
                                                                "repeatable")
    p.add_argument("--registry", default=None,
                   help="with --store: registry address (default: $LATENTWIRE_REGISTRY, else localhost:50055)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("classify-finetune", help="fine-tune a classifier on an image folder; store it in the registry")
    p.add_argument("--data", required=True, help="image folder: one sub-folder of PNG/JPEG/WebP images per label")
    p.add_argument("--heldout-data", default=None,
                   help="held-out folder with the same labels (default: hold out --heldout-fraction of --data)")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="share of each label held out (default 0.2)")
    p.add_argument("--model", default=None,
                   help="base model: a folder or a registry reference (default: the embedded tiny MobileViT)")
    p.add_argument("--name", default=None, help="registry model the result becomes a new version of "
                                                "(default: the base model's name)")
    p.add_argument("--alias", action="append", default=[], help="alias to point at the new version; repeatable")
    p.add_argument("--registry", default=None,
                   help="registry address (default: $LATENTWIRE_REGISTRY, else localhost:50055)")
    p.add_argument("--no-registry", action="store_true", help="only write --output, store nothing in the registry")
    p.add_argument("--output", default=None, help="also keep the fine-tuned folder here (a new folder)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training images (default 10)")
    p.add_argument("--batch-size", type=int, default=16, help="images per training step (default 16)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="AdamW learning rate of the new head (default 1e-2)")
    p.add_argument("--backbone-learning-rate", type=float, default=3e-3,
                   help="learning rate of the backbone with --unfreeze-backbone (default 3e-3)")
    p.add_argument("--unfreeze-backbone", action="store_true", help="train the whole model, not only the head")
    p.add_argument("--seed", type=int, default=0, help="seed of the head, the split and the batch order (default 0)")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle-based weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_finetune)

    p = models.add_parser("create-tiny", help="write a tiny random-weight model of a family (SD 1.5, SDXL and its "
                                              "refiner, SD3, Flux), an inpainting model or a ControlNet "
                                              "(diffusers format)")
    p.add_argument("path", help="folder to create")
    # The literal list (not tiny_models.FAMILIES): importing that package pulls in torch and diffusers.
    p.add_argument("--family", choices=("sd15", "sdxl", "sdxl-refiner", "sd3", "flux"), default="sd15",
                   help="model family (default sd15: a Stable Diffusion 1.x-shaped model)")
    p.add_argument("--full-size", action="store_true", help="SD 1.5 architecture instead (about 4 GB, for benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--inpainting", action="store_true",
                   help="a dedicated inpainting model (9-channel UNet) instead")
    p.add_argument("--controlnet", action="store_true",
                   help="a ControlNet for the tiny model (or, with --full-size, for SD 1.5) instead")
    p.set_defaults(func=cmd_create_tiny)

    p = models.add_parser("convert-single-file",
                          help="convert one original-layout checkpoint (.safetensors) into a diffusers folder, "
                               "offline, for `models import`")
    p.add_argument("checkpoint", help="the single .safetensors file")
    p.add_argument("out_dir", help="folder to create")
    # The literal list (not single_file.FAMILIES): importing that module pulls in the runtime.
    p.add_argument("--family", default=None, choices=("sd15", "sd15-inpainting", "sd2", "sdxl", "sdxl-refiner"),
                   help="expected family; default: recognised from the keys (configs ship for sd15, sdxl and "
                        "sdxl-refiner)")
    p.add_argument("--config", default=None,
                   help="a diffusers folder whose configs to use (default: the shipped configs of the family, "
                        "for full-size checkpoints)")
    p.add_argument("--tokenizer", default=None,
                   help="a CLIP tokenizer folder (vocab.json, merges.txt) to use when --config has no tokenizer/; "
                        "it serves both of SDXL's tokenizers (default: CLIP's tokenizer, built from the shipped "
                        "vocabulary)")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle .ckpt (runs code: trusted files only)")
    p.set_defaults(func=cmd_convert_single_file)

    p = models.add_parser("create-tiny-classifier",
                          help="write a random-weight MobileViT image classifier (transformers format)")
    p.add_argument("path", help="folder to create")
    p.add_argument("--full-size", action="store_true",
                   help="the mobilevit-small architecture instead (5.6M parameters, 1000 labels; for benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.set_defaults(func=cmd_create_tiny_classifier)
