"""Python client for the latentwire orchestrator."""
from .client import Client, GenerationResult, LatentwireError, control

__all__ = ["Client", "GenerationResult", "LatentwireError", "control"]
