"""Classifier service configuration: the common flags plus backends, the dynamic batcher and input limits."""
from __future__ import annotations

import argparse

from services.runtime.config import ModelSpec, add_flag, common_parser
from services.runtime import limits
from services.runtime.errors import ConfigurationError, quote

#: Default port of the classifier service.
DEFAULT_PORT = 50056

#: Backends a model can run on (--backend, --model-backend).
BACKENDS = ("torch", "int8", "onnx", "onnx-int8", "tflite")


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.classifier`."""
    parser = common_parser("latentwire classifier service (image classification; also speaks the Open Inference "
                           "Protocol)", DEFAULT_PORT)
    add_flag(parser, "--backend", default="torch", choices=BACKENDS,
             help="backend of models without a --model-backend entry: torch (PyTorch in --dtype), int8 (PyTorch "
                  "with dynamic int8 quantization of the Linear layers, CPU only), onnx (ONNX Runtime on the "
                  "folder's model.onnx, made by `latentwire classify export`), onnx-int8 (ONNX Runtime on the "
                  "folder's static int8 model.int8.onnx, convolutions included, made by `latentwire classify export "
                  "--int8 --calibration-data DIR`), or tflite (the LiteRT interpreter, package ai-edge-litert, on the "
                  "folder's float32 model.tflite, made by `latentwire classify export --format tflite`; CPU only)")
    add_flag(parser, "--model-backend", action="append", default=[],
             help="backend of one model, as NAME=BACKEND (NAME as in --model, or a registry model's name); "
                  "repeatable. The same folder may be served under two names with different backends")
    add_flag(parser, "--max-batch-size", default=4, type=int,
             help="most images in one model execution (the dynamic batcher's batch size bound)")
    add_flag(parser, "--max-queue-delay-ms", default=2.0, type=float,
             help="longest time the oldest queued image waits for more images to batch with, in milliseconds "
                  "(Triton's max_queue_delay_microseconds); images that queue while a batch runs are merged anyway")
    add_flag(parser, "--no-dynamic-batching", action="store_true", default=False,
             help="run each call's images as their own model executions, never merged with other calls' images")
    add_flag(parser, "--model-instances", default=1, type=int,
             help="model executions of one model that may run at once (Triton's instance count)")
    add_flag(parser, "--intra-op-threads", default=0, type=int,
             help="threads one model execution may use (torch.set_num_threads, ONNX Runtime's intra_op_num_threads); "
                  "0 keeps the libraries' defaults (one per core)")
    add_flag(parser, "--max-queued-images", default=1024, type=int,
             help="images waiting for the model, per model; a call that would exceed it gets RESOURCE_EXHAUSTED")
    add_flag(parser, "--max-images", default=256, type=int, help="most images in one Classify or ModelInfer request")
    add_flag(parser, "--max-stream-images", default=4096, type=int,
             help="most images in one StreamClassify request (its results stream back; the request itself is still "
                  "bound by --max-message-bytes)")
    add_flag(parser, "--max-image-pixels", default=limits.MAX_INPUT_PIXELS, type=int,
             help="most pixels (width x height) of one input image, checked before decoding")
    return parser


def parse_model_backends(values: list[str], specs: list[ModelSpec], *, registry: str | None) -> dict[str, str]:
    """Parse --model-backend NAME=BACKEND values into {name: backend}; refuses bad ones at start."""
    backends: dict[str, str] = {}
    local = {s.name for s in specs if s.path is not None}
    for value in values or []:
        name, sep, backend = value.partition("=")
        if not sep or not name or backend not in BACKENDS:
            raise ConfigurationError(f"--model-backend {quote(value)}: use NAME=BACKEND with BACKEND one of "
                                     f"{', '.join(BACKENDS)}")
        if registry is None and name not in local:
            raise ConfigurationError(f"--model-backend {quote(value)}: no --model is named {quote(name)}; known: "
                                     f"{', '.join(sorted(local))}")
        backends[name] = backend
    return backends


def check_limits(extra: argparse.Namespace) -> None:
    """Refuse limits that cannot work."""
    for flag, value in (("--max-batch-size", extra.max_batch_size), ("--model-instances", extra.model_instances),
                        ("--max-queued-images", extra.max_queued_images), ("--max-images", extra.max_images),
                        ("--max-stream-images", extra.max_stream_images),
                        ("--max-image-pixels", extra.max_image_pixels)):
        if value < 1:
            raise ConfigurationError(f"{flag} must be at least 1 (got {value})")
    if extra.intra_op_threads < 0:
        raise ConfigurationError(f"--intra-op-threads must be >= 0 (got {extra.intra_op_threads})")
    if extra.max_queue_delay_ms < 0:
        raise ConfigurationError(f"--max-queue-delay-ms must be >= 0 (got {extra.max_queue_delay_ms})")
