"""`latentwire classify ...`: image classification from the command line.

    latentwire classify IMAGE... [--top-k K] [--model REF] [--server ADDR]   classify through a running suite
    latentwire classify export FOLDER [--format onnx|coreml|tflite] [--int8] [--output FILE]
                               [--store [--name NAME] [--alias A] [--registry ADDR]]
                                                                           an export for the onnx, coreml or tflite
                                                                           backend (onnx --int8: quantized, checked
                                                                           against held-out data), stored in the
                                                                           registry with the folder when --store
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
from pathlib import Path

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
        response = client.classify(images, model=args.model, top_k=args.top_k, include_logits=args.logits)
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `classify`, `classify-export` and `classify-finetune` to the top-level commands."""
    p = sub.add_parser("classify", help="classify images through a running suite (also: classify export | finetune)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP files")
    p.add_argument("--top-k", type=int, default=0, help="labels per image, 1 to the model's label count (default 5)")
    p.add_argument("--model", default="", help="model name or registry reference (default: the server's default)")
    p.add_argument("--server", default=None, help="orchestrator (or classifier) address host:port "
                                                   "(default: $LATENTWIRE_SERVER, else localhost:50051)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of the request, in seconds")
    p.add_argument("--logits", action="store_true", help="also return the raw logits (with --json)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    from .connection import add_flags; add_flags(p)  # noqa: E702 - --token, --tls-* (cli/connection.py)
    p.set_defaults(func=cmd_classify)



