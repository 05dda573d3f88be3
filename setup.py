"""Dependencies of the server distribution (metadata and packages live in pyproject.toml).

The suite depends on the client distribution in `clients/python` (the generated contracts, the
client library and the `latentwire` command). It is not on a package index, so it is a direct
reference to that folder, which must be an absolute file URL: hence this file. The rest of the
list is `[tool.latentwire] dependencies` in pyproject.toml.
"""
from pathlib import Path

import tomllib
from setuptools import setup

ROOT = Path(__file__).resolve().parent
CLIENT = ROOT / "clients" / "python"

with open(ROOT / "pyproject.toml", "rb") as file:
    dependencies = tomllib.load(file)["tool"]["latentwire"]["dependencies"]

setup(install_requires=[f"latentwire-client @ {CLIENT.as_uri()}", *dependencies])
