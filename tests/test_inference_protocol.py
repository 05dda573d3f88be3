"""Triton's extensions of the Open Inference Protocol, through tritonclient[grpc] from PyPI, unmodified.

ModelConfig, ModelStatistics and ModelStreamInfer run against the session suite's classifier, directly and
through its orchestrator. The model repository (RepositoryIndex, load and unload of registry models) runs on a
module stack: a registry seeded with the tiny MobileViT, a classifier on it (its default model a local folder),
and an orchestrator in front (the suite's stages, this classifier).

This process never imports latentwire.inference: tritonclient registers the same `inference` message names in
protobuf's default pool, and both in one process would collide (tests/test_contracts.py compares the two in
subprocesses; test_model_config_fields_have_tritons_numbers does the same for model_config.proto).
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys

import grpc
import numpy as np
import pytest

from services.suite.launcher import seed_registry, start_service, wait_serving
from services.tiny_models.mobilevit import synthetic_images

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

triton = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402 - after the importorskip
from tritonclient.utils import InferenceServerException  # noqa: E402

SUITE_MODEL = "tiny-mobilevit"


def images_input(count: int, seed: int = 0):
    tensor = triton.InferInput("images", [count], "BYTES")
    tensor.set_data_from_numpy(np.array(synthetic_images(count, seed=seed), dtype=object))
    return tensor


def status_of(raised) -> str:
    return raised.value.status()


@pytest.fixture(scope="module", params=["classifier", "orchestrator"])
def suite_client(request, suite):
    """tritonclient on the suite's classifier, and on its orchestrator (which forwards the protocol)."""
    address = suite.services["classifier"].address if request.param == "classifier" else suite.address
    client = triton.InferenceServerClient(url=address)
    yield client
    client.close()


# -- ModelConfig -------------------------------------------------------------------------------------


def test_model_config_says_batch_size_batching_inputs_and_outputs(suite_client):
    config = suite_client.get_model_config(SUITE_MODEL).config
    assert (config.name, config.platform, config.backend) == (SUITE_MODEL, "pytorch_libtorch", "pytorch")
    # The classifier's flag defaults: --max-batch-size 4, --max-queue-delay-ms 2, one instance on the CPU.
    assert config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = config.instance_group
    assert group.count == 1 and group.kind == group.KIND_CPU
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input}
    assert inputs == {"pixel_values": (triton.model_config_pb2.TYPE_FP32, [3, 32, 32], True),
                      "images": (triton.model_config_pb2.TYPE_STRING, [1], True)}
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {name: (triton.model_config_pb2.TYPE_FP32, [10]) for name in ("logits", "probabilities")}
    assert len(config.parameters["labels"].string_value.split(",")) == 10
    as_json = suite_client.get_model_config(SUITE_MODEL, model_version="1", as_json=True)
    assert as_json["config"]["max_batch_size"] == 4


@pytest.mark.parametrize("version, code", [("", "StatusCode.NOT_FOUND"), ("2", "StatusCode.NOT_FOUND")])
def test_model_config_of_an_unknown_model_or_version(suite_client, version, code):
    name = "no-such-model" if not version else SUITE_MODEL
    with pytest.raises(InferenceServerException) as raised:
        suite_client.get_model_config(name, model_version=version)
    assert status_of(raised) == code
    assert ("no-such-model" if not version else "version 1") in raised.value.message()


# -- ModelStatistics -------------------------------------------------------------------------------------


