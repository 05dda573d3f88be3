"""docs/architecture.md's "Where things live" table matches the tree (fast; no services).

Every folder the table names exists, every module a row names exists in that row's folder, and
every service folder and every module of the shared runtime and the client library is named
somewhere, so a newcomer who follows the table finds each behaviour where it says.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _rows() -> list[tuple[str, str]]:
    text = DOC.read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((cells[0], cells[1]))
    return rows


def _folders(cell: str) -> list[Path]:
    """The folders a first-column cell names; `<service>` and `<name>` stand for every such folder."""
    folders = []
    for pattern in re.findall(r"`([^`]+)`", cell):
        parts = pattern.rstrip("/").split("/")
        matches = [ROOT]
        for part in parts:
            if part.startswith("<") and part.endswith(">"):
                matches = [p for m in matches for p in sorted(m.iterdir()) if p.is_dir() and p.name != "__pycache__"]
            else:
                matches = [m / part for m in matches]
        folders += matches
    return folders


def test_every_named_folder_and_module_exists():
    rows = _rows()
    assert len(rows) >= 10, "the table was not found or lost its rows"
    for first, what in rows:
        folders = _folders(first)
        assert folders, f"row {first}: names no folder"
        if "<" in first:  # a pattern (`proto/latentwire/<service>/v1/`): some folders match it, not every one
            folders = [folder for folder in folders if folder.exists()]
            assert folders, f"docs/architecture.md names {first}, which matches nothing"
        for folder in folders:
            assert folder.exists(), f"docs/architecture.md names {folder.relative_to(ROOT)}, which does not exist"
        for module in re.findall(r"`([\w/]+\.py)`", what):
            if any((folder / module).exists() for folder in folders if folder.is_dir()):
                continue
            # A row for `services/<name>/` describes the files every service has: one service is enough.
            assert "<" in first and any((f / module).exists() for f in folders), (
                f"row {first}: names {module}, which is not in that folder")


def test_every_service_and_shared_module_is_named():
    text = " ".join(f"{first} {what}" for first, what in _rows())
    for folder in sorted((ROOT / "services").iterdir()):
        if folder.is_dir() and (folder / "__init__.py").exists():
            assert f"services/{folder.name}/" in text or "services/<name>/" in text, folder.name
    for package in ("services/runtime", "clients/python/latentwire/client", "services/orchestrator",
                    "services/registry"):
        for module in sorted((ROOT / package).glob("*.py")):
            if module.name == "__init__.py":
                continue
            assert module.name in text or module.stem in text, (
                f"{package}/{module.name} is not named in docs/architecture.md's 'Where things live'")
