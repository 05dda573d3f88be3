"""Image classification with a transformers model, as the image-classification pipeline does it.

Preprocessing is the model's own image processor loaded from its folder (AutoImageProcessor:
for MobileViT resize, center crop, rescale and RGB->BGR channel flip); scores are the pipeline's
(softmax for single-label models, sigmoid for multi-label ones). Four backends run the forward
pass: PyTorch in the service's dtype, PyTorch with dynamic int8 quantization, ONNX Runtime on
the folder's model.onnx (written by export.py), ONNX Runtime on its static int8 model.int8.onnx
(written by quantize.py), and the LiteRT (TFLite) interpreter on its model.tflite (written by
export.export_tflite; the interpreter is the ai-edge-litert package, without TensorFlow).
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.runtime.errors import ConfigurationError, InvalidArgument, ModelFolderError
from services.runtime.models import PICKLE_SUFFIXES

log = logging.getLogger(__name__)

#: File name of the ONNX export inside a model folder (top level, so registry fetches carry it).
ONNX_FILE = "model.onnx"
#: File name of the static int8 ONNX model (quantize.py) and of its accuracy report, beside model.onnx.
ONNX_INT8_FILE = "model.int8.onnx"
ONNX_INT8_REPORT_FILE = "model.int8.json"
#: The ONNX file each ONNX Runtime backend runs.
ONNX_FILES = {"onnx": ONNX_FILE, "onnx-int8": ONNX_INT8_FILE}
#: File name of the TFLite export (float32, batch 1) the tflite backend runs, beside model.onnx.
TFLITE_FILE = "model.tflite"
#: What to install for the tflite backend (the LiteRT interpreter alone, about 60 MB; no TensorFlow, no converter).
TFLITE_RUNTIME_INSTALL = "pip install ai-edge-litert==2.3.0"
#: Top-k when a request sends 0 (the pipeline's default), capped at the number of labels.
DEFAULT_TOP_K = 5


def check_classifier_folder(folder: Path, backend: str, allow_pickle: bool) -> dict:
    """Check a transformers image-classification folder before loading; returns config.json's content.

    Raises ModelFolderError saying what to fix: at start the service refuses to start with it, when a
    request loads the model (from the registry) the call gets FAILED_PRECONDITION.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(folder, "config.json is missing (it is not a transformers model folder)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise ModelFolderError(folder, "config.json is not readable JSON") from None
    if not isinstance(config, dict):
        raise ModelFolderError(folder, "config.json does not hold a JSON object")
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForImageClassification") for a in architectures):
        raise ModelFolderError(folder, f"it holds a {', '.join(map(str, architectures)) or 'model without architectures'}; "
                                       "the classifier serves *ForImageClassification models")
    if not (folder / "preprocessor_config.json").is_file():
        raise ModelFolderError(folder, "preprocessor_config.json is missing (the image processor's settings)")
    if backend in ONNX_FILES:
        if not (folder / ONNX_FILES[backend]).is_file():
            how = ("`latentwire classify export FOLDER`" if backend == "onnx" else
                   "`latentwire classify export FOLDER --int8 --calibration-data IMAGES`")
            raise ModelFolderError(folder, f"the {backend} backend needs {ONNX_FILES[backend]}; make it with {how}")
        return config
    if backend == "tflite":
        if not (folder / TFLITE_FILE).is_file():
            raise ModelFolderError(folder, f"the tflite backend needs {TFLITE_FILE}; make it with `latentwire classify "
                                           "export FOLDER --format tflite` (the converter is litert-torch)")
        return config
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors and pickles and not allow_pickle:
        raise ModelFolderError(folder, f"it holds only pickle-based weights ({', '.join(pickles)}); convert them to "
                                       "safetensors or start with --allow-pickle if you trust the files")
    if not has_safetensors and not pickles:
        raise ModelFolderError(folder, "it holds no weights (*.safetensors)")
    return config


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with dynamic int8 quantization of its Linear layers, except the classification head.

    Weights are quantized per output channel once; activations per tensor at run time
    (torch.ao.quantization.quantize_dynamic). Convolutions have no dynamic int8 kernel and stay
    float32. The head stays float32 because its input is one pooled feature vector per image
    whose per-tensor quantization dominated the top-1 disagreement (on the tiny test model 94%
    top-1 agreement with the head quantized, 99.8% without).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    backbone = getattr(model, "base_model_prefix", "") + "."
    # The head: the Linear layers outside the backbone (MobileViT's `classifier`).
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(backbone)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (torchao replaces it)
        return quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


def _score_function(config):
    """The pipeline's choice of score function for a model config (ImageClassificationPipeline.postprocess)."""
    from transformers.pipelines.image_classification import sigmoid, softmax

    if config.problem_type == "regression":
        return lambda x: x
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return sigmoid
    if config.problem_type == "single_label_classification" or config.num_labels > 1:
        return softmax
    return lambda x: x


class ClassifierModel:
    """One image-classification model folder, on one backend, device and dtype."""

    def __init__(self, folder: Path, *, backend: str, device: torch.device, dtype: torch.dtype, allow_pickle: bool,
                 threads: int = 0):
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        check_classifier_folder(folder, backend, allow_pickle)
        self.folder = folder
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(folder)
        # The PIL processor, chosen explicitly: it is what the pipeline's default falls back to without
        # torchvision, and naming it keeps transformers from warning about the choice on every load.
        self.processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        self.labels = [str(self.config.id2label.get(i, f"LABEL_{i}")) for i in range(self.config.num_labels)]
        self.scores = _score_function(self.config)
        self.input_size = self._input_size()
        self.model: torch.nn.Module | None = None
        self.session = None
        self.tflite: TFLiteRunner | None = None
        if backend in ONNX_FILES:
            self.session = self._onnx_session(folder / ONNX_FILES[backend], threads)
        elif backend == "tflite":
            if device.type != "cpu":
                raise ConfigurationError("the tflite backend runs on --device cpu only (the LiteRT interpreter's "
                                         "CPU kernels)")
            self.tflite = TFLiteRunner(folder / TFLITE_FILE, threads)
            shapes = list(self.tflite.input_shape), list(self.tflite.output_shape)
            if (self.input_size and shapes[0][1:] != [3, *self.input_size]) or shapes[1][1:] != [self.num_labels]:
                raise ModelFolderError(folder, f"{TFLITE_FILE} maps {shapes[0]} to {shapes[1]}, but the image processor "
                                               f"makes [3, {', '.join(map(str, self.input_size or ('H', 'W')))}] and "
                                               f"the model has {self.num_labels} labels; export it again from this "
                                               "folder (`latentwire classify export FOLDER --format tflite`)")
        else:
            if backend == "int8" and (device.type != "cpu" or dtype != torch.float32):
                raise ConfigurationError("the int8 backend runs on --device cpu with --dtype float32 only "
                                         "(dynamic quantization has CPU kernels only)")
            model = AutoModelForImageClassification.from_pretrained(
                folder, dtype=dtype, use_safetensors=None if allow_pickle else True)
            model = model.to(device).eval()
            self.model = quantize_int8(model) if backend == "int8" else model

    def _input_size(self) -> tuple[int, int] | None:
        """(height, width) in pixels of the model input the processor makes; None when it varies by image."""
        processor = self.processor
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop:
            return int(crop["height"]), int(crop["width"])
        size = getattr(processor, "size", None) or {}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        return None

    def _onnx_session(self, path: Path, threads: int):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigurationError("--device cuda with the onnx backend needs onnxruntime-gpu "
                                         "(CUDAExecutionProvider is not available)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def check_top_k(self, top_k: int) -> int:
        """The request's top_k made concrete: 0 -> min(5, labels); 1..labels as is; anything else refused."""
        if top_k == 0:
            return min(DEFAULT_TOP_K, self.num_labels)
        if not 1 <= top_k <= self.num_labels:
            raise InvalidArgument(f"top_k is {top_k}; this model has {self.num_labels} labels, so use 1 to "
                                  f"{self.num_labels} (or 0 for the default)", reason="TOP_K_OUT_OF_RANGE",
                                  metadata={"top_k": str(top_k), "num_labels": str(self.num_labels)})
        return top_k

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> the model input for it, float32 [3, height, width] (the pipeline's preprocess)."""
        # numpy out, then a zero-copy view: a torch copy here (return_tensors="pt") would start an OpenMP
        # thread team on every preprocessing thread, and those teams spin against the model's own.
        return torch.from_numpy(self.processor(images=image, return_tensors="np")["pixel_values"][0])

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model inputs [batch, 3, height, width] -> float32 logits [batch, labels] on the CPU."""
        if self.session is not None:
            array = np.ascontiguousarray(pixel_values.numpy(), dtype=np.float32)
            return torch.from_numpy(self.session.run(["logits"], {"pixel_values": array})[0])
        if self.tflite is not None:
            return torch.from_numpy(self.tflite.run(np.ascontiguousarray(pixel_values.numpy(), dtype=np.float32)))
        logits = self.model(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype)).logits
        return logits.to(device="cpu", dtype=torch.float32)

    def top_k(self, logits: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        """One image's logits -> its k best (class index, label, score), best first, as the pipeline ranks them."""
        scores = np.asarray(self.scores(logits))
        # Stable descending order, as the pipeline's list.sort(reverse=True): ties keep label order.
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), self.labels[i], float(scores[i])) for i in order]


