"""Registry service configuration: the common flags plus where its data lives and its limits."""
from __future__ import annotations

import argparse
from pathlib import Path

from services.runtime.config import add_flag, common_parser, default_home

#: Default port of the registry service.
DEFAULT_PORT = 50055

#: Largest blob (one model file) accepted, in bytes: 64 GiB.
DEFAULT_MAX_BLOB_BYTES = 64 * 1024**3


def default_data_dir() -> Path:
    """$LATENTWIRE_HOME/registry (LATENTWIRE_HOME defaults to ~/.cache/latentwire)."""
    return default_home() / "registry"


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.registry`."""
    parser = common_parser("latentwire model registry (models, versions, aliases; weight files by sha256)",
                           DEFAULT_PORT, needs_model=False)
    add_flag(parser, "--data-dir", default=str(default_data_dir()),
             help="folder holding the metadata database (registry.db) and the blob store (blobs/); "
                  "one registry process per folder")
    add_flag(parser, "--max-blob-bytes", default=DEFAULT_MAX_BLOB_BYTES, type=int,
             help="largest single file (blob) accepted, in bytes")
    # The common parser defines --allow-pickle only for services that load models; the registry stores them.
    add_flag(parser, "--allow-pickle", action="store_true", default=False,
             help="accept versions listing pickle-based weight files (.bin/.ckpt/.pt/.pth/.pkl); off by default "
                  "since unpickling them runs code")
    return parser


def check_config(parser: argparse.ArgumentParser, extra: argparse.Namespace) -> None:
    """Refuse to start with an unusable data folder or limit."""
    if not extra.data_dir:
        parser.error("the registry needs --data-dir (or LATENTWIRE_DATA_DIR, or LATENTWIRE_HOME)")
    if extra.max_blob_bytes < 1:
        parser.error("--max-blob-bytes must be at least 1")
