"""Writing analysis tables as CSV and Markdown, and the summary as JSON (atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..runs import atomic_write_text, json_safe


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row, in order of first appearance (rows may lack optional columns)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}"
    return str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = _columns(rows)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row.get(c), float) else row[c])
                         for c in cols])
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(tables: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    out = Path(out) / "tables"
    written = []
    for name, rows in tables.items():
        atomic_write_text(out / f"{name}.csv", to_csv(rows))
        atomic_write_text(out / f"{name}.md", to_markdown(rows))
        written.append(out / f"{name}.csv")
    return written


def write_summary(summary: dict[str, Any], out: Path) -> Path:
    path = Path(out) / "summary.json"
    atomic_write_text(path, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return path
