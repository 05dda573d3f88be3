"""Static int8 quantization of a classifier's ONNX export, calibrated on images, for the onnx-int8 backend.

Post-training static quantization with ONNX Runtime (onnxruntime.quantization.quantize_static):
weights int8 per output channel (symmetric), activations uint8 per tensor with ranges measured
on calibration images, stored as QuantizeLinear/DequantizeLinear pairs (the QDQ format) around
the convolutions and matrix products. ONNX Runtime's CPU provider fuses each pair into an integer
kernel (QLinearConv, QLinearMatMul), so the convolutions that dominate MobileViT run in int8 too,
unlike the torch backend's dynamic int8, which has Linear kernels only.

The calibration images are preprocessed by the model's own image processor, as the service does.
Every quantization is checked: float32 and int8 ONNX Runtime classify held-out images (not used
for calibration) and the report gives top-1 agreement and the largest score difference; the
report is written as JSON beside the model (model.int8.json) and the int8 model is written only
when its agreement reaches ``min_agreement``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .finetune import IMAGE_SUFFIXES
from .model import ONNX_FILE, ONNX_INT8_FILE, ClassifierModel

#: Top-1 agreement with float32 an int8 model must reach to be written (issue 18's acceptance: 98 %).
DEFAULT_MIN_AGREEMENT = 0.98
#: Share of the calibration folder held out for the accuracy report when no held-out folder is given.
DEFAULT_HELDOUT_FRACTION = 0.2
#: Most calibration images used (ranges settle long before; more only costs time).
DEFAULT_MAX_CALIBRATION_IMAGES = 256
#: Operators quantized: the convolutions and matrix products (MobileViT's compute). The rest
#: (softmax, layer norm, activations) stays float32 between them, as ONNX Runtime's fusions expect.
OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass
class QuantizeReport:
    """How the int8 model compares with float32 on held-out images; written as JSON beside the model."""

    model: str
    quantization: dict
    calibration_images: int
    heldout_images: int
    top1_agreement: float
    top5_overlap: float
    max_score_difference: float
    mean_score_difference: float
    max_logit_difference: float
    float32_size_bytes: int
    int8_size_bytes: int
    seconds: float
    heldout_source: str = ""
    notes: list[str] = field(default_factory=list)


def list_images(folder: str | os.PathLike, flag: str = "--calibration-data") -> list[Path]:
    """The PNG/JPEG/WebP files under ``folder`` (recursively, sorted); ValueError naming ``flag`` when none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{flag} {root}: not a folder; give a folder of PNG/JPEG/WebP images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{flag} {root}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def split_calibration(paths: list[Path], heldout_fraction: float) -> tuple[list[Path], list[Path]]:
    """Every k-th image held out (k = 1 / fraction, rounded), the rest calibrates; both non-empty."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {heldout_fraction}")
    if len(paths) < 2:
        raise ValueError(f"--calibration-data has {len(paths)} image: at least 2 are needed (one to calibrate, "
                         "one to check), or give --heldout-data")
    step = max(2, round(1 / heldout_fraction))
    heldout = paths[step - 1::step] or paths[-1:]
    chosen = set(heldout)
    return [p for p in paths if p not in chosen], heldout


def _pixel_values(classifier: ClassifierModel, paths: list[Path]) -> np.ndarray:
    """Image files -> model inputs [n, 3, height, width] float32: decoded as the service decodes request
    images (EXIF orientation, RGB), then the model's own image processor."""
    from services.runtime import limits
    from services.runtime.errors import InvalidArgument

    from .images import decode_image

    arrays = []
    for path in paths:
        try:
            image = decode_image(path.read_bytes(), field=path.name, max_pixels=limits.MAX_INPUT_PIXELS)
        except InvalidArgument as error:
            raise ValueError(f"calibration image {error.message}") from None
        arrays.append(classifier.preprocess(image).numpy())
    return np.stack(arrays).astype(np.float32)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed images, a few per batch."""

    def __init__(self, pixel_values: np.ndarray, batch_size: int = 8):
        self._batches = iter([pixel_values[i:i + batch_size] for i in range(0, len(pixel_values), batch_size)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"pixel_values": np.ascontiguousarray(batch)}

    def rewind(self):  # not needed by MinMax calibration; part of the reader protocol
        pass


def _head_nodes(model_path: Path) -> list[str]:
    """The nodes of the classification head (the last Gemm/MatMul feeding the logits), kept float32.

    Its input is one pooled feature vector per image, whose per-tensor quantization dominated the
    top-1 disagreement of the dynamic int8 backend too (model.quantize_int8).
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    frontier, heads = [o.name for o in graph.output], []
    seen: set[str] = set()
    while frontier:  # walk back from the logits through shape-only nodes to the head's matrix product
        name = frontier.pop()
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            heads.append(node.name)
            continue
        if node.op_type in ("Add", "Reshape", "Flatten", "Identity", "Squeeze"):
            frontier.extend(node.input)
    return heads


