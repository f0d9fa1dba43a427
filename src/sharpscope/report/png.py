"""Writing figures: every PNG sharpscope draws goes through :func:`atomic_write_png`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..runs import atomic_write_bytes


def atomic_write_png(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG through :func:`~sharpscope.runs.atomic_write_bytes`,
    then close it (pyplot is imported only when a figure is written)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
