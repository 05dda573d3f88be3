"""Package layout for setuptools (metadata lives in pyproject.toml).

The Python import root is `latentwire`: generated contracts, the client library and the CLI
live in clients/python/latentwire; the services live in services/ and import as
latentwire.services. Generated proto folders have no __init__.py, hence namespace discovery.
"""
from setuptools import find_namespace_packages, setup

client_packages = ["latentwire"] + [
    f"latentwire.{name}" for name in find_namespace_packages("clients/python/latentwire", exclude=["*__pycache__*"])
]
service_packages = ["latentwire.services"] + [
    f"latentwire.services.{name}" for name in find_namespace_packages("services", exclude=["*__pycache__*"])
]

setup(
    packages=client_packages + service_packages,
    package_dir={"latentwire": "clients/python/latentwire", "latentwire.services": "services"},
    package_data={"latentwire": ["**/*.pyi", "py.typed"]},
)
