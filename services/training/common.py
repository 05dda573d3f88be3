"""What every trainer shares: thread limits, seeded per-step data, resumable checkpoints, atomic folder saves."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .dataset import draw_batch

__all__ = ["Checkpointer", "batch_tensors", "fast_forward", "limit_threads", "save_folder", "seed_everything"]

#: The trainers share a 2-core machine with other work; ``LATENTWIRE_TRAIN_THREADS`` overrides.
DEFAULT_THREADS = 2


def limit_threads() -> int:
    """Cap torch's intra-op threads (default 2, or $LATENTWIRE_TRAIN_THREADS); returns the number set."""
    threads = int(os.environ.get("LATENTWIRE_TRAIN_THREADS", DEFAULT_THREADS))
    torch.set_num_threads(threads)
    return threads


def batch_tensors(seed: int, stage: str, step: int, batch_size: int, *, held_out: bool = False):
    """The batch of ``step``: images as float (B, 3, 64, 64) in [0, 1], their samples.

    Drawn from ``[seed, stage, step]`` alone, so a resumed run sees exactly what an unbroken one would.
    """
    stage_key = int.from_bytes(stage.encode()[:8], "little")
    images, samples = draw_batch([seed, stage_key, step], batch_size, held_out=held_out)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return pixels, samples


class Checkpointer:
    """Saves and restores one stage's training state (modules, optimizer, step) at ``path`` atomically.

    Writes at most every ``every_s`` seconds (and when forced), so a killed run loses little work.
    """

    def __init__(self, path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 every_s: float = 60.0):
        self.path, self.modules, self.optimizer, self.every_s = Path(path), modules, optimizer, every_s
        self._last = time.monotonic()

    def restore(self) -> tuple[int, dict]:
        """Load the saved state if any; returns (next step, extra dict saved with it)."""
        if not self.path.is_file():
            return 0, {}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), state.get("extra", {})

    def maybe_save(self, step: int, extra: dict | None = None, force: bool = False) -> None:
        """Save (step = the next step to run) when forced or when ``every_s`` has passed."""
        if not force and time.monotonic() - self._last < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"modules": {n: m.state_dict() for n, m in self.modules.items()},
                 "optimizer": self.optimizer.state_dict(), "step": step, "extra": extra or {}}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self._last = time.monotonic()


def save_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` in a temporary sibling of ``target`` and rename it into place.

    ``target`` then either does not exist or holds a complete folder, which is what "this stage is done"
    means to the resumable ``all`` command. An existing ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        for item in [staging, *staging.rglob("*")]:  # mkdtemp makes 0700: give ordinary permissions
            item.chmod(0o755 if item.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fast_forward(schedule: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Advance a learning-rate schedule by ``steps`` (after a resume: the schedule is a function of the step)."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            schedule.step()


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's global generators (model initialisation draws from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def base_unet_sha256(pipeline: Path) -> str:
    """The sha256 of a pipeline folder's UNet weights: what a ControlNet or LoRA trained for it records, since a
    retrained UNet wants them retrained too."""
    return hashlib.sha256((Path(pipeline) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
