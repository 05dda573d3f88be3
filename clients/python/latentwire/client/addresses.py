"""Where the clients and the `latentwire` command find the suite when no address is given.

``LATENTWIRE_SERVER`` names the orchestrator (generate, classify, jobs, schedulers) and
``LATENTWIRE_REGISTRY`` the model registry (models ...); without them, the ports `latentwire up`
uses on this machine.
"""
from __future__ import annotations

import os

#: Where `latentwire up` puts the orchestrator.
DEFAULT_SERVER = "localhost:50051"
#: Where `latentwire up` (and `python -m services.registry`) puts the registry.
DEFAULT_REGISTRY = "localhost:50055"

SERVER_ENV = "LATENTWIRE_SERVER"
REGISTRY_ENV = "LATENTWIRE_REGISTRY"


def server_address(address: str | None = None) -> str:
    """``address``, else $LATENTWIRE_SERVER, else localhost:50051."""
    return address or os.environ.get(SERVER_ENV) or DEFAULT_SERVER


def registry_address(address: str | None = None) -> str:
    """``address``, else $LATENTWIRE_REGISTRY, else localhost:50055."""
    return address or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY
