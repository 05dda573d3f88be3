"""`latentwire classify ...`: image classification from the command line.

    latentwire classify IMAGE... [--top-k K] [--model REF] [--server ADDR]   classify through a running suite
    latentwire classify export FOLDER [--output FILE]                      ONNX export for the onnx backend
    latentwire classify finetune --data DIR [--model REF] [--name NAME] ... fine-tune, store as a new version
    latentwire models create-tiny-classifier PATH [--full-size]            write a random-weight MobileViT

`classify export` and `classify finetune` are also spelled `classify-export` and
`classify-finetune` (argparse cannot give `classify` both free image arguments and
sub-commands, so the first word after `classify` picks the command; an image file named
"export" or "finetune" is given as ./export).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DEFAULT_SERVER = "localhost:50051"
_SUBCOMMANDS = {"export": "classify-export", "finetune": "classify-finetune"}


def normalize_argv(argv: list[str] | None) -> list[str]:
    """``classify export ...`` -> ``classify-export ...`` (and finetune); everything else unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(argv):
        if word == "classify" and i + 1 < len(argv) and argv[i + 1] in _SUBCOMMANDS:
            return argv[:i] + [_SUBCOMMANDS[argv[i + 1]]] + argv[i + 2:]
        if not word.startswith("-"):
            break  # only the command word counts, not an argument further on
    return argv


# -- latentwire classify IMAGE... ----------------------------------------------------------------


def cmd_classify(args: argparse.Namespace) -> int:
    from latentwire.client import LatentwireError
    from latentwire.client.classifier import ClassifierClient, logits_of

    images = []
    for path in args.images:
        try:
            images.append(Path(path).read_bytes())
        except OSError as error:
            print(f"error: {path}: {error.strerror or error}", file=sys.stderr)
            return 2
    from .connection import client_kwargs

    with ClassifierClient(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
        try:
            response = client.classify(images, model=args.model, top_k=args.top_k, include_logits=args.logits)
        except LatentwireError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    failed = 0
    rows = []
    for path, result in zip(args.images, response.results):
        if result.HasField("error"):
            failed += 1
        if args.json:
            row = {"image": path, "model": response.model}
            if result.HasField("error"):
                row["error"] = {"code": result.error.code, "reason": result.error.reason, "message": result.error.message}
            else:
                row["labels"] = [{"label": c.label, "class_index": c.class_index, "score": c.score} for c in result.classes]
                if args.logits:
                    row["logits"] = logits_of(result).tolist()
            rows.append(row)
        elif result.HasField("error"):
            print(f"{path}: error {result.error.reason}: {result.error.message}")
        else:
            print(f"{path}: " + ", ".join(f"{c.label} {c.score:.4f}" for c in result.classes))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"model {response.model}", file=sys.stderr)
    return 1 if failed else 0


# -- latentwire classify export ------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from latentwire.services.classifier.export import export_onnx

    try:
        result = export_onnx(args.folder, args.output, opset=args.opset, tolerance=args.tolerance,
                             allow_pickle=args.allow_pickle)
    except (SystemExit, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"ONNX Runtime vs PyTorch: max abs logit difference {result.max_abs_difference:.2e} "
          f"(input [batch, 3, {result.input_size[0]}, {result.input_size[1]}], {result.num_labels} labels, "
          f"{result.size_bytes / 1e6:.1f} MB)", file=sys.stderr)
    print(f"wrote {result.path}")
    return 0


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
    from latentwire.services.tiny_models import ensure_default_classifier

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
    from latentwire.services.classifier.finetune import FinetuneSettings, finetune

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
                                                 description=f"fine-tuned on {Path(args.data).name}")
        except (RegistryError, ModelFilesError, ValueError, OSError, SystemExit) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(f"{version.model_id}@{version.version}")  # stdout holds just the reference, for scripts
    return 0


# -- latentwire models create-tiny-classifier ----------------------------------------------------


def cmd_create_tiny_classifier(args: argparse.Namespace) -> int:
    from latentwire.services.tiny_models import create_tiny_classifier

    try:
        path = create_tiny_classifier(args.path, full_size=args.full_size, seed=args.seed)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `classify`, `classify-export` and `classify-finetune` to the top-level commands."""
    p = sub.add_parser("classify", help="classify images through a running suite (also: classify export | finetune)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP files")
    p.add_argument("--top-k", type=int, default=0, help="labels per image, 1 to the model's label count (default 5)")
    p.add_argument("--model", default="", help="model name or registry reference (default: the server's default)")
    p.add_argument("--server", default=DEFAULT_SERVER,
                   help=f"orchestrator (or classifier) address (default {DEFAULT_SERVER})")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of the request, in seconds")
    p.add_argument("--logits", action="store_true", help="also return the raw logits (with --json)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    from .connection import add_flags; add_flags(p)  # noqa: E702 - --token, --tls-* (cli/connection.py)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("classify-export", help="export a classifier folder to ONNX (model.onnx) for the onnx backend")
    p.add_argument("folder", help="transformers image-classification folder")
    p.add_argument("--output", default=None, help="ONNX file to write (default FOLDER/model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest max abs logit difference ONNX Runtime may show against PyTorch (default 1e-4)")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle-based weights")
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


def add_model_commands(models: argparse._SubParsersAction) -> None:
    """Add `models create-tiny-classifier`."""
    p = models.add_parser("create-tiny-classifier",
                          help="write a random-weight MobileViT image classifier (transformers format)")
    p.add_argument("path", help="folder to create")
    p.add_argument("--full-size", action="store_true",
                   help="the mobilevit-small architecture instead (5.6M parameters, 1000 labels; for benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.set_defaults(func=cmd_create_tiny_classifier)
