"""Which port each service of `latentwire up` takes (no imports beyond the standard library: the CLI reads it
to build its help).

With ``--port N`` (or ``--base-port N``) the orchestrator, the address clients use, takes N and the
other services the next ports in PORT_ORDER: text_encoder N+1, denoiser N+2, vae N+3, registry N+4,
classifier N+5, controlnet N+6. The order is fixed: users open firewalls and write configs by it.
"""
from __future__ import annotations

#: Every service of the suite in port order.
PORT_ORDER = ("orchestrator", "text_encoder", "denoiser", "vae", "registry", "classifier", "controlnet")
#: Where `latentwire up` puts the orchestrator by default: the suite spans 50051 to 50057.
DEFAULT_BASE_PORT = 50051


def suite_ports(base_port: int = DEFAULT_BASE_PORT) -> dict[str, int]:
    """Each service's port when the orchestrator listens on ``base_port``: the next ones in PORT_ORDER."""
    return {name: base_port + offset for offset, name in enumerate(PORT_ORDER)}
