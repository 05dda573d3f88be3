"""ONNX export of a transformers image-classification folder, for the classifier's onnx backend.

The export is the project's own (no optimum): torch.onnx's TorchScript-based exporter
(``dynamo=False``, which needs no onnxscript), opset 17, one input ``pixel_values`` FP32
[batch, 3, height, width] and one output ``logits`` FP32 [batch, labels], batch dynamic. The
spatial size is fixed to what the model's image processor produces. Every export is checked:
ONNX Runtime must reproduce PyTorch's logits on seeded random inputs within ``tolerance``.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.runtime.errors import ConfigurationError

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


# -- CoreML and TFLite (the converters are optional installs) -------------------------------------

#: What to install for each optional format, beside torch 2.13.0 (the pin keeps pip from replacing it).
CONVERTER_INSTALLS = {
    "coreml": "pip install coremltools==9.0 'torch==2.13.0'  (about 30 MB; a [dev] dependency)",
    "tflite": "pip install litert-torch ai-edge-litert 'torch==2.13.0'  (about 800 MB: it brings jax)",
}
#: Default file names of the mobile exports inside the model folder.
MOBILE_FILES = {("coreml", False): "model.mlpackage", ("coreml", True): "model.int8.mlpackage",
                ("tflite", False): "model.tflite", ("tflite", True): "model.int8.tflite"}
#: Images the TFLite export is checked on (issue 18: top-5 equal to PyTorch's on 50 images).
CHECK_IMAGES = 50


@dataclass
class MobileExportResult:
    """Where a CoreML / TFLite export went and what its checks found (one line each, for people)."""

    path: Path
    format: str
    int8: bool
    checks: list[str]
    figures: dict


def _require(format: str, *modules: str) -> None:
    """ConfigurationError naming what to install when a converter module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigurationError(f"--format {format} needs the Python module(s) {', '.join(missing)}, not installed "
                                 f"here; install with: {CONVERTER_INSTALLS[format]}")


def _float_module(folder: Path, allow_pickle: bool) -> tuple[ClassifierModel, torch.nn.Module]:
    classifier = ClassifierModel(folder, backend="torch", device=torch.device("cpu"), dtype=torch.float32,
                                 allow_pickle=allow_pickle)
    if classifier.input_size is None:
        raise ValueError(f"{folder.name}: the image processor does not make one fixed input size; the export "
                         "needs one")
    return classifier, _Logits(classifier.model).eval()


def _check_inputs(classifier: ClassifierModel, count: int = CHECK_IMAGES) -> np.ndarray:
    """``count`` synthetic pictures through the model's own image processor: [count, 3, height, width]."""
    from services.tiny_models.mobilevit import synthetic_images

    from .images import decode_image

    images = [decode_image(data, field="check", max_pixels=1 << 30) for data in synthetic_images(count, seed=18, size=64)]
    return np.stack([classifier.preprocess(image).numpy() for image in images]).astype(np.float32)


def _atomic_path(output: Path) -> Path:
    """Where to write before the rename into place (same folder, same suffix: coremltools checks it)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return output.with_name(f".tmp-{output.name}")


def _replace(temporary: Path, output: Path) -> None:
    import shutil

    if output.is_dir():
        shutil.rmtree(output)
    os.replace(temporary, output)


def export_tflite(folder: str | os.PathLike, output: str | os.PathLike | None = None, *, int8: bool = False,
                  allow_pickle: bool = False, tolerance: float = DEFAULT_TOLERANCE) -> MobileExportResult:
    """Export ``folder``'s model to TFLite with litert-torch (batch 1, input ``pixel_values`` NCHW as the
    image processor makes it, output the logits) and check it through the LiteRT interpreter.

    float32: top-5 must equal PyTorch's on CHECK_IMAGES images and the scores differ by at most
    ``tolerance``. int8 (dynamic: int8 weights per channel, ai-edge-quantizer's dynamic_wi8_afp32):
    top-1 agreement with PyTorch float32 is reported and must reach 98 %.
    """
    _require("tflite", "litert_torch", "ai_edge_litert")
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    folder = Path(folder)
    output = Path(output) if output is not None else folder / MOBILE_FILES[("tflite", int8)]
    classifier, module = _float_module(folder, allow_pickle)
    height, width = classifier.input_size
    inputs = _check_inputs(classifier)
    temporary = _atomic_path(output)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = litert_torch.convert(module, (torch.from_numpy(inputs[:1]),))
            converted.export(str(temporary))
        if int8:
            from ai_edge_quantizer import quantizer, recipe

            quantized = quantizer.Quantizer(str(temporary), recipe.dynamic_wi8_afp32()).quantize()
            temporary.unlink()
            quantized.export_model(str(temporary))
        interpreter = Interpreter(model_path=str(temporary))
        interpreter.allocate_tensors()
        (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
        got = []
        for row in inputs:
            interpreter.set_tensor(source["index"], row[None])
            interpreter.invoke()
            got.append(interpreter.get_tensor(target["index"])[0].copy())
        with torch.inference_mode():
            expected = module(torch.from_numpy(inputs)).numpy()
        figures = _compare(classifier, expected, np.stack(got))
        checks = [f"TFLite ({'int8 weights' if int8 else 'float32'}) vs PyTorch on {len(inputs)} images through "
                  f"the LiteRT interpreter: top-5 equal on {figures['top5_equal']:.0%}, top-1 agreement "
                  f"{figures['top1_agreement']:.0%}, max score difference {figures['max_score_difference']:.2e}",
                  f"input {source['name']} {[int(v) for v in source['shape']]} float32 (the image processor's output, "
                  f"[1, 3, {height}, {width}]); output {target['name']} {[int(v) for v in target['shape']]} logits"]
        if int8:
            if figures["top1_agreement"] < 0.98:
                raise ValueError(f"the int8 TFLite model agrees with PyTorch on top-1 for "
                                 f"{figures['top1_agreement']:.0%} of {len(inputs)} images (under 98 %); not written")
        elif figures["top5_equal"] < 1 or figures["max_score_difference"] > tolerance:
            raise ValueError(f"the TFLite model differs from PyTorch (top-5 equal on {figures['top5_equal']:.0%} of "
                             f"{len(inputs)} images, max score difference {figures['max_score_difference']:.2e}, "
                             f"tolerance {tolerance:g}); not written")
        os.chmod(temporary, 0o644)
        _replace(temporary, output)
    finally:
        if temporary.exists():
            temporary.unlink()
    return MobileExportResult(path=output, format="tflite", int8=int8, checks=checks, figures=figures)


def _compare(classifier: ClassifierModel, expected: np.ndarray, got: np.ndarray) -> dict:
    scores_expected = np.stack([np.asarray(classifier.scores(row)) for row in expected])
    scores_got = np.stack([np.asarray(classifier.scores(row)) for row in got])
    k = min(5, classifier.num_labels)
    top_expected = np.argsort(-scores_expected, axis=1, kind="stable")[:, :k]
    top_got = np.argsort(-scores_got, axis=1, kind="stable")[:, :k]
    return {"images": len(expected), "top5_equal": float(np.mean(np.all(top_expected == top_got, axis=1))),
            "top1_agreement": float(np.mean(top_expected[:, 0] == top_got[:, 0])),
            "max_score_difference": float(np.abs(scores_expected - scores_got).max()),
            "max_logit_difference": float(np.abs(expected - got).max())}


class _Normalized(torch.nn.Module):
    """The classifier behind the processor's per-channel normalization (CoreML's ImageType has one scale)."""

    def __init__(self, module: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module((pixel_values - self.mean) / self.std)


def _coreml_preprocessing(processor) -> dict:
    """What the image processor does, as CoreML sees it: the app resizes and center-crops to the input
    size (Vision's centerCrop), the model scales the 0..255 pixels and takes them in this channel order."""
    flip = bool(getattr(processor, "do_flip_channel_order", False))
    normalize = bool(getattr(processor, "do_normalize", False))
    if flip and normalize:
        raise ValueError("the image processor both normalizes and flips channels; the CoreML export does not "
                         "express that order")
    return {"scale": float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0,
            "color_layout": "BGR" if flip else "RGB",
            "mean": [float(v) for v in processor.image_mean] if normalize else None,
            "std": [float(v) for v in processor.image_std] if normalize else None,
            "resize": dict(getattr(processor, "size", {}) or {}) if getattr(processor, "do_resize", False) else None,
            "center_crop": dict(getattr(processor, "crop_size", {}) or {})
            if getattr(processor, "do_center_crop", False) else None}


def export_coreml(folder: str | os.PathLike, output: str | os.PathLike | None = None, *, int8: bool = False,
                  allow_pickle: bool = False, tolerance: float = DEFAULT_TOLERANCE) -> MobileExportResult:
    """Export ``folder``'s model to a CoreML .mlpackage (ML program, iOS 15+) with coremltools: input
    ``image`` (an image of the processor's crop size, scaled and channel-ordered as the processor does),
    outputs ``classLabel`` and ``classLabel_probs`` (the class labels are embedded). int8: weights
    linearly quantized to int8 (coremltools.optimize). CoreML predicts on macOS only, so the check is
    the saved spec: input name, size and colour layout, the scaling ops, the outputs and the labels.
    """
    _require("coreml", "coremltools")
    import coremltools as ct

    folder = Path(folder)
    output = Path(output) if output is not None else folder / MOBILE_FILES[("coreml", int8)]
    classifier, module = _float_module(folder, allow_pickle)
    height, width = classifier.input_size
    preprocessing = _coreml_preprocessing(classifier.processor)
    if preprocessing["mean"] is not None:
        module = _Normalized(module, preprocessing["mean"], preprocessing["std"]).eval()
    example = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    temporary = _atomic_path(output)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,)).run_decompositions({})
            layout = ct.colorlayout.BGR if preprocessing["color_layout"] == "BGR" else ct.colorlayout.RGB
            model = ct.convert(program, inputs=[ct.ImageType(name="image", shape=(1, 3, height, width),
                                                             scale=preprocessing["scale"], bias=[0.0, 0.0, 0.0],
                                                             color_layout=layout)],
                               classifier_config=ct.ClassifierConfig(list(classifier.labels)),
                               convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15)
            if int8:
                from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OptimizationConfig,
                                                         linear_quantize_weights)

                model = linear_quantize_weights(model, OptimizationConfig(
                    global_config=OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")))
        model.short_description = f"{folder.name}: image classification ({len(classifier.labels)} labels)"
        model.user_defined_metadata["latentwire.preprocessing"] = json.dumps(preprocessing)
        model.user_defined_metadata["latentwire.weights"] = "int8" if int8 else "float32"
        model.save(str(temporary))
        checks, figures = check_coreml(temporary, classifier.labels, (height, width), preprocessing)
        _replace(temporary, output)
    finally:
        if temporary.exists():
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)
    return MobileExportResult(path=output, format="coreml", int8=int8, checks=checks, figures=figures)


def check_coreml(path: str | os.PathLike, labels: list[str], input_size: tuple[int, int],
                 preprocessing: dict) -> tuple[list[str], dict]:
    """Load a .mlpackage's spec and check it names what the classifier needs; ValueError when it does not."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    description = spec.description
    problems = []
    inputs = {i.name: i for i in description.input}
    image = inputs.get("image")
    if list(inputs) != ["image"] or image.type.WhichOneof("Type") != "imageType":
        problems.append(f"inputs are {list(inputs)}, not one image named 'image'")
    else:
        kind = image.type.imageType
        color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(kind.colorSpace)
        if (kind.height, kind.width) != tuple(input_size) or color != preprocessing["color_layout"]:
            problems.append(f"the input image is {kind.width}x{kind.height} {color}, the processor makes "
                            f"{input_size[1]}x{input_size[0]} {preprocessing['color_layout']}")
    outputs = [o.name for o in description.output]
    if outputs != ["classLabel", "classLabel_probs"] or description.predictedFeatureName != "classLabel" \
            or description.predictedProbabilitiesName != "classLabel_probs":
        problems.append(f"outputs are {outputs}, not classLabel and classLabel_probs")
    embedded, scales, constants = [], [], {}
    for block in spec.mlProgram.functions["main"].block_specializations.values():
        for op in block.operations:
            if op.type == "const" and "val" in op.attributes:
                constants[op.outputs[0].name] = list(op.attributes["val"].immediateValue.tensor.floats.values)
            if op.type == "classify":
                embedded = [v.immediateValue.tensor.strings.values[0]
                            for v in op.inputs["classes"].arguments[0].value.immediateValue.list.values]
            # The ImageType's scale: the first op on the image multiplies it by a constant.
            if op.type == "mul" and [a.name for a in op.inputs["x"].arguments] == ["image"]:
                for a in op.inputs["y"].arguments:
                    scales.extend(constants.get(a.name, []) or list(a.value.immediateValue.tensor.floats.values))
    if embedded != list(labels):
        problems.append(f"the embedded labels ({len(embedded)}) are not the model's {len(labels)} labels")
    if preprocessing["scale"] != 1.0 and not any(abs(s - preprocessing["scale"]) < 1e-7 for s in scales):
        problems.append(f"no scaling of the image by {preprocessing['scale']:g} was found")
    if problems:
        raise ValueError("the CoreML package does not match the model: " + "; ".join(problems))
    figures = {"input": "image", "outputs": outputs, "labels": len(embedded), "color_layout": preprocessing["color_layout"],
               "scale": preprocessing["scale"], "spec_version": spec.specificationVersion}
    checks = [f"CoreML spec: input image {input_size[1]}x{input_size[0]} {preprocessing['color_layout']} scaled by "
              f"{preprocessing['scale']:.6g}; outputs classLabel, classLabel_probs; {len(embedded)} labels embedded "
              f"(predictions need macOS; the spec was checked)"]
    return checks, figures


# -- exports stored in the registry ---------------------------------------------------------------

#: Each export a model folder may hold, by the backend / format name its registry tag uses.
EXPORT_FILES = {"onnx": ONNX_FILE, "onnx-int8": "model.int8.onnx", "onnx-int8-report": "model.int8.json",
                "tflite": "model.tflite", "tflite-int8": "model.int8.tflite",
                "coreml": "model.mlpackage", "coreml-int8": "model.int8.mlpackage"}


def export_tags(folder: str | os.PathLike) -> dict[str, str]:
    """Registry tags naming the exports ``folder`` holds: ``exports`` (comma-separated names, as EXPORT_FILES
    spells them) and ``export.NAME`` = the file's path in the version, per export."""
    folder = Path(folder)
    found = {name: file for name, file in EXPORT_FILES.items() if (folder / file).exists()}
    return {"exports": ",".join(found), **{f"export.{name}": file for name, file in found.items()}}


def store_exports(folder: str | os.PathLike, *, name: str | None = None, registry: str | None = None,
                  aliases: list[str] | tuple[str, ...] = (), formats: list[str] | tuple[str, ...] = ()):
    """Store ``folder`` (the model with its exports beside it) as a new version of registry model ``name``
    (default: the folder's name), tagged with what each export is (export_tags) plus ``exported`` = the
    formats this run wrote. Returns the registry's ModelVersion."""
    from latentwire.client.registry import RegistryClient

    folder = Path(folder)
    tags = export_tags(folder)
    if not tags["exports"]:
        raise ValueError(f"{folder} holds no exports ({', '.join(sorted(set(EXPORT_FILES.values())))}) to store")
    tags["exported"] = ",".join(formats)
    with RegistryClient(registry) as client:
        return client.import_folder(folder, name, aliases=list(aliases), tags=tags, new_version=True,
                                    description=f"{folder.name} with its exports ({tags['exports']})").model_version
