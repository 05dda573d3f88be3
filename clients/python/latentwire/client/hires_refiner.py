"""Which pass of a hires fix an SDXL refiner takes over in: AUTOMATIC1111's "Hires fix: which pass to enable refiner
for" setting (``hires_fix_refiner_pass``, infotext "Hires refiner"), by its names. Shared by the orchestrator, the
infotext reader and the CLI. Light: no torch here.

A1111 (modules/sd_samplers_common.py apply_refiner) swaps the refiner in at ``refiner_switch_at`` of the pass it is
enabled for and leaves it loaded: without a separate hires checkpoint, "first pass" and "both passes" both run the
whole second pass on the refiner; "second pass" (the default) runs the first pass on the base alone and hands off
to the refiner within the second pass.
"""
from __future__ import annotations

from latentwire.orchestrator.v1 import orchestrator_pb2

FIRST, SECOND, BOTH = "first pass", "second pass", "both passes"
#: AUTOMATIC1111's default (its infotext leaves "Hires refiner" out for it).
DEFAULT = SECOND
_VALUES = {
    FIRST: orchestrator_pb2.HIRES_REFINER_PASS_FIRST,
    SECOND: orchestrator_pb2.HIRES_REFINER_PASS_SECOND,
    BOTH: orchestrator_pb2.HIRES_REFINER_PASS_BOTH,
}


def names() -> list[str]:
    """The choices by their AUTOMATIC1111 names."""
    return list(_VALUES)


def find(name: str) -> str | None:
    """The choice of this name (case-insensitive; "first", "second", "both" too), or None."""
    key = name.strip().lower()
    for choice in _VALUES:
        if key in (choice, choice.split()[0]):
            return choice
    return None


def to_proto(name: str) -> int:
    """The HiresRefinerPass value of a choice ("" is unspecified: the default)."""
    return _VALUES[name] if name else orchestrator_pb2.HIRES_REFINER_PASS_UNSPECIFIED


def from_proto(value: int) -> str | None:
    """The choice of a HiresRefinerPass value (unspecified: the default), or None for a value not in the table."""
    if value == orchestrator_pb2.HIRES_REFINER_PASS_UNSPECIFIED:
        return DEFAULT
    for name, known in _VALUES.items():
        if known == value:
            return name
    return None
