"""The client distribution stays light: `pip install ./clients/python` brings no torch, diffusers or
transformers, and what it installs generates images from a running suite.

The static check (nothing under clients/python/latentwire imports the server or a framework) is fast;
the install into a fresh virtual environment is `slow` (it downloads grpcio, protobuf, numpy, ...).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "clients" / "python"
#: What the client must never pull in: the server distribution and the model frameworks.
FORBIDDEN = ("services", "torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, anywhere in it (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_client_package_imports_neither_the_server_nor_a_framework():
    sources = sorted((CLIENT / "latentwire").rglob("*.py"))
    assert len(sources) > 20  # the generated contracts, the client library and the CLI
    offenders = {str(path.relative_to(CLIENT)): sorted(imported_modules(path) & set(FORBIDDEN))
                 for path in sources}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_a_nested_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from services.runtime import errors\n    import torch.nn\n")
    assert imported_modules(probe) >= {"services", "torch"}


@pytest.mark.slow
def test_fresh_venv_install_has_no_torch_and_generates(suite, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)  # no system site packages
    python, latentwire = venv / "bin" / "python", venv / "bin" / "latentwire"

    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(CLIENT)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True, timeout=120)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "latentwire-client" in installed
    assert installed.isdisjoint({"torch", "diffusers", "transformers"}), sorted(installed)
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True, timeout=60).returncode != 0

    # The venv's own files, not this checkout's: the package imports from site-packages.
    where = subprocess.run([str(python), "-c", "import latentwire.client; print(latentwire.client.__file__)"],
                           capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout

    help_text = subprocess.run([str(latentwire), "generate", "--help"], capture_output=True, text=True, timeout=60,
                               cwd=tmp_path)
    assert help_text.returncode == 0 and "--server" in help_text.stdout, help_text.stderr

    output = tmp_path / "out.png"
    generated = subprocess.run([str(latentwire), "generate", "a lighthouse", "--steps", "2", "--seed", "5",
                                "--server", suite.address, "-o", str(output)],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
