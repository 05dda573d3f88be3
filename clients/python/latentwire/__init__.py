"""latentwire: diffusion image generation served as distributed gRPC stage services.

This package holds the generated contracts (latentwire.<service>.v1), the Python client
(latentwire.client) and the CLI (latentwire.cli); the services live in services.
"""
