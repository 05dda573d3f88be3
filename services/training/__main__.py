"""``python -m services.training all --out DIR --seed N``: retrain the default models from scratch.

Stages, in order (each skipped when its folder is already complete, so an interrupted run resumes; a stage
interrupted half-way resumes from its checkpoint under DIR/checkpoints/):

1. classifier: DIR/classifier/   MobileViT shape classifier (transformers format)
2. vae:        DIR/vae/          AutoencoderKL (diffusers format)
3. unet:       DIR/pipeline/     StableDiffusionPipeline folder (UNet and text encoder trained here)
4. controlnet: DIR/controlnet/   ControlNetModel on canny edges for DIR/pipeline's UNet (diffusers format)
5. evaluate:   DIR/samples.png and the held-out scores

DIR/RECORD.json records the command, seed, commit, library versions, each stage's duration and scores.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

#: Steps of each stage in a default retrain, sized for about 90 minutes on two CPU cores.
DEFAULT_STEPS = {"classifier": 800, "vae": 2000, "unet": 8000, "controlnet": 3000}
STAGES = ("classifier", "vae", "unet", "controlnet", "evaluate")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _load_record(out: Path) -> dict:
    path = out / "RECORD.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_record(out: Path, record: dict) -> None:
    path = out / "RECORD.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _done(out: Path, stage: str, record: dict) -> bool:
    folder = {"classifier": "classifier/config.json", "vae": "vae/config.json", "unet": "pipeline/model_index.json",
              "controlnet": "controlnet/config.json", "evaluate": "samples.png"}[stage]
    return (out / folder).is_file() and stage in record.get("stages", {})


def run(args: argparse.Namespace) -> dict:
    """Run the chosen stages into ``args.out``, skipping finished ones; returns the record."""
    from .common import limit_threads

    threads = limit_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = _load_record(out)
    if record and record.get("seed") != args.seed:
        raise SystemExit(f"{out} holds a run with seed {record.get('seed')}; use another --out or the same --seed")
    record.update(seed=args.seed, commit=record.get("commit") or _commit(), versions=_versions(), threads=threads)
    record.setdefault("commands", []).append(" ".join(["python -m services.training", *sys.argv[1:]]))
    record.setdefault("stages", {})
    steps = {"classifier": args.classifier_steps, "vae": args.vae_steps, "unet": args.unet_steps,
             "controlnet": args.controlnet_steps}
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if _done(out, stage, record) and not args.redo:
            print(f"{stage}: done already (in {out}), skipped", file=sys.stderr)
            continue
        began = time.monotonic()
        if stage == "classifier":
            from .classifier import train_classifier

            scores = train_classifier(out, seed=args.seed, steps=steps["classifier"])
        elif stage == "vae":
            from .vae import train_vae

            scores = train_vae(out, seed=args.seed, steps=steps["vae"])
        elif stage == "unet":
            from .unet import train_unet

            max_seconds = args.unet_minutes * 60 if args.unet_minutes else None
            scores = train_unet(out, seed=args.seed, steps=steps["unet"], max_seconds=max_seconds)
        elif stage == "controlnet":
            from .controlnet import evaluate_controlnet, train_controlnet

            max_seconds = args.controlnet_minutes * 60 if args.controlnet_minutes else None
            scores = train_controlnet(out, seed=args.seed, steps=steps["controlnet"], max_seconds=max_seconds)
            if (out / "classifier" / "config.json").is_file():  # scored by the classifier stage's model
                result = evaluate_controlnet(out / "pipeline", out / "controlnet", out / "classifier", seed=args.seed)
                scores.update({f"square_edges_circle_prompt_{k}": result[k]
                               for k in ("square_share", "colour_share", "count")})
        else:
            from .evaluate import evaluate_pipeline

            result = evaluate_pipeline(out / "pipeline", out / "classifier", seed=args.seed,
                                       grid_path=out / "samples.png")
            result.pop("items")
            scores = {f"held_out_{k}": v for k, v in result.items()}
        record["stages"][stage] = {"seconds": round(time.monotonic() - began, 1), **scores}
        _save_record(out, record)
        print(f"{stage}: {json.dumps(record['stages'][stage])}", file=sys.stderr)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))
             if "checkpoints" not in p.parts}
    record["weights_bytes"] = sum(sizes.values())
    record["weights"] = sizes
    _save_record(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("all", *STAGES), help="what to (re)train; 'all' runs every stage")
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds an earlier run)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and noise (default 0)")
    parser.add_argument("--classifier-steps", type=int, default=DEFAULT_STEPS["classifier"])
    parser.add_argument("--vae-steps", type=int, default=DEFAULT_STEPS["vae"])
    parser.add_argument("--unet-steps", type=int, default=DEFAULT_STEPS["unet"])
    parser.add_argument("--unet-minutes", type=float, default=None,
                        help="end UNet training after this many minutes even if --unet-steps are not done")
    parser.add_argument("--controlnet-steps", type=int, default=DEFAULT_STEPS["controlnet"])
    parser.add_argument("--controlnet-minutes", type=float, default=None,
                        help="end ControlNet training after this many minutes even if --controlnet-steps are not done")
    parser.add_argument("--redo", action="store_true", help="run a finished stage again: training continues from its checkpoint "
                        "(delete DIR/checkpoints/<stage>.pt to start over)")
    record = run(parser.parse_args(argv))
    print(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
