"""A text source before tokenizing: its documents, the train/validation cut, byte caps,
and the argument checks every loader shares.

Splits
    Text corpora put the last ``val_fraction`` (5%) of their text into validation, moving
    the cut to the nearest document start when one lies within a quarter of the validation
    size, so that no document straddles the split. A single file has no inner documents
    and is cut exactly (for tokenizers other than bytes, at a character boundary). Because
    the built-in documents are in a path-hash order, the validation documents are a spread
    sample of the library, not its alphabetical tail. The cut is made on the text *before*
    tokenizing, so every tokenizer sees the same training and validation text and a BPE
    tokenizer trained on the training split has never seen the validation text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ...errors import UserError

__all__ = ["Text", "cut_point", "split_text", "cap_documents", "safe_name", "check_fraction", "check_cap",
           "check_seed"]


@dataclass(frozen=True, eq=False)
class Text:
    """A text source before tokenization: its documents, as UTF-8 bytes."""

    name: str
    origin: str
    documents: Sequence[bytes]
    val_documents: Sequence[bytes] | None = None
    """A validation split of its own (arithmetic, a dataset's validation split); else one is cut."""


def cut_point(n: int, doc_starts: np.ndarray, val_fraction: float) -> int:
    """Where the last ``val_fraction`` of ``n`` units begins: at a document start when one is near."""
    if val_fraction == 0 or n < 2:
        return n
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    target = n - n_val
    starts = np.asarray(doc_starts, dtype=np.int64)
    starts = starts[(starts > 0) & (starts < n)]
    near = starts[np.abs(starts - target) <= n_val // 4]
    return int(near[np.argmin(np.abs(near - target))]) if len(near) else target


def split_text(text: Text, val_fraction: float, *, char_boundary: bool) -> tuple[list[bytes], list[bytes]]:
    """Training and validation documents. The cut is made on the text, before tokenizing,
    so that every tokenizer sees the same training and validation text.

    ``char_boundary`` moves a cut that falls inside a UTF-8 character back to its start
    (needed by tokenizers that decode the text; the byte tokenizer takes the bytes as they are).
    """
    if text.val_documents is not None:
        return [d for d in text.documents if d], [d for d in text.val_documents if d]
    docs = [d for d in text.documents if d]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if docs else lengths
    n = int(lengths.sum())
    cut = cut_point(n, starts, val_fraction)
    if cut >= n:
        return docs, []
    i = int(np.searchsorted(starts, cut, side="right")) - 1
    doc, offset = docs[i], cut - int(starts[i])
    if char_boundary:
        while offset > 0 and doc[offset] & 0xC0 == 0x80:  # a continuation byte
            offset -= 1
    head, tail = doc[:offset], doc[offset:]
    return docs[:i] + ([head] if head else []), [tail] + docs[i + 1:]


def cap_documents(documents: Iterable[bytes], max_bytes: int) -> list[bytes]:
    """Documents in order until ``max_bytes``; the last one is cut to fill the cap exactly."""
    kept, total = [], 0
    for doc in documents:
        room = max_bytes - total
        if room <= 0:
            break
        kept.append(doc[:room])
        total += len(kept[-1])
    return kept


def safe_name(base: str) -> str:
    """``base`` as a source name: characters other than letters, digits, ``_.-`` become ``_``;
    no leading dot (a hidden name); ``data`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".") or "data"


def check_fraction(val_fraction: float) -> float:
    val_fraction = float(val_fraction)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return val_fraction


def check_cap(max_bytes, default: int | None) -> int | None:
    if max_bytes is None:
        return default
    if isinstance(max_bytes, bool) or int(max_bytes) != max_bytes or max_bytes < 1:
        raise UserError(f"max_bytes must be a positive whole number of bytes, got {max_bytes!r}")
    return int(max_bytes)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