def quantize_static_onnx(folder: str | os.PathLike, calibration_dir: str | os.PathLike, *,
                         heldout_dir: str | os.PathLike | None = None,
                         heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                         max_calibration_images: int = DEFAULT_MAX_CALIBRATION_IMAGES,
                         min_agreement: float = DEFAULT_MIN_AGREEMENT,
                         output: str | os.PathLike | None = None) -> tuple[Path, QuantizeReport]:
    """Quantize ``folder``'s model.onnx to static int8 (default ``folder/model.int8.onnx``), calibrated on
    ``calibration_dir``'s images; returns the file and the accuracy report (also written beside it as JSON).

    Raises ValueError for a missing or empty image folder, a folder without model.onnx, or an int8
    model whose top-1 agreement with float32 is under ``min_agreement`` (nothing is written then,
    except the report, so the figures can be read).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.monotonic()
    folder = Path(folder)
    source = folder / ONNX_FILE
    if not source.is_file():
        raise ValueError(f"{folder.name} has no {ONNX_FILE}; export it first (`latentwire classify export FOLDER`)")
    if max_calibration_images < 1:
        raise ValueError(f"the calibration image count must be at least 1, got {max_calibration_images}")
    paths = list_images(calibration_dir)
    if heldout_dir is not None:
        calibration, heldout = paths, list_images(heldout_dir, "--heldout-data")
        heldout_source = str(heldout_dir)
    else:
        calibration, heldout = split_calibration(paths, heldout_fraction)
        heldout_source = f"every {max(2, round(1 / heldout_fraction))}th image of the calibration folder"
    calibration = calibration[:max_calibration_images]
    output = Path(output) if output is not None else folder / ONNX_INT8_FILE
    report_path = output.with_suffix(".json")

    classifier = ClassifierModel(folder, backend="onnx", device=torch.device("cpu"), dtype=torch.float32,
                                 allow_pickle=False)
    calibration_inputs = _pixel_values(classifier, calibration)
    heldout_inputs = _pixel_values(classifier, heldout)
    settings = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
                "weight_type": "int8", "activation_type": "uint8", "calibration": "MinMax",
                "op_types": list(OP_TYPES)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=output.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph cleanup first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        excluded = _head_nodes(prepared)
        settings["float32_nodes"] = excluded
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), _Reader(calibration_inputs), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(OP_TYPES), per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=excluded)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        int8 = ort.InferenceSession(str(quantized), sess_options=options, providers=["CPUExecutionProvider"])
        float32 = classifier.session
        expected = np.concatenate([float32.run(["logits"], {"pixel_values": heldout_inputs[i:i + 16]})[0]
                                   for i in range(0, len(heldout_inputs), 16)])
        got = np.concatenate([int8.run(["logits"], {"pixel_values": heldout_inputs[i:i + 16]})[0]
                              for i in range(0, len(heldout_inputs), 16)])
        scores_expected = np.stack([np.asarray(classifier.scores(row)) for row in expected])
        scores_got = np.stack([np.asarray(classifier.scores(row)) for row in got])
        k = min(5, classifier.num_labels)
        top_expected = np.argsort(-scores_expected, axis=1, kind="stable")[:, :k]
        top_got = np.argsort(-scores_got, axis=1, kind="stable")[:, :k]
        score_difference = np.abs(scores_expected - scores_got)
        report = QuantizeReport(
            model=folder.name, quantization=settings, calibration_images=len(calibration),
            heldout_images=len(heldout), heldout_source=heldout_source,
            top1_agreement=float(np.mean(top_expected[:, 0] == top_got[:, 0])),
            top5_overlap=float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_expected, top_got)])),
            max_score_difference=float(score_difference.max()),
            mean_score_difference=float(score_difference.mean()),
            max_logit_difference=float(np.abs(expected - got).max()),
            float32_size_bytes=source.stat().st_size, int8_size_bytes=quantized.stat().st_size,
            seconds=round(time.monotonic() - started, 2))
        if len(heldout) < 50:
            report.notes.append(f"only {len(heldout)} held-out images: the agreement figure is coarse")
        if report.top1_agreement < min_agreement:
            report.notes.append(f"not written: top-1 agreement under the required {min_agreement:.1%}")
            _write_json(report_path, asdict(report))
            raise ValueError(f"static int8 agrees with float32 on top-1 for {report.top1_agreement:.1%} of "
                             f"{len(heldout)} held-out images, under the required {min_agreement:.1%}; the int8 "
                             f"model was not written (report: {report_path.name}). Calibrate on more images like "
                             "the ones the model will see")
        os.chmod(quantized, 0o644)
        os.replace(quantized, output)
    _write_json(report_path, asdict(report))
    return output, report


def _write_json(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)
