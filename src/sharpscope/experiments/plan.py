"""What the measured study and its parts (the data-mix advisor's base model, the Nexus
comparison) share to plan and resume their runs: a size written as a preset name or a
shape, whether a run directory is finished, resumable or fresh, training it from that
state, and whether what is on disk was made with today's settings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from ..config import from_dict, to_dict
from ..errors import UserError
from ..runs import CONFIG_FILE
from ..training.checkpoint import STATE_FILE, list_checkpoints
from ..training.config import TrainConfig
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
    """'done', 'partial' (has a checkpoint to resume from), 'fresh' (nothing usable). A run
    the stability guard stopped ('stopped' in its last checkpoint's state) is done: resuming
    it would only meet the same alarm again."""
    checkpoints = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if checkpoints and int(checkpoints[-1].name.removeprefix("step")) >= steps:
        return "done"
    if checkpoints and _stopped(checkpoints[-1]):
        return "done"
    return "partial" if checkpoints else "fresh"


def _stopped(checkpoint: Path) -> bool:
    try:
        return bool(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("stopped"))
    except (OSError, ValueError, AttributeError):
        return False


def is_lead() -> bool:
    """Whether this process writes shared files: rank 0 under torch.distributed, else always."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def train_from_state(config: TrainConfig, path: Path, state: str,
                     on_step: Callable[[int, int], None] | None = None) -> None:
    """Train the run at ``path`` from its :func:`run_state`: a 'partial' run resumes from its
    last checkpoint, a 'fresh' one starts in an emptied folder (a run killed before its
    first checkpoint has nothing to keep). Every rank calls this; rank 0 empties the folder
    while the others wait."""
    import torch.distributed as dist

    from ..training.trainer import train

    if state == "fresh" and path.exists() and is_lead():
        shutil.rmtree(path)
    if dist.is_initialized():
        dist.barrier()
    train(config, path, resume=state == "partial", on_step=on_step)


def with_current_defaults(cls: type, stored: Any) -> dict[str, Any] | None:
    """A stored config read back through today's dataclass, so that a setting added since
    (with its default) does not count as a change; None when it no longer reads."""
    try:
        return to_dict(from_dict(cls, stored))
    except (UserError, TypeError, AttributeError):
        return None


def stored_train_settings(run_path: Path) -> dict[str, Any] | None:
    """The TrainConfig a run on disk was trained with (its config.json), read through
    today's defaults; None when there is none or it does not read."""
    try:
        stored = json.loads((run_path / CONFIG_FILE).read_text(encoding="utf-8"))["train"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return with_current_defaults(TrainConfig, stored)
