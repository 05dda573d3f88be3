"""Python client for latentwire: the orchestrator (``Client``), the classifier (``classifier.ClassifierClient``)
and the model registry (``registry.RegistryClient``), all on one base (``base.BaseClient``) and raising one
``LatentwireError``."""
from .addresses import registry_address, server_address
from .client import Client, GenerationResult, control
from .errors import LatentwireError
from .progress import describe, print_progress

__all__ = ["Client", "GenerationResult", "LatentwireError", "control", "describe", "print_progress",
           "registry_address", "server_address"]
