"""Python client for the latentwire orchestrator."""
from .client import Client, GenerationResult, LatentwireError

__all__ = ["Client", "GenerationResult", "LatentwireError"]
