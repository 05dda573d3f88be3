"""Text encoder service configuration: the common flags plus its own."""
from __future__ import annotations

import argparse

from services.runtime.config import add_flag, common_parser

#: Default port of the text encoder service.
DEFAULT_PORT = 50052


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.text_encoder`."""
    parser = common_parser("latentwire text encoder service (CLIP tokenizer + text encoder)", DEFAULT_PORT)
    add_flag(parser, "--max-prompts", default=64, type=int, help="most prompts x images per request")
    return parser
