"""Text encoder service configuration: the common flags plus its own."""
from __future__ import annotations

import argparse

from services.runtime.config import add_flag, common_parser
from services.runtime.errors import ConfigurationError, quote
from services.runtime.families import TEXT_ENCODER_COMPONENTS

#: Default port of the text encoder service.
DEFAULT_PORT = 50052


def parse_encoders(value: str | None) -> tuple[str, ...] | None:
    """--encoders: a comma list of text encoder components ("text_encoder_3", "text_encoder,text_encoder_2");
    empty means all of each model's encoders (None). Raises ConfigurationError (the service refuses to start)."""
    names = tuple(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))
    unknown = [n for n in names if n not in TEXT_ENCODER_COMPONENTS]
    if unknown:
        raise ConfigurationError(
            f"--encoders: {quote(', '.join(unknown))} is not a text encoder component; use a comma list of "
            f"{', '.join(TEXT_ENCODER_COMPONENTS)}, or leave it empty for all")
    return names or None


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m services.text_encoder`."""
    parser = common_parser("latentwire text encoder service (tokenizers + text encoders)", DEFAULT_PORT)
    add_flag(parser, "--max-prompts", default=64, type=int, help="most prompts x images per request")
    add_flag(parser, "--encoders", default="",
             help="text encoder components this replica hosts, a comma list of "
                  f"{', '.join(TEXT_ENCODER_COMPONENTS)} (e.g. text_encoder_3: only SD3's T5); only these and "
                  "their tokenizers are loaded and fetched from the registry; empty: all of each model's")
    return parser