class TFLiteRunner:
    """A model.tflite on the LiteRT interpreter (ai_edge_litert.interpreter), one interpreter per thread.

    An interpreter is not safe to share between threads, and the batcher runs one thread per model
    instance (--model-instances), so each thread builds its own on first use (the file is read
    once). The export has batch 1 (litert-torch traces one example), so a batch runs image by image
    through it; the rows are the model's logits, float32 [batch, labels].
    """

    def __init__(self, path: Path, threads: int):
        import importlib.util
        import threading

        if importlib.util.find_spec("ai_edge_litert") is None:
            raise ConfigurationError(f"the tflite backend needs the LiteRT interpreter (ai_edge_litert), not installed "
                                     f"here; install it with: {TFLITE_RUNTIME_INSTALL}")
        self.path = path
        self.threads = threads
        self.content = path.read_bytes()
        self._local = threading.local()
        interpreter, source, target = self._interpreter()  # a broken file fails at load, not on the first request
        self.input_shape = tuple(int(v) for v in source["shape"])
        self.output_shape = tuple(int(v) for v in target["shape"])
        if len(self.input_shape) != 4 or source["dtype"] != np.float32:
            raise ModelFolderError(path.parent, f"{path.name} takes {source['dtype'].__name__} "
                                                f"{list(self.input_shape)}, not float32 [batch, 3, height, width]; "
                                                "export it again with `latentwire classify export FOLDER --format tflite`")

    def _interpreter(self):
        cached = getattr(self._local, "interpreter", None)
        if cached is None:
            from ai_edge_litert.interpreter import Interpreter

            try:
                interpreter = Interpreter(model_content=self.content, num_threads=self.threads or None)
                interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as error:
                raise ModelFolderError(self.path.parent, f"{self.path.name} is not a TFLite model the LiteRT "
                                                         f"interpreter loads ({error})") from None
            inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
            if len(inputs) != 1 or len(outputs) != 1:
                raise ModelFolderError(self.path.parent, f"{self.path.name} has {len(inputs)} inputs and "
                                                         f"{len(outputs)} outputs; the tflite backend runs models with "
                                                         "one input (pixel values) and one output (logits)")
            (source,), (target,) = inputs, outputs
            cached = self._local.interpreter = (interpreter, source, target)
        return cached

    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [batch, 3, height, width] -> float32 logits [batch, labels]."""
        interpreter, source, target = self._interpreter()
        rows = []
        for row in pixel_values:
            interpreter.set_tensor(source["index"], row[None])
            interpreter.invoke()
            rows.append(interpreter.get_tensor(target["index"])[0].copy())
        return np.stack(rows).astype(np.float32, copy=False)
