"""The classifier service on a tiny random-weight MobileViT, against transformers' own pipeline.

One classifier process serves the same folder three ways: "tiny" (PyTorch float32), "tiny-int8"
(dynamic int8) and "tiny-onnx" (ONNX Runtime on the export made by `latentwire classify export`).
The reference is transformers' pipeline("image-classification") in this process, on the same
folder and the same encoded images. The same process also serves the shipped trained shape classifier
(services/default_models/shapes-classifier) on PyTorch and on the tflite backend (its model.tflite).
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from latentwire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from latentwire.client.classifier import ClassifierClient, image_input, logits_of
from latentwire.common.v1 import model_pb2, tensor_pb2
from services.default_models import classifier_path
from services.suite.launcher import start_service, wait_serving
from services.tiny_models.mobilevit import synthetic_images

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def conformance_images() -> list[bytes]:
    """Encoded images covering what the decoder has to get right, each as the pipeline would load it."""
    images = synthetic_images(12, seed=3)
    pictures = [Image.open(io.BytesIO(b)) for b in synthetic_images(6, seed=4, size=64)]
    images += [_encode(p, "JPEG", quality=90) for p in pictures[:2]]
    images += [_encode(p, "WEBP", quality=90) for p in pictures[2:4]]
    images.append(_encode(pictures[4].resize((80, 44)), "PNG"))  # not square: resize + center crop
    images.append(_encode(pictures[4].convert("L"), "PNG"))  # grayscale -> RGB
    rgba = pictures[5].convert("RGBA")
    rgba.putalpha(128)
    images.append(_encode(rgba, "PNG"))  # alpha dropped, as PIL's convert("RGB") does
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display; load_image applies it
    images.append(_encode(pictures[5].resize((64, 40)), "JPEG", exif=exif.tobytes()))
    return images


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


@pytest.fixture(scope="module")
def classifier(tiny_classifier, tmp_path_factory):
    """The classifier service on the tiny model with all three backends, in its own process; also the shipped
    trained shape classifier on torch ("shapes") and on the LiteRT interpreter ("shapes-tflite", its model.tflite)."""
    folder = str(tiny_classifier)
    shapes = str(classifier_path())
    log_dir = tmp_path_factory.mktemp("classifier-logs")
    service = start_service("classifier", "services.classifier", [
        "--port", "0", "--model", f"tiny={folder}", "--model", f"tiny-int8={folder}", "--model", f"tiny-onnx={folder}",
        "--model-backend", "tiny-int8=int8", "--model-backend", "tiny-onnx=onnx",
        "--model", f"shapes={shapes}", "--model", f"shapes-tflite={shapes}", "--model-backend", "shapes-tflite=tflite",
        "--max-batch-size", "8", "--max-queue-delay-ms", "20", "--max-images", "64", "--max-stream-images", "600",
        "--max-image-pixels",
        str(4096 * 4096)], log_dir=log_dir)
    try:
        wait_serving(service.address, 300, "classifier", service.process)
        yield service
    finally:
        service.process.terminate()
        code = service.process.wait(30)
    assert code == 0, f"the classifier exited with {code}; log in {log_dir}"


@pytest.fixture(scope="module")
def client(classifier):
    with ClassifierClient(classifier.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def pipe(tiny_classifier):
    import transformers

    return transformers.pipeline("image-classification", model=str(tiny_classifier), device="cpu")


def reference_logits(pipe, images: list[bytes], batch_size: int = 1) -> np.ndarray:
    """Logits [images, labels] from the pipeline (function_to_apply="none" returns them as scores)."""
    labels = [pipe.model.config.id2label[i] for i in range(pipe.model.config.num_labels)]
    outputs = pipe([Image.open(io.BytesIO(data)) for data in images], function_to_apply="none", top_k=len(labels),
                   batch_size=batch_size)
    return np.asarray([[{d["label"]: d["score"] for d in output}[label] for label in labels] for output in outputs],
                      dtype=np.float32)


def test_float32_logits_and_scores_equal_the_pipeline(client, pipe):
    images = conformance_images()
    # One call: the batcher runs its images in request order, 8 per execution (--max-batch-size), the
    # same batches as pipeline(..., batch_size=8). Batch size changes float32 results a little
    # (oneDNN picks convolution kernels by batch size); the pipeline itself differs between
    # batch_size 1 and 8 by about 1.3e-5 on this model, so batches are compared with batches.
    response = client.classify(images, model="tiny", top_k=3, include_logits=True)
    assert response.model == "tiny" and not any(r.HasField("error") for r in response.results)
    got = np.stack([logits_of(r) for r in response.results])
    expected = reference_logits(pipe, images, batch_size=8)
    assert float(np.abs(got - expected).max()) <= 1e-5
    assert float(expected.std()) > 0.3  # the logits are spread out: a mismatch would show
    for data, result in zip(images, response.results):
        reference = pipe(Image.open(io.BytesIO(data)), top_k=3)  # the pipeline's softmax scores
        assert [c.label for c in result.classes] == [d["label"] for d in reference]
        assert np.allclose([c.score for c in result.classes], [d["score"] for d in reference], atol=1e-5, rtol=0)
    # One image per call, one call at a time: batches of one, as pipeline(image).
    singles = images[-6:]
    got = np.stack([logits_of(client.classify([data], model="tiny", include_logits=True).results[0])
                    for data in singles])
    assert float(np.abs(got - reference_logits(pipe, singles)).max()) <= 1e-5
    # The EXIF orientation was applied: the unrotated image gives other logits.
    unrotated = Image.open(io.BytesIO(images[-1]))
    plain = client.classify([_encode(unrotated, "JPEG", quality=95)], model="tiny", include_logits=True).results[0]
    assert float(np.abs(logits_of(plain) - got[-1]).max()) > 1e-3


def test_onnx_logits_within_1e4_of_the_pipeline(client, pipe):
    images = conformance_images()
    response = client.classify(images, model="tiny-onnx", include_logits=True)
    got = np.stack([logits_of(r) for r in response.results])
    assert float(np.abs(got - reference_logits(pipe, images)).max()) <= 1e-4


def test_tflite_top5_and_scores_equal_torch_on_50_held_out_images(client):
    """The tflite backend (the LiteRT interpreter on the shipped model.tflite, converted by litert-torch) against
    PyTorch float32 on the same folder, both through the service: 50 held-out images of the training data set."""
    from services.training.dataset import draw_batch

    pixels, _ = draw_batch([0, 7919], 50, held_out=True)  # the classifier's held-out draw (services/training)
    images = [_encode(Image.fromarray(p), "PNG") for p in pixels]
    torch_results = client.classify(images, model="shapes", top_k=5, include_logits=True).results
    tflite = client.classify(images, model="shapes-tflite", top_k=5, include_logits=True)
    assert tflite.model == "shapes-tflite"
    for ours, reference in zip(tflite.results, torch_results):
        assert [c.label for c in ours.classes] == [c.label for c in reference.classes]
        assert np.abs(np.array([c.score for c in ours.classes]) - [c.score for c in reference.classes]).max() <= 1e-4
    got = np.stack([logits_of(r) for r in tflite.results])
    expected = np.stack([logits_of(r) for r in torch_results])
    assert not np.array_equal(got, expected)  # another runtime: not bit-identical, only close
    assert float(np.abs(got - expected).max()) <= 1e-3
    assert len({r.classes[0].label for r in torch_results}) >= 4  # the draw covers most of the six shapes


def test_tflite_backend_refuses_a_missing_broken_or_mismatched_model_tflite(tiny_classifier, tmp_path):
    from services.classifier.model import ClassifierModel
    from services.runtime.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match=r"the tflite backend needs model.tflite; make it with `latentwire "
                                               r"classify export FOLDER --format tflite`"):
        ClassifierModel(tiny_classifier, backend="tflite", device=torch.device("cpu"), dtype=torch.float32,
                        allow_pickle=False)
    folder = tmp_path / "broken"
    shutil.copytree(tiny_classifier, folder)
    (folder / "model.tflite").write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(ModelFolderError, match="model.tflite is not a TFLite model the LiteRT interpreter loads"):
        ClassifierModel(folder, backend="tflite", device=torch.device("cpu"), dtype=torch.float32, allow_pickle=False)
    (folder / "model.tflite").write_bytes((classifier_path() / "model.tflite").read_bytes())
    with pytest.raises(ModelFolderError, match=r"model.tflite maps \[1, 3, 32, 32\] to \[1, 6\], but the image processor "
                                               r"makes \[3, 32, 32\] and the model has 10 labels; export it again"):
        ClassifierModel(folder, backend="tflite", device=torch.device("cpu"), dtype=torch.float32, allow_pickle=False)


def test_int8_agrees_with_float32_on_top1_for_500_images(client):
    images = synthetic_images(500, seed=11)
    top1 = {}
    for model in ("tiny", "tiny-int8"):
        results = sorted((r.result for r in client.stream_classify(images, model=model, top_k=1, include_logits=True)),
                         key=lambda r: r.index)
        assert [r.index for r in results] == list(range(500))
        top1[model] = np.array([r.classes[0].class_index for r in results])
        top1[model + "-logits"] = np.stack([logits_of(r) for r in results])
    agreement = float((top1["tiny"] == top1["tiny-int8"]).mean())
    assert agreement >= 0.99, agreement
    # int8 really is another computation, and the predictions are spread over the labels.
    assert float(np.abs(top1["tiny-logits"] - top1["tiny-int8-logits"]).max()) > 1e-3
    assert len(set(top1["tiny"].tolist())) >= 5


def test_pixels_and_pixel_values_give_the_same_logits(client, pipe):
    data = synthetic_images(1, seed=21, size=56)[0]
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    pixel_values = pipe.image_processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
    response = client.classify([data, pixels, pixel_values.astype(np.float32)], model="tiny", include_logits=True)
    rows = [logits_of(r) for r in response.results]
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(rows[0], rows[2])


def _huge_png() -> bytes:
    return _encode(Image.new("1", (4097, 4096)), "PNG")  # 1-bit: a few KB, but 16.8 million pixels


BAD_IMAGES = [
    ("undecodable", classifier_pb2.ImageInput(encoded_image=b"definitely not an image"), "UNDECODABLE_IMAGE"),
    ("empty-bytes", classifier_pb2.ImageInput(encoded_image=b""), "IMAGE_EMPTY"),
    ("truncated-png", classifier_pb2.ImageInput(encoded_image=synthetic_images(1, seed=5)[0][:200]), "UNDECODABLE_IMAGE"),
    ("gif", classifier_pb2.ImageInput(encoded_image=_encode(Image.new("RGB", (8, 8)), "GIF")), "UNDECODABLE_IMAGE"),
    ("huge", classifier_pb2.ImageInput(encoded_image=_huge_png()), "IMAGE_TOO_LARGE"),
    ("zero-size-pixels", image_input(np.zeros((0, 7, 3), np.uint8)), "IMAGE_EMPTY"),
    ("float-pixels", classifier_pb2.ImageInput(pixels=tensor_pb2.Tensor(
        dtype=tensor_pb2.DataType.DATA_TYPE_FLOAT32, shape=[4, 4, 3], raw_contents=bytes(4 * 48))), "INVALID_TENSOR"),
    ("four-channel-pixels", image_input(np.zeros((8, 8, 4), np.uint8)), "INVALID_TENSOR"),
    ("short-raw-contents", classifier_pb2.ImageInput(pixels=tensor_pb2.Tensor(
        dtype=tensor_pb2.DataType.DATA_TYPE_UINT8, shape=[8, 8, 3], raw_contents=bytes(100))), "INVALID_TENSOR"),
    ("pixel-values-wrong-size", image_input(np.zeros((3, 16, 16), np.float32)), "INVALID_TENSOR"),
    ("pixel-values-nan", image_input(np.full((3, 32, 32), np.nan, np.float32)), "INVALID_TENSOR"),
    ("unset", classifier_pb2.ImageInput(), "IMAGE_MISSING"),
]


def test_bad_images_get_their_own_errors_and_do_not_sink_the_others(classifier, client):
    good = synthetic_images(2, seed=6)
    alone = client.classify(good, model="tiny", include_logits=True)
    request = classifier_pb2.ClassifyRequest(model=model_pb2.ModelReference(name="tiny"), include_logits=True, images=[
        classifier_pb2.ImageInput(encoded_image=good[0]), *[b[1] for b in BAD_IMAGES],
        classifier_pb2.ImageInput(encoded_image=good[1])])
    with grpc.insecure_channel(classifier.address) as channel:
        response = classifier_pb2_grpc.ClassifierServiceStub(channel).Classify(request, timeout=60)
    results = response.results
    assert [r.index for r in results] == list(range(len(BAD_IMAGES) + 2))
    for result, (case, _, reason) in zip(results[1:-1], BAD_IMAGES):
        assert result.HasField("error") and not result.classes, case
        assert (result.error.code, result.error.reason) == (INVALID, reason), (case, result.error)
        assert f"images[{result.index}]" in result.error.message, (case, result.error.message)
    for result, expected in zip((results[0], results[-1]), alone.results):
        assert not result.HasField("error")
        assert np.array_equal(logits_of(result), logits_of(expected))
    # The streaming form reports the same per-image errors.
    streamed = {r.result.index: r.result for r in client.stream_classify(
        [good[0], b"garbage", good[1]], model="tiny")}
    assert streamed[1].error.reason == "UNDECODABLE_IMAGE" and streamed[0].classes and streamed[2].classes


@pytest.mark.parametrize("case,request_fields,code,reason", [
    ("top-k-negative", dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "TOP_K_OUT_OF_RANGE"),
    ("top-k-over-labels", dict(top_k=11), grpc.StatusCode.INVALID_ARGUMENT, "TOP_K_OUT_OF_RANGE"),
    ("unknown-model", dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    ("no-images", dict(images=[]), grpc.StatusCode.INVALID_ARGUMENT, "NO_IMAGES"),
    ("too-many-images", dict(images=[b"x"] * 601), grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_IMAGES"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_request_level_errors(classifier, case, request_fields, code, reason):
    fields = {"images": synthetic_images(1, seed=8), **request_fields}
    request = ClassifierClient.build_request(fields.pop("images"), **fields)
    with grpc.insecure_channel(classifier.address) as channel:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
        for call, message in ((stub.Classify, request),
                              (stub.StreamClassify, classifier_pb2.StreamClassifyRequest(
                                  model=request.model, images=request.images, top_k=request.top_k))):
            with pytest.raises(grpc.RpcError) as raised:
                response = call(message, timeout=30)
                if not hasattr(response, "ListFields"):
                    list(response)
            assert raised.value.code() == code, raised.value.details()
            info = error_info(raised.value)
            assert info is not None and info.reason == reason and info.domain == "latentwire.dev"


def test_top_k_default_and_bounds(client):
    image = synthetic_images(1, seed=9)
    assert len(client.classify(image, model="tiny").results[0].classes) == 5
    everything = client.classify(image, model="tiny", top_k=10).results[0].classes
    assert len(everything) == 10 and abs(sum(c.score for c in everything) - 1) < 1e-5
    scores = [c.score for c in everything]
    assert scores == sorted(scores, reverse=True)


def _stats(client, model: str):
    (stats,) = client.statistics(model).models
    return stats


def test_dynamic_batching_merges_concurrent_calls(client):
    before = _stats(client, "tiny")
    images = synthetic_images(24, seed=12)
    barrier = threading.Barrier(24)

    def call(data: bytes):
        barrier.wait()
        return client.classify([data], model="tiny", include_logits=True).results[0]

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, images))
    after = _stats(client, "tiny")
    executions = after.execution_count - before.execution_count
    histogram = {b.batch_size: b.execution_count for b in after.batch_sizes}
    for b in before.batch_sizes:
        histogram[b.batch_size] -= b.execution_count
    assert after.image_count - before.image_count == 24
    assert sum(size * count for size, count in histogram.items()) == 24
    assert executions < 24 and max(s for s, c in histogram.items() if c) > 1, histogram  # calls were merged
    assert max(histogram) <= 8  # --max-batch-size
    # Merging changes an image's logits only by float32 summation order (kernels differ by batch size).
    alone = client.classify(images, model="tiny", include_logits=True).results
    assert max(float(np.abs(logits_of(a) - logits_of(b)).max()) for a, b in zip(results, alone)) <= 1e-4
    assert after.dynamic_batching and after.max_batch_size == 8 and after.max_queue_delay_seconds == pytest.approx(0.02)
    assert after.backend == classifier_pb2.BACKEND_TORCH


def test_stream_classify_yields_every_image_once(client):
    images = synthetic_images(40, seed=13)
    whole = client.classify(images, model="tiny-onnx", top_k=2).results
    streamed = sorted((r.result for r in client.stream_classify(images, model="tiny-onnx", top_k=2)),
                      key=lambda r: r.index)
    assert [r.index for r in streamed] == list(range(40))
    assert [[c.class_index for c in r.classes] for r in streamed] == [[c.class_index for c in r.classes] for r in whole]


def test_export_cli_writes_a_checked_onnx_file(tiny_classifier, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_classifier, folder)
    (folder / "model.onnx").unlink()
    completed = subprocess.run([sys.executable, "-m", "latentwire.cli.main", "classify", "export", str(folder)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"wrote {folder / 'model.onnx'}"
    assert "max abs logit difference" in completed.stderr
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32] and session.get_outputs()[0].name == "logits"


def test_create_tiny_classifier_cli_is_deterministic_and_not_degenerate(tmp_path):
    from services.tiny_models import create_tiny_classifier

    completed = subprocess.run([sys.executable, "-m", "latentwire.cli.main", "models", "create-tiny-classifier",
                                str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    create_tiny_classifier(tmp_path / "b")
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    import transformers

    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        logits = model(pixel_values=torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))).logits
    assert float(logits.std()) > 0.5 and len(set(logits.argmax(-1).tolist())) > 2
    assert json.loads((tmp_path / "a" / "config.json").read_text())["id2label"]["3"] == "cat"


# -- the Open Inference Protocol, through tritonclient[grpc] from PyPI, unmodified ------------------
# (This process never imports latentwire.inference: tritonclient registers the same `inference`
# message names in protobuf's default pool, and both in one process would collide.)


def test_tritonclient_health_and_metadata(classifier):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=classifier.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny-onnx", "1")
    assert not client.is_model_ready("no-such-model")
    assert "classification" in client.get_server_metadata().extensions
    metadata = client.get_model_metadata("tiny-onnx")
    assert metadata.platform == "onnxruntime_onnx" and list(metadata.versions) == ["1"]
    assert {(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs} == {
        ("pixel_values", "FP32", (-1, 3, 32, 32)), ("images", "BYTES", (-1,))}
    assert {(t.name, tuple(t.shape)) for t in metadata.outputs} == {("logits", (-1, 10)), ("probabilities", (-1, 10))}
    client.close()


def test_tritonclient_model_infer_gets_the_same_scores(classifier, client, pipe):
    import tritonclient.grpc as triton

    images = conformance_images()[:6]
    expected = reference_logits(pipe, images, batch_size=6)  # one request of 6 runs as one batch of 6
    ours = client.classify(images, model="tiny", top_k=3, include_logits=True).results
    triton_client = triton.InferenceServerClient(url=classifier.address)

    # The pipeline applies the EXIF orientation before its processor; so must a Triton-style client.
    from transformers.image_utils import load_image

    pixel_values = pipe.image_processor(images=[load_image(Image.open(io.BytesIO(d))) for d in images],
                                        return_tensors="np")["pixel_values"].astype(np.float32)
    tensor = triton.InferInput("pixel_values", list(pixel_values.shape), "FP32")
    tensor.set_data_from_numpy(pixel_values)
    result = triton_client.infer("tiny", [tensor], request_id="r-1", outputs=[
        triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("probabilities")])
    assert result.get_response().id == "r-1"
    logits = result.as_numpy("logits")
    assert logits.shape == (6, 10) and float(np.abs(logits - expected).max()) <= 1e-5
    assert np.array_equal(logits, np.stack([logits_of(r) for r in ours]))
    probabilities = result.as_numpy("probabilities")
    assert np.allclose([[c.score for c in r.classes] for r in ours], -np.sort(-probabilities, axis=1)[:, :3], atol=1e-6)

    # Encoded files as BYTES, and Triton's classification extension (class_count) on the output.
    files = triton.InferInput("images", [len(images)], "BYTES")
    files.set_data_from_numpy(np.array(images, dtype=object))
    result = triton_client.infer("tiny", [files], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    top3 = result.as_numpy("probabilities")
    assert top3.shape == (6, 3)
    for row, mine in zip(top3, ours):
        parsed = [cell.decode().split(":") for cell in row]
        assert [int(index) for _, index, _ in parsed] == [c.class_index for c in mine.classes]
        assert [label for _, _, label in parsed] == [c.label for c in mine.classes]
        assert np.allclose([float(score) for score, _, _ in parsed], [c.score for c in mine.classes], atol=1e-6)
    triton_client.close()


@pytest.mark.parametrize("case", ["unknown-model", "wrong-shape", "bad-image", "class-count", "two-inputs"])
def test_tritonclient_errors(classifier, case):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=classifier.address)
    model, outputs = "tiny", None
    if case == "wrong-shape":
        inputs = [triton.InferInput("pixel_values", [1, 3, 16, 16], "FP32")]
        inputs[0].set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    else:
        inputs = [triton.InferInput("images", [2], "BYTES")]
        data = [synthetic_images(1, seed=2)[0], b"not an image" if case == "bad-image" else synthetic_images(1)[0]]
        inputs[0].set_data_from_numpy(np.array(data, dtype=object))
    if case == "unknown-model":
        model = "no-such-model"
    if case == "class-count":
        outputs = [triton.InferRequestedOutput("logits", class_count=11)]
    if case == "two-inputs":
        extra = triton.InferInput("pixel_values", [1, 3, 32, 32], "FP32")
        extra.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        inputs.append(extra)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, inputs, outputs=outputs)
    expected = "StatusCode.NOT_FOUND" if case == "unknown-model" else "StatusCode.INVALID_ARGUMENT"
    assert raised.value.status() == expected, raised.value
    if case == "bad-image":
        assert "images[1]" in raised.value.message()
    client.close()
