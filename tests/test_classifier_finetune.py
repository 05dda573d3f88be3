"""Fine-tuning: `latentwire classify finetune` on a generated two-label image folder, stored in the
registry as a new model version, then classified through the classifier service from the registry."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentwire.client.classifier import ClassifierClient
from latentwire.client.registry import RegistryClient
from services.suite.launcher import seed_registry, start_service, wait_serving
from services.tiny_models.mobilevit import write_stripes_dataset

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_classifier, tmp_path_factory):
    """A registry seeded with the tiny classifier, and a classifier service that loads models from it."""
    root = tmp_path_factory.mktemp("finetune")
    registry = start_service("registry", "services.registry",
                             ["--port", "0", "--data-dir", str(root / "registry")], log_dir=root / "logs")
    classifier = None
    try:
        wait_serving(registry.address, 120, "registry", registry.process)
        name = seed_registry(registry.address, tiny_classifier)
        classifier = start_service("classifier", "services.classifier", [
            "--port", "0", "--model", name, "--registry", registry.address, "--cache-dir", str(root / "cache")],
            log_dir=root / "logs")
        wait_serving(classifier.address, 300, "classifier", classifier.process)
        yield {"registry": registry.address, "classifier": classifier.address, "root": root, "base": name}
    finally:
        for service in (classifier, registry):
            if service is not None:
                service.process.terminate()
                assert service.process.wait(30) == 0, f"unclean exit; logs in {root / 'logs'}"


def test_finetune_reaches_95_percent_and_the_new_version_classifies_through_the_service(stack):
    root = stack["root"]
    train = write_stripes_dataset(root / "train", 100, seed=0)
    heldout = write_stripes_dataset(root / "heldout", 25, seed=1)
    completed = subprocess.run([
        sys.executable, "-m", "latentwire.cli.main", "classify", "finetune", "--data", str(train),
        "--heldout-data", str(heldout), "--model", stack["base"], "--registry", stack["registry"], "--name", "stripes",
        "--alias", "default", "--unfreeze-backbone", "--epochs", "10"], capture_output=True, text=True, timeout=600,
        # One thread: the tiny model gains nothing from two, and on a busy machine OpenMP barriers stall.
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "stripes@1"
    assert "base model tiny-mobilevit@1 from the registry" in completed.stderr
    assert completed.stderr.count("held-out accuracy") >= 10 and "epoch 10/10" in completed.stderr  # progress
    reported = float(re.findall(r"held-out accuracy ([0-9.]+)", completed.stderr)[-1])
    assert reported >= 0.95, completed.stderr

    with RegistryClient(stack["registry"]) as registry:
        version = registry.resolve("stripes")
    assert version.version == 1 and version.tags["labels"] == "horizontal,vertical"
    assert version.tags["finetuned_from"] == "tiny-mobilevit@1"
    assert float(version.tags["heldout_accuracy"]) == pytest.approx(reported, abs=1e-3)

    paths = sorted(heldout.rglob("*.png"))
    with ClassifierClient(stack["classifier"], timeout=120) as client:
        response = client.classify([p.read_bytes() for p in paths], model="stripes", top_k=1)
    assert response.model == "stripes@1"  # fetched from the registry and loaded on first use
    predicted = [r.classes[0].label for r in response.results]
    accuracy = sum(label == p.parent.name for label, p in zip(predicted, paths)) / len(paths)
    assert accuracy >= 0.95
    assert abs(accuracy - reported) <= 1 / len(paths)  # the service preprocesses exactly as training did


def test_head_only_finetune_keeps_the_backbone(tiny_classifier, tmp_path):
    from services.classifier.finetune import FinetuneSettings, finetune

    data = write_stripes_dataset(tmp_path / "data", 10, seed=2)
    result = finetune(tiny_classifier, data, tmp_path / "out", FinetuneSettings(epochs=2))
    assert result.labels == ["horizontal", "vertical"] and result.heldout_count == 4 and result.train_count == 16
    before = load_file(Path(tiny_classifier) / "model.safetensors")
    after = load_file(result.folder / "model.safetensors")
    backbone = [k for k in before if k.startswith("mobilevit.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # frozen, BatchNorm stats included
    assert after["classifier.weight"].shape == (2, 32)
    assert result.trainable_parameters == 2 * 32 + 2


def test_export_is_stored_in_the_registry_as_a_tagged_version(stack, tiny_classifier, tmp_path, capsys):
    """`classify export --store`: the folder with its export becomes a new registry version whose tags say which
    file is which export; fetching the version gives the same export file."""
    import shutil

    from latentwire.cli.main import main

    folder = tmp_path / "tiny-exports"
    shutil.copytree(tiny_classifier, folder, ignore=shutil.ignore_patterns("model.onnx", "model.int8.*"))

    def export(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_:
            main(["classify", "export", str(folder), *args])
        captured = capsys.readouterr()
        return exit_.value.code, captured.out, captured.err

    code, out, err = export("--store", "--registry", stack["registry"], "--alias", "mobile")
    assert code == 0, err
    assert out.splitlines() == [f"wrote {folder / 'model.onnx'}", "stored tiny-exports@1 (exports onnx)"]
    with RegistryClient(stack["registry"]) as registry:
        version = registry.resolve("tiny-exports@mobile")
        assert version.version == 1
        assert version.tags["exports"] == "onnx" and version.tags["export.onnx"] == "model.onnx"
        assert version.tags["exported"] == "onnx"
        stored = {f.path: f.sha256 for f in version.files}
        assert {"config.json", "preprocessor_config.json", "model.safetensors", "model.onnx"} <= set(stored)
        fetched = registry.download_files(version, tmp_path / "fetched")
    assert (fetched.folder / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()

    # Storing again makes another version (the export is re-run and re-checked); --output does not go with --store.
    code, out, _ = export("--store", "--registry", stack["registry"])
    assert code == 0 and out.splitlines()[-1] == "stored tiny-exports@2 (exports onnx)"
    code, _, err = export("--store", "--registry", stack["registry"], "--output", str(tmp_path / "elsewhere.onnx"))
    assert code == 2 and "--store keeps the folder with its exports" in err
