"""ONNX export of a transformers image-classification folder, for the classifier's onnx backend.

The export is the project's own (no optimum): torch.onnx's TorchScript-based exporter
(``dynamo=False``, which needs no onnxscript), opset 17, one input ``pixel_values`` FP32
[batch, 3, height, width] and one output ``logits`` FP32 [batch, labels], batch dynamic. The
spatial size is fixed to what the model's image processor produces. Every export is checked:
ONNX Runtime must reproduce PyTorch's logits on seeded random inputs within ``tolerance``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import ONNX_FILE, ClassifierModel

#: Largest max abs logit difference between ONNX Runtime and PyTorch an export may show.
DEFAULT_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """Where the export went and how closely ONNX Runtime reproduces PyTorch."""

    path: Path
    input_size: tuple[int, int]
    num_labels: int
    max_abs_difference: float
    size_bytes: int


class _Logits(torch.nn.Module):
    """The classifier with a plain tensor output (the exporter then names exactly one output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def export_onnx(folder: str | os.PathLike, output: str | os.PathLike | None = None, *, opset: int = 17,
                tolerance: float = DEFAULT_TOLERANCE, allow_pickle: bool = False) -> ExportResult:
    """Export ``folder``'s model to ONNX (default ``folder/model.onnx``) and check it against PyTorch.

    Raises ValueError when ONNX Runtime's logits differ by more than ``tolerance``; the file is
    then not written. The file appears atomically (written beside it, then renamed).
    """
    import onnxruntime as ort

    folder = Path(folder)
    output = Path(output) if output is not None else folder / ONNX_FILE
    classifier = ClassifierModel(folder, backend="torch", device=torch.device("cpu"), dtype=torch.float32,
                                 allow_pickle=allow_pickle)
    if classifier.input_size is None:
        raise ValueError(f"{folder}: the image processor does not make one fixed input size; the export needs one")
    height, width = classifier.input_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    module = _Logits(classifier.model).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(handle)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(module, (example,), temporary, dynamo=False, input_names=["pixel_values"],
                              output_names=["logits"], opset_version=opset,
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        session = ort.InferenceSession(temporary, providers=["CPUExecutionProvider"])
        check = torch.rand(3, 3, height, width, generator=generator) * 2 - 1  # another batch size than the example
        with torch.inference_mode():
            expected = module(check).numpy()
        got = session.run(["logits"], {"pixel_values": check.numpy()})[0]
        difference = float(np.abs(expected - got).max())
        if not difference <= tolerance:
            raise ValueError(f"ONNX Runtime's logits differ from PyTorch's by {difference:.3g} (tolerance "
                             f"{tolerance:g}); the export was not written")
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return ExportResult(path=output, input_size=(height, width), num_labels=classifier.num_labels,
                        max_abs_difference=difference, size_bytes=output.stat().st_size)