def test_statistics_rise_with_inferences(suite_client):
    def stats():
        (entry,) = suite_client.get_inference_statistics(SUITE_MODEL).model_stats
        return entry

    before = stats()
    assert (before.name, before.version) == (SUITE_MODEL, "1")
    for seed in range(3):
        suite_client.infer(SUITE_MODEL, [images_input(2, seed)])
    with pytest.raises(InferenceServerException):  # a failed request: wrong shape
        bad = triton.InferInput("pixel_values", [1, 3, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        suite_client.infer(SUITE_MODEL, [bad])
    after = stats()
    success, fail = after.inference_stats.success, after.inference_stats.fail
    assert success.count == before.inference_stats.success.count + 3
    assert success.ns > before.inference_stats.success.ns
    assert fail.count == before.inference_stats.fail.count + 1
    assert after.inference_count >= before.inference_count + 6  # images; other tests' Classify calls count too
    assert after.execution_count >= before.execution_count + 3
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    assert after.inference_stats.queue.count == after.inference_count
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    batches = {b.batch_size: b.compute_infer for b in after.batch_stats}
    assert sum(b.count for b in batches.values()) == after.execution_count
    assert all(1 <= size <= 4 and b.ns > 0 for size, b in batches.items())
    everything = suite_client.get_inference_statistics().model_stats
    assert [s.name for s in everything] == [SUITE_MODEL]


def test_statistics_of_an_unknown_model_and_a_malformed_version(suite_client):
    with pytest.raises(InferenceServerException) as raised:
        suite_client.get_inference_statistics("no-such-model")
    assert status_of(raised) == "StatusCode.NOT_FOUND" and "no-such-model" in raised.value.message()
    # A version with no name is refused (tritonclient sends none without a name; the raw stub can).
    stub = service_pb2_grpc.GRPCInferenceServiceStub(suite_client._channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelStatistics(service_pb2.ModelStatisticsRequest(version="1"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in raised.value.details()


# -- ModelStreamInfer -------------------------------------------------------------------------------------


def test_stream_infer_answers_each_request_and_reports_errors_in_band(suite_client):
    answers: queue.Queue = queue.Queue()
    suite_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index in range(4):
            suite_client.async_stream_infer(SUITE_MODEL, [images_input(1, seed=index)], request_id=f"r-{index}",
                                            outputs=[triton.InferRequestedOutput("logits")])
        bad = triton.InferInput("pixel_values", [1, 3, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        suite_client.async_stream_infer(SUITE_MODEL, [bad], request_id="bad")
        suite_client.async_stream_infer(SUITE_MODEL, [images_input(1, seed=9)], request_id="after")
        results, errors = {}, []
        for _ in range(6):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result.as_numpy("logits")
    finally:
        suite_client.stop_stream()
    assert sorted(results) == ["after", "r-0", "r-1", "r-2", "r-3"]  # the stream outlived the bad request
    (error,) = errors
    assert "INVALID_ARGUMENT" in error.message() and "pixel_values" in error.message()
    # Each streamed answer equals the unary call's.
    for index in range(4):
        unary = suite_client.infer(SUITE_MODEL, [images_input(1, seed=index)],
                                   outputs=[triton.InferRequestedOutput("logits")]).as_numpy("logits")
        assert results[f"r-{index}"].shape == (1, 10) and np.allclose(results[f"r-{index}"], unary, atol=1e-6)


def test_stream_infer_on_an_unknown_model(suite_client):
    answers: queue.Queue = queue.Queue()
    suite_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        suite_client.async_stream_infer("no-such-model", [images_input(1)], request_id="x")
        result, error = answers.get(timeout=60)
    finally:
        suite_client.stop_stream()
    assert result is None and "NOT_FOUND" in error.message() and "no-such-model" in error.message()


# -- the model repository: RepositoryIndex, load and unload through the registry ---------------------------


@pytest.fixture(scope="module")
def stack(suite, tiny_classifier, tmp_path_factory):
    """A registry seeded with the tiny classifier ("tiny-mobilevit", version 1); a classifier with --registry
    whose default model is the same folder as "local"; an orchestrator (the suite's stages) in front of it."""
    root = tmp_path_factory.mktemp("inference-protocol")
    logs = root / "logs"
    started = []
    try:
        registry = start_service("registry", "services.registry", ["--port", "0", "--data-dir", str(root / "registry")],
                                 log_dir=logs)
        started.append(registry)
        wait_serving(registry.address, 120, "registry", registry.process)
        name = seed_registry(registry.address, tiny_classifier)
        classifier = start_service("classifier", "services.classifier", [
            "--port", "0", "--model", f"local={tiny_classifier}", "--registry", registry.address,
            "--cache-dir", str(root / "cache"), "--max-batch-size", "8", "--max-queue-delay-ms", "5"], log_dir=logs)
        started.append(classifier)
        stages = suite.services
        orchestrator = start_service("orchestrator", "services.orchestrator", [
            "--port", "0", "--text-encoder-address", stages["text_encoder"].address,
            "--denoiser-address", stages["denoiser"].address, "--vae-address", stages["vae"].address,
            "--classifier-address", classifier.address], log_dir=logs)
        started.append(orchestrator)
        wait_serving(classifier.address, 300, "classifier", classifier.process)
        wait_serving(orchestrator.address, 120, "orchestrator", orchestrator.process)
        yield {"registry": registry.address, "classifier": classifier.address,
               "orchestrator": orchestrator.address, "name": name}
    finally:
        for service in reversed(started):
            service.process.terminate()
        for service in reversed(started):
            assert service.process.wait(30) == 0, f"unclean exit; logs in {logs}"


def index_of(client) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


@pytest.mark.parametrize("via", ["classifier", "orchestrator"])
def test_load_index_infer_unload(stack, via):
    client = triton.InferenceServerClient(url=stack[via])
    name = stack["name"]
    try:
        assert name == "tiny-mobilevit"
        assert index_of(client) == {("local", "1"): ("READY", ""), (name, "1"): ("UNAVAILABLE", "unloaded")}
        assert not client.is_model_ready(name)

        client.load_model(name)  # fetched from the registry into the classifier, served under its name
        assert index_of(client)[(name, "1")] == ("READY", "")
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")
        ready = client.get_model_repository_index(as_json=True)["models"]
        assert {(m["name"], m.get("state")) for m in ready} == {("local", "READY"), (name, "READY")}
        registry_logits = client.infer(name, [images_input(2)]).as_numpy("logits")
        local_logits = client.infer("local", [images_input(2)]).as_numpy("logits")
        assert np.array_equal(registry_logits, local_logits)  # the same folder, two ways
        config = client.get_model_config(name, "1").config
        assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 5000
        (stats,) = client.get_inference_statistics(name).model_stats
        assert (stats.version, stats.inference_stats.success.count, stats.inference_count) == ("1", 1, 2)

        client.unload_model(name)
        assert index_of(client)[(name, "1")] == ("UNAVAILABLE", "unloaded")
        assert not client.is_model_ready(name)
        with pytest.raises(InferenceServerException) as raised:
            client.get_inference_statistics(name)
        assert status_of(raised) == "StatusCode.NOT_FOUND" and "not loaded" in raised.value.message()
        client.unload_model(name)  # a model not in memory: nothing to do, as Triton
    finally:
        client.close()


@pytest.mark.parametrize("via", ["classifier", "orchestrator"])
def test_repository_errors(stack, via):
    client = triton.InferenceServerClient(url=stack[via])
    try:
        with pytest.raises(InferenceServerException) as raised:
            client.unload_model("local")
        assert status_of(raised) == "StatusCode.FAILED_PRECONDITION" and "default model" in raised.value.message()
        assert client.is_model_ready("local")
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as raised:
                call("no-such-model")
            assert status_of(raised) == "StatusCode.NOT_FOUND" and "no-such-model" in raised.value.message()
        with pytest.raises(InferenceServerException) as raised:  # Triton's config override: not supported
            client.load_model(stack["name"], config=json.dumps({"max_batch_size": 2}))
        assert status_of(raised) == "StatusCode.INVALID_ARGUMENT" and "config" in raised.value.message()
        with pytest.raises(InferenceServerException) as raised:
            client.get_model_config(stack["name"], model_version="latest")
        assert status_of(raised) == "StatusCode.INVALID_ARGUMENT" and "latest" in raised.value.message()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(client._channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="other"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "repository_name" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            stub.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_name" in raised.value.details()
    finally:
        client.close()


# -- the vendored model_config.proto against Triton's -----------------------------------------------------

_FIELDS = """
import json, sys
from {module} import model_config_pb2 as pb
out = {{}}
def walk(message, prefix=""):
    out[prefix + message.name] = {{f.name: [f.number, f.type] for f in message.fields}}
    for enum in message.enum_types:
        out[prefix + message.name + "." + enum.name] = {{v.name: v.number for v in enum.values}}
    for nested in message.nested_types:
        walk(nested, prefix + message.name + ".")
for message in pb.DESCRIPTOR.message_types_by_name.values():
    walk(message)
for enum in pb.DESCRIPTOR.enum_types_by_name.values():
    out[enum.name] = {{v.name: v.number for v in enum.values}}
json.dump(out, sys.stdout)
"""


def _fields(module: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", _FIELDS.format(module=module)], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_model_config_fields_have_tritons_numbers():
    ours, theirs = _fields("latentwire.inference.v2"), _fields("tritonclient.grpc")
    assert {"ModelConfig", "ModelInput", "ModelOutput", "ModelDynamicBatching", "DataType"} <= set(ours)
    differ = [f"{name}.{field}: ours {value}, Triton's {theirs.get(name, {}).get(field)}"
              for name, fields in ours.items() for field, value in fields.items()
              if theirs.get(name, {}).get(field) != value]
    assert not differ, differ
