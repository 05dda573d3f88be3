"""``python -m services.training all --out DIR --seed N``: retrain the default models from scratch.

Stages, in order (each skipped when its folder is already complete, so an interrupted run resumes; a stage
interrupted half-way resumes from its checkpoint under DIR/checkpoints/):

1. classifier: DIR/classifier/   MobileViT shape classifier (transformers format)
2. vae:        DIR/vae/          AutoencoderKL (diffusers format)
3. unet:       DIR/pipeline/     StableDiffusionPipeline folder (UNet and text encoder trained here)
4. controlnet: DIR/controlnet/   ControlNetModel on canny edges for DIR/pipeline's UNet (diffusers format)
5. lora:       DIR/lora/COLOUR-shapes.safetensors   a LoRA for DIR/pipeline that draws every shape in one colour
6. evaluate:   DIR/samples.png and the held-out scores

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

#: Steps of each stage in a default retrain (the time budget below may end the UNet, ControlNet and LoRA stages
#: earlier).
DEFAULT_STEPS = {"classifier": 800, "vae": 2000, "unet": 8000, "controlnet": 3000, "lora": 1600}
#: ``all``'s default time budget: every stage, evaluations included, within this many minutes (issue 17: 90 on two
#: CPU cores). The UNet stage gets what the others leave.
DEFAULT_BUDGET_MINUTES = 85.0
#: Within a budget, the stages after the UNet get at most these minutes (caps, when not given explicitly) ...
BUDGET_CAPS_MINUTES = {"controlnet": 15.0, "lora": 5.0}
#: ... and this much is kept for the evaluations (ControlNet 24 images, LoRA 48, held-out 48; three to four minutes
#: on two cores).
EVALUATION_RESERVE_MINUTES = 6.0
STAGES = ("classifier", "vae", "unet", "controlnet", "lora", "evaluate")


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


def _done(out: Path, stage: str, record: dict, lora_colour: str) -> bool:
    folder = {"classifier": "classifier/config.json", "vae": "vae/config.json", "unet": "pipeline/model_index.json",
              "controlnet": "controlnet/config.json", "lora": f"lora/{lora_colour}-shapes.safetensors",
              "evaluate": "samples.png"}[stage]
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
             "controlnet": args.controlnet_steps, "lora": args.lora_steps}
    stages = STAGES if args.stage == "all" else (args.stage,)
    budget_s = args.minutes * 60 if args.stage == "all" and args.minutes else None
    # A resumed run counts the time its finished stages took.
    spent_before = sum(record["stages"].get(stage, {}).get("seconds", 0.0) for stage in STAGES
                       if _done(out, stage, record, args.lora_colour))
    run_began = time.monotonic()
    minutes = {"unet": args.unet_minutes, "controlnet": args.controlnet_minutes, "lora": args.lora_minutes}
    if budget_s is not None:
        for stage, cap in BUDGET_CAPS_MINUTES.items():
            minutes[stage] = min(minutes[stage] or cap, cap)
    for stage in stages:
        if _done(out, stage, record, args.lora_colour) and not args.redo:
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

            max_seconds = minutes["unet"] * 60 if minutes["unet"] else None
            if budget_s is not None:
                later = sum(minutes[s] for s in ("controlnet", "lora") if not _done(out, s, record, args.lora_colour))
                spent = spent_before + time.monotonic() - run_began
                left = budget_s - spent - (later + EVALUATION_RESERVE_MINUTES) * 60
                max_seconds = max(60.0, min(max_seconds or left, left))
                print(f"unet: at most {max_seconds / 60:.1f} minutes (the {args.minutes:g}-minute budget)",
                      file=sys.stderr)
            scores = train_unet(out, seed=args.seed, steps=steps["unet"], max_seconds=max_seconds)
        elif stage == "controlnet":
            from .controlnet import evaluate_controlnet, train_controlnet

            max_seconds = minutes["controlnet"] * 60 if minutes["controlnet"] else None
            scores = train_controlnet(out, seed=args.seed, steps=steps["controlnet"], max_seconds=max_seconds)
            if (out / "classifier" / "config.json").is_file():  # scored by the classifier stage's model
                result = evaluate_controlnet(out / "pipeline", out / "controlnet", out / "classifier", seed=args.seed)
                scores.update({f"square_edges_circle_prompt_{k}": result[k]
                               for k in ("square_share", "colour_share", "count")})
        elif stage == "lora":
            from .lora import evaluate_lora, lora_file, train_lora

            max_seconds = minutes["lora"] * 60 if minutes["lora"] else None
            scores = train_lora(out, seed=args.seed, steps=steps["lora"], colour=args.lora_colour,
                                max_seconds=max_seconds)
            if (out / "classifier" / "config.json").is_file():
                result = evaluate_lora(out / "pipeline", lora_file(out, args.lora_colour), out / "classifier",
                                       colour=args.lora_colour, seed=args.seed)
                scores.update({f"held_out_with_lora_{k}": v for k, v in result["lora"].items()})
                scores.update({f"held_out_without_lora_{k}": v for k, v in result["without"].items()})
                scores["lora_evaluated_prompts"] = result["count"]
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
    from .dataset import COLOUR_NAMES

    parser = argparse.ArgumentParser(prog="python -m services.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("all", *STAGES), help="what to (re)train; 'all' runs every stage")
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds an earlier run)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and noise (default 0)")
    parser.add_argument("--minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                        help="all: finish every stage within this many minutes; the UNet stage gets what the others "
                        f"leave, the ControlNet and LoRA at most {BUDGET_CAPS_MINUTES['controlnet']:g} and "
                        f"{BUDGET_CAPS_MINUTES['lora']:g} (default {DEFAULT_BUDGET_MINUTES:g}; 0: no budget, the "
                        "step counts alone)")
    parser.add_argument("--classifier-steps", type=int, default=DEFAULT_STEPS["classifier"])
    parser.add_argument("--vae-steps", type=int, default=DEFAULT_STEPS["vae"])
    parser.add_argument("--unet-steps", type=int, default=DEFAULT_STEPS["unet"])
    parser.add_argument("--unet-minutes", type=float, default=None,
                        help="end UNet training after this many minutes even if --unet-steps are not done")
    parser.add_argument("--controlnet-steps", type=int, default=DEFAULT_STEPS["controlnet"])
    parser.add_argument("--controlnet-minutes", type=float, default=None,
                        help="end ControlNet training after this many minutes even if --controlnet-steps are not done")
    parser.add_argument("--lora-steps", type=int, default=DEFAULT_STEPS["lora"])
    parser.add_argument("--lora-minutes", type=float, default=None,
                        help="end LoRA training after this many minutes even if --lora-steps are not done")
    parser.add_argument("--lora-colour", default="purple", choices=COLOUR_NAMES,
                        help="the colour the LoRA draws every shape in (default purple)")
    parser.add_argument("--redo", action="store_true", help="run a finished stage again: training continues from its checkpoint "
                        "(delete DIR/checkpoints/<stage>.pt to start over)")
    record = run(parser.parse_args(argv))
    print(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
