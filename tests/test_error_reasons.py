"""docs/errors.md lists every ErrorInfo reason the code can emit, with its status code and where it comes from.

The reasons are found statically: every ``reason=`` keyword of a call in services/ and the client package
(its UPPER_SNAKE string constants, or a module constant it names), and the ``default_reason`` of every
error class. A row missing from the table, a row no code emits any more, or a row whose code or services
column no longer matches fails the test, whose message holds the rows to paste.

    python tests/test_error_reasons.py            print the table as the code has it (meanings kept)
    python tests/test_error_reasons.py --write    rewrite the table in docs/errors.md
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
SOURCES = (ROOT / "services", ROOT / "clients" / "python" / "latentwire")
BEGIN, END = "<!-- reasons:begin -->", "<!-- reasons:end -->"
HEADER = "| Reason | Code | Meaning and what to do | Raised by |\n|---|---|---|---|"
_REASON = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
_ROW = re.compile(r"^\|\s*`([A-Z0-9_]+)`\s*\|([^|]*)\|(.*)\|([^|]*)\|\s*$")
_TODO = "TODO: what it means and what the caller should do"


@dataclass
class Reason:
    codes: set[str] = field(default_factory=set)
    where: set[str] = field(default_factory=set)


@dataclass
class Row:
    reason: str
    codes: set[str]
    meaning: str
    where: set[str]


def _sources() -> list[Path]:
    return sorted(p for root in SOURCES for p in root.rglob("*.py")
                  if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")) and "build" not in p.relative_to(root).parts)


def _where(path: Path) -> str:
    """The service folder under services/ ("runtime": the shared runtime, any service), or "client"."""
    relative = path.relative_to(ROOT)
    return relative.parts[1] if relative.parts[0] == "services" else "client"


def _status_code(node: ast.AST | None) -> str | None:
    """X of a ``grpc.StatusCode.X`` (or ``StatusCode.X``) expression."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Attribute, ast.Name)):
        owner = node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id
        if owner == "StatusCode":
            return node.attr
    return None


def _callee(node: ast.Call) -> str:
    return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")


def collect() -> dict[str, Reason]:
    """Every reason the code can emit, with the status codes and the places it is raised from."""
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in _sources()}
    # Error classes by name: their bases, own status code and default reason.
    classes: dict[str, tuple[list[str], str | None, str | None, Path]] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                code = default = None
                for statement in node.body:
                    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                            and isinstance(statement.targets[0], ast.Name):
                        if statement.targets[0].id == "code":
                            code = _status_code(statement.value)
                        elif statement.targets[0].id == "default_reason" and isinstance(statement.value, ast.Constant):
                            default = statement.value.value
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes[node.name] = (bases, code, default, path)

    def class_code(name: str, seen: frozenset = frozenset()) -> str | None:
        if name not in classes or name in seen:
            return None
        bases, code, _, _ = classes[name]
        return code or next((c for b in bases if (c := class_code(b, seen | {name}))), None)

    reasons: dict[str, Reason] = {}

    def add(reason: str, code: str | None, where: str) -> None:
        entry = reasons.setdefault(reason, Reason())
        entry.where.add(where)
        if code:
            entry.codes.add(code)

    for name, (_, _, default, path) in classes.items():
        if default:
            add(default, class_code(name), _where(path))
    for path, tree in trees.items():
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg != "reason":
                    continue
                code = class_code(_callee(node)) or next(
                    (c for a in [*node.args, *(k.value for k in node.keywords if k.arg == "code")]
                     if (c := _status_code(a))), None)
                # Forwarded reasons (``reason=error.reason``) hold no constant and are skipped: they were
                # collected where they were first raised.
                for part in ast.walk(keyword.value):
                    value = part.value if isinstance(part, ast.Constant) else constants.get(getattr(part, "id", None))
                    if isinstance(value, str) and _REASON.match(value):
                        add(value, code, _where(path))
    return reasons


