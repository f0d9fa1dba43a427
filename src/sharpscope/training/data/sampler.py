"""Batches from a mixture of sources: deterministic, resumable, and fixed for validation.

:class:`BatchSampler` makes batch ``k`` a pure function of ``(seed, k)``: resuming needs
only the position, and any batch can be recomputed (``batch_at``). Each row picks its
source by the mixture weights and a uniform start offset. :func:`validation_batches`
draws fixed windows from the validation split, one per stratum of the split, so a few
batches cover it evenly.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np
import torch

from ...errors import UserError
from .sources import TokenSource
from .text import check_seed

__all__ = ["BatchSampler", "validation_batches"]

# Separate random streams for the sampler's kinds of draws, so that they never coincide.
_MIXTURE_STREAM, _SOURCE_STREAM, _VALIDATION_STREAM = 0, 1, 2


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_index(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"batch index must be a non-negative integer, got {k!r}")
    return int(k)


def _windows(tokens_per_row: Sequence[np.ndarray], offsets: Sequence[int], block_size: int):
    """Rows of ``block_size + 1`` tokens split into inputs and next-token targets."""
    rows_BxT1 = np.empty((len(offsets), block_size + 1), dtype=np.int64)
    for i, (tokens, offset) in enumerate(zip(tokens_per_row, offsets)):
        rows_BxT1[i] = tokens[offset: offset + block_size + 1]
    x_BxT = torch.from_numpy(np.ascontiguousarray(rows_BxT1[:, :-1]))
    y_BxT = torch.from_numpy(np.ascontiguousarray(rows_BxT1[:, 1:]))
    return x_BxT, y_BxT


def _check_sources(sources: Mapping[str, TokenSource], block_size: int, split: str) -> None:
    if not sources:
        raise UserError("no data sources given; name at least one")
    for name, source in sources.items():
        if not isinstance(source, TokenSource):
            raise TypeError(f"source '{name}' is a {type(source).__name__}, not a TokenSource")
        n = len(getattr(source, split))
        if n < block_size + 1:
            raise UserError(f"data source '{name}' ({source.origin}) has {n} {split} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use more data or a smaller block_size")


class BatchSampler:
    """Deterministic, resumable batches from a weighted mixture of sources.

    Batch ``k`` depends only on ``(seed, k)`` and the sources: row ``i`` takes its source
    with probability proportional to its weight and a start offset uniform over the
    positions that leave ``block_size + 1`` tokens. Names are used in sorted order, so
    the dict order of ``sources`` and ``weights`` does not matter. Batches are global: in
    data-parallel training each rank computes batch ``k`` and keeps its own rows.
    """

    def __init__(self, sources: Mapping[str, TokenSource], *, batch_size: int, block_size: int,
                 weights: Mapping[str, float] | None = None, seed: int = 0, split: str = "train"):
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.block_size = _check_positive_int(block_size, "block_size")
        self.seed = check_seed(seed)
        self.split = split
        _check_sources(sources, self.block_size, split)
        self.sources = dict(sources)
        self.names = sorted(self.sources)
        self._tokens = [getattr(self.sources[n], split) for n in self.names]
        self._lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self.probabilities = self._probabilities(weights)
        self._active = np.array([i for i, n in enumerate(self.names) if self.probabilities[n] > 0])
        self._active_p = np.array([self.probabilities[self.names[i]] for i in self._active])
        self.position = 0

    def _probabilities(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        if weights is None:
            return {n: 1 / len(self.names) for n in self.names}
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise UserError(f"weights name unknown source(s) {', '.join(unknown)}; "
                            f"the sources are {', '.join(self.names)}")
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise UserError(f"weights give no weight to source(s) {', '.join(missing)}; "
                            f"give every source a weight (0 leaves it out)")
        values = {}
        for n in self.names:
            w = weights[n]
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(w) or w < 0:
                raise UserError(f"weight of source '{n}' must be a finite number >= 0, got {w!r}")
            values[n] = float(w)
        total = sum(values.values())
        if total <= 0:
            raise UserError("all source weights are zero; give at least one source a positive weight")
        return {n: w / total for n, w in values.items()}

    # -- one batch

    def _plan(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _MIXTURE_STREAM, k])
        source_B = rng.choice(self._active, size=self.batch_size, p=self._active_p)
        offset_B = rng.integers(0, self._lengths[source_B] - self.block_size)
        return source_B, offset_B

    def batch_at(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` as ``(x_BxT, y_BxT)`` int64 tensors, ``y`` being ``x`` one token on."""
        source_B, offset_B = self._plan(_check_index(k))
        return _windows([self._tokens[s] for s in source_B], offset_B.tolist(), self.block_size)

    def rows_per_source(self, k: int) -> list[str]:
        """Source name of each row of batch ``k``, for per-source losses."""
        source_B, _ = self._plan(_check_index(k))
        return [self.names[s] for s in source_B]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current position; then move on by one."""
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def source_batch(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` drawn from source ``name`` alone (whatever its weight).

        Its own random stream, keyed by the name's CRC-32, so adding or removing other
        sources leaves it unchanged.
        """
        if name not in self.sources:
            raise UserError(f"unknown data source '{name}'; the sources are {', '.join(self.names)}")
        k = _check_index(k)
        i = self.names.index(name)
        rng = np.random.default_rng([self.seed, _SOURCE_STREAM, zlib.crc32(name.encode("utf-8")), k])
        offset_B = rng.integers(0, self._lengths[i] - self.block_size, size=self.batch_size)
        return _windows([self._tokens[i]] * self.batch_size, offset_B.tolist(), self.block_size)

    # -- resuming

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        position = state.get("position") if isinstance(state, Mapping) else None
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise UserError(f"sampler state needs a non-negative integer 'position', got {state!r}")
        self.position = int(position)

    def __repr__(self) -> str:
        mix = ", ".join(f"{n}={p:.3g}" for n, p in self.probabilities.items())
        return (f"BatchSampler({mix}; batch_size={self.batch_size}, block_size={self.block_size}, "
                f"seed={self.seed}, split={self.split!r}, position={self.position})")


def validation_batches(sources: Mapping[str, TokenSource], *, batch_size: int, block_size: int,
                       n_batches: int, seed: int = 0) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed evaluation batches per source, from the validation split.

    The ``n_batches * batch_size`` windows of a source are stratified: the span of start
    offsets is cut into that many equal strata and each window starts at a random point
    of its own stratum. A few batches thus cover the whole split evenly (lower variance
    than independent draws), and the same seed gives the same windows.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    block_size = _check_positive_int(block_size, "block_size")
    n_batches = _check_positive_int(n_batches, "n_batches")
    seed = check_seed(seed)
    _check_sources(sources, block_size, "val")
    out = {}
    n_rows = n_batches * batch_size
    for name, source in sources.items():
        span = len(source.val) - block_size  # number of valid start offsets
        rng = np.random.default_rng([seed, _VALIDATION_STREAM, zlib.crc32(name.encode("utf-8"))])
        lower_R = np.arange(n_rows) * span / n_rows
        offset_R = np.minimum(np.floor(lower_R + rng.random(n_rows) * span / n_rows), span - 1).astype(np.int64)
        out[name] = [
            _windows([source.val] * batch_size, offset_R[j * batch_size:(j + 1) * batch_size].tolist(), block_size)
            for j in range(n_batches)
        ]
    return out
