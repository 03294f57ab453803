"""docs/design.md is the map of the code: its Layout tables list every module under uvq/, and only those.

When this fails, add (or remove) the module's row in the "Layout" section of docs/design.md:
    | `uvq/<path>.py` | concept | what it owns |
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
# A table row whose first cell is one module path: | `uvq/sub/name.py` | ...
ROW = re.compile(r"^\|\s*`(uvq/[\w/]+\.py)`\s*\|", re.MULTILINE)


def _layout_section() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    start = text.index("\n## Layout")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _listed() -> list[str]:
    return ROW.findall(_layout_section())


def _modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "uvq").rglob("*.py")}


def test_layout_table_parses():
    # The regular expression must see the table; otherwise the two checks below prove nothing.
    assert len(_listed()) >= 10


def test_every_module_has_a_row_in_the_layout():
    missing = sorted(_modules() - set(_listed()))
    assert not missing, f"modules missing from the Layout table of docs/design.md: {missing}"


def test_every_row_names_an_existing_module_once():
    listed = _listed()
    stale = sorted(set(listed) - _modules())
    assert not stale, f"docs/design.md's Layout table names modules that do not exist: {stale}"
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"docs/design.md's Layout table lists these modules more than once: {twice}"