def _split(cell: str) -> set[str]:
    return {item.strip() for item in cell.split(",") if item.strip()}


def documented(text: str | None = None) -> dict[str, Row]:
    """The rows of the table between the reasons:begin/end markers of docs/errors.md."""
    text = DOC.read_text() if text is None else text
    assert BEGIN in text and END in text, f"{DOC.relative_to(ROOT)} needs the {BEGIN} ... {END} markers"
    rows: dict[str, Row] = {}
    for line in text[text.index(BEGIN):text.index(END)].splitlines():
        if match := _ROW.match(line):
            reason, codes, meaning, where = match.groups()
            assert reason not in rows, f"{reason} is listed twice in {DOC.name}"
            rows[reason] = Row(reason, _split(codes), meaning.strip(), _split(where))
    return rows


def _line(row: Row) -> str:
    return f"| `{row.reason}` | {', '.join(sorted(row.codes)) or '?'} | {row.meaning} | {', '.join(sorted(row.where))} |"


def table(found: dict[str, Reason], rows: dict[str, Row]) -> str:
    """The table as the code has it: codes and services from the code, meanings from the document."""
    lines = []
    for reason in sorted(found):
        old = rows.get(reason)
        # A reason raised only through a helper whose status code the scan cannot see keeps the doc's code.
        codes = found[reason].codes or (old.codes if old else set())
        lines.append(_line(Row(reason, codes, old.meaning if old else _TODO, found[reason].where)))
    return "\n".join([HEADER, *lines])


def test_every_error_reason_is_documented():
    found, rows = collect(), documented()
    assert len(found) > 50, "the scan found too few reasons: has the error model moved?"
    missing = [r for r in sorted(found) if r not in rows]
    stale = [r for r in sorted(rows) if r not in found]
    changed = [r for r in sorted(found) if r in rows and (
        (found[r].codes and found[r].codes != rows[r].codes) or found[r].where != rows[r].where)]
    undescribed = [r for r in sorted(rows) if not rows[r].meaning or rows[r].meaning.startswith("TODO")]
    problems = []
    if missing:
        problems.append("reasons the code emits that docs/errors.md lacks (add these rows, say what to do):\n"
                        + "\n".join(_line(Row(r, found[r].codes, _TODO, found[r].where)) for r in missing))
    if stale:
        problems.append("rows no code emits any more (delete them): " + ", ".join(stale))
    if changed:
        problems.append("rows whose code or services changed (replace them):\n" + "\n".join(
            _line(Row(r, found[r].codes or rows[r].codes, rows[r].meaning, found[r].where)) for r in changed))
    if undescribed:
        problems.append("rows without a meaning: " + ", ".join(undescribed))
    assert not problems, "\n\n".join(problems) + "\n\n(`python tests/test_error_reasons.py --write` rewrites " \
                                                 "the codes and services columns and adds TODO rows)"


def test_the_scan_sees_what_it_must():
    """The scan itself could silently miss reasons; pin a few of each kind it must find."""
    found = collect()
    assert found["INVALID_ARGUMENT"].codes == {"INVALID_ARGUMENT"}  # a class default, also raised explicitly
    assert found["STAGE_UNAVAILABLE"].codes == {"UNAVAILABLE"}  # a class default only
    assert "runtime" in found["SERVICE_BUSY"].where and found["SERVICE_BUSY"].codes == {"RESOURCE_EXHAUSTED"}
    assert found["DOWNLOAD_DIGEST_MISMATCH"].where == {"client"}  # grpc.StatusCode passed as an argument
    assert found["DOWNLOAD_DIGEST_MISMATCH"].codes == {"DATA_LOSS"}


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = table(collect(), documented(text))
    if "--write" not in argv:
        print(new)
        return 0
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + new + "\n" + text[end:])
    todo = new.count(_TODO)
    print(f"wrote {DOC.relative_to(ROOT)}" + (f"; write the meaning of {todo} TODO row(s)" if todo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
