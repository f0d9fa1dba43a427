"""Shapes and run states shared by the measured study and its parts (the data-mix
advisor's base model, the Nexus comparison): a size written as a preset name or a shape,
and whether a run directory is finished, resumable or fresh."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..training.checkpoint import list_checkpoints
from ..training.model import PRESETS

_SHAPE = re.compile(r"(\d+)x(\d+)(?:x(\d+))?")


def parse_shape(size: str) -> tuple[int, int, int]:
    """(layers, heads, width) of a preset name or a LxD / LxHxD shape."""
    if size in PRESETS:
        return PRESETS[size]
    m = _SHAPE.fullmatch(size.strip().lower())
    if not m:
        raise UserError(f"size '{size}' is neither a preset ({', '.join(PRESETS)}) nor a shape like 2x64 "
                        "(layers x width) or 2x2x64 (layers x heads x width)")
    if m.group(3) is None:
        layers, width = int(m.group(1)), int(m.group(2))
        heads = max(1, width // 32)
    else:
        layers, heads, width = (int(m.group(i)) for i in (1, 2, 3))
    if layers < 1 or heads < 1 or width < 1 or width % heads:
        raise UserError(f"size '{size}': need layers, heads, width ≥ 1 with heads dividing width")
    return layers, heads, width


def run_state(run_dir: Path, steps: int) -> str:
    """'done', 'partial' (has a checkpoint to resume from), 'fresh' (nothing usable)."""
    checkpoints = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if checkpoints and int(checkpoints[-1].name.removeprefix("step")) >= steps:
        return "done"
    return "partial" if checkpoints else "fresh"
