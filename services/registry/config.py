"""Registry service configuration: the common flags plus where its data lives and its limits."""
from __future__ import annotations

import argparse
from pathlib import Path

from services.runtime.config import add_flag, common_parser, default_home

from .integrity import READ_BLOCKS, READ_VERIFICATIONS

#: Default port of the registry service.
DEFAULT_PORT = 50055

#: Largest blob (one model file) accepted, in bytes: 64 GiB.
DEFAULT_MAX_BLOB_BYTES = 64 * 1024**3
#: Disk space uploads leave free, in bytes: 1 GiB.
DEFAULT_MIN_FREE_DISK_BYTES = 1024**3
#: Seconds without a chunk after which an upload loses its blob's lease.
DEFAULT_UPLOAD_LEASE_SECONDS = 60.0
#: Seconds between garbage collections (besides the one on start).
DEFAULT_GC_INTERVAL_SECONDS = 3600.0
#: Seconds a blob no version lists is kept after it was last written, found or queried: an import
#: uploads every file before it records the version, which may take longer than one file's lease.
DEFAULT_GC_GRACE_SECONDS = 3600.0
#: Seconds within which every stored blob is re-hashed against its sha256 (the scrub): 7 days.
DEFAULT_SCRUB_INTERVAL_SECONDS = 7 * 24 * 3600.0


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
    add_flag(parser, "--quota-bytes", default=0, type=int,
             help="most bytes the store holds in blobs and pending uploads together; an upload that would pass "
                  "it is refused (QUOTA_EXCEEDED); 0: no quota, only the free disk bounds it")
    add_flag(parser, "--min-free-disk-bytes", default=DEFAULT_MIN_FREE_DISK_BYTES, type=int,
             help="disk space, in bytes, an upload must leave free after every upload in progress is written "
                  "(else it is refused: DISK_FULL)")
    add_flag(parser, "--upload-lease-seconds", default=DEFAULT_UPLOAD_LEASE_SECONDS, type=float,
             help="an upload that sends no chunk for this long loses its blob (ABORTED, UPLOAD_LEASE_EXPIRED; "
                  "it resumes from QueryBlob) and its pending bytes become collectable")
    add_flag(parser, "--gc-interval-seconds", default=DEFAULT_GC_INTERVAL_SECONDS, type=float,
             help="seconds between garbage collections of abandoned uploads and blobs no version lists "
                  "(one also runs on start; `latentwire models gc` runs one now); 0: none besides those")
    add_flag(parser, "--gc-grace-seconds", default=DEFAULT_GC_GRACE_SECONDS, type=float,
             help="a blob no version lists is collected only once nobody wrote, found or queried it for this long "
                  "(at least the upload lease), so an import in progress keeps its blobs")
    add_flag(parser, "--scrub-interval-seconds", default=DEFAULT_SCRUB_INTERVAL_SECONDS, type=float,
             help="every stored blob is re-hashed against its sha256 at least this often (checked hourly, on a "
                  "worker thread); a corrupt one is quarantined (import it again to repair it). Under "
                  "--read-verification blocks reads check the blocks they send either way; under digest the scrub "
                  "is what finds damage at rest; 0: no scrubbing")
    add_flag(parser, "--read-verification", default=READ_BLOCKS, choices=READ_VERIFICATIONS,
             help="what a ReadBlob checks before it sends a blob's bytes. blocks: each 1 MiB block against the "
                  "CRC-32 taken when the blob matched its sha256 (a block changed at rest is never sent: the blob "
                  "is quarantined, DATA_LOSS); digest: nothing, the sha256 checked when the blob was written and "
                  "re-checked by the scrub stands for it (less CPU per transfer; a blob damaged at rest reaches "
                  "clients, whose own sha256 check refuses it, until the next scrub quarantines it)"),
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
    if extra.quota_bytes < 0 or extra.min_free_disk_bytes < 0:
        parser.error("--quota-bytes and --min-free-disk-bytes must be at least 0")
    if extra.upload_lease_seconds <= 0:
        parser.error("--upload-lease-seconds must be more than 0")
    if extra.gc_interval_seconds < 0 or extra.gc_grace_seconds < 0:
        parser.error("--gc-interval-seconds and --gc-grace-seconds must be at least 0")
    if extra.scrub_interval_seconds < 0:
        parser.error("--scrub-interval-seconds must be at least 0")
    if extra.read_verification not in READ_VERIFICATIONS:  # a value from the environment skips argparse's choices
        parser.error(f"--read-verification must be one of {', '.join(READ_VERIFICATIONS)}, "
                     f"not {extra.read_verification!r}")
