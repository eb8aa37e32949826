"""The README's CATConfig knob table says what CATConfig is: every field once, with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from cat_pruning import CATConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _knob_rows() -> dict[str, str]:
    """knob name -> its default cell, from the table whose header starts with '| knob | default |'."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| knob | default |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].strip("`")
        assert name not in rows, f"README lists the knob {name} twice"
        rows[name] = cells[1]
    return rows


def test_readme_knob_table_lists_every_field_with_its_default():
    rows = _knob_rows()
    fields = {f.name: f.default for f in dataclasses.fields(CATConfig)}
    assert sorted(rows) == sorted(fields)
    for name, default in fields.items():
        shown = re.split(r"\s+\(", rows[name])[0].strip("`").strip('"')  # '0.02 (paper: 0.3)' -> '0.02'
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        same = float(shown) == default if numeric else shown == str(default)
        assert same, f"README gives {name} the default {rows[name]!r}, CATConfig {default!r}"
