"""Where latentwire keeps its files on this machine: ``$LATENTWIRE_HOME``, default ``~/.cache/latentwire``.

The one place that reads LATENTWIRE_HOME; the services (default models, registry data, model cache,
job store, logs) and any client command that needs a default folder ask here.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The environment variable naming latentwire's home folder.
HOME_ENV = "LATENTWIRE_HOME"


def default_home() -> Path:
    """$LATENTWIRE_HOME, default ~/.cache/latentwire: default models, registry data, caches, logs."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "latentwire").expanduser()
