"""Model sizes written the way people write them: 10M, 1.3B, 7e9."""

from __future__ import annotations

import re

from .errors import UserError

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_size(label: str | float) -> float:
    """'1.3B' -> 1.3e9; plain numbers pass through; anything else is a UserError."""
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        value = float(label)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBTkmbt]?)\s*", str(label))
        if not m:
            raise UserError(f"cannot read model size '{label}'; write it like 10M, 1.3B or 7e9")
        value = float(m.group(1)) * _SUFFIX.get(m.group(2).upper(), 1.0)
    if not value > 0:
        raise UserError(f"model size must be positive, got {label!r}")
    return value


def size_label(n: float) -> str:
    """1.3e9 -> '1.3B' (the inverse of :func:`parse_size` for round sizes)."""
    for suffix, unit in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= unit:
            return f"{n / unit:.4g}{suffix}"
    return f"{n:.4g}"
