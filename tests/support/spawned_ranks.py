"""Shared by the distributed tests: running a test's work in several spawned processes (one
per rank), collecting what each rank wrote, and comparing it with one process."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.distributed


def write_rank_result(workdir: str | Path, rank: int, out: dict) -> None:
    """Rank ``rank``'s results as JSON, written atomically (the parent never reads half)."""
    path = Path(workdir) / f"rank{rank}.json"
    with open(path.with_suffix(".json.tmp"), "w") as f:
        json.dump(out, f)
    os.replace(path.with_suffix(".json.tmp"), path)


def spawn_ranks(worker: Callable, world: int, *, deadline_s: float = 180.0) -> list[dict]:
    """``worker(rank, world, workdir)`` in ``world`` processes; returns each rank's results.

    The work directory is our own (not under pytest's basetemp, which a concurrent pytest
    run may prune), and a deadline turns a stuck rendezvous into a failure, not a hang.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sharpscope_ranks_") as tmp:
        workdir = Path(tmp)
        with pytest.MonkeyPatch.context() as mpatch:
            mpatch.setenv("OMP_NUM_THREADS", "1")
            ctx = mp.spawn(worker, args=(world, str(workdir)), nprocs=world, join=False)
            deadline = time.monotonic() + deadline_s
            try:
                while not ctx.join(timeout=1.0):
                    if time.monotonic() > deadline:
                        pytest.fail(f"the {world} worker processes did not finish within {deadline_s:.0f} s")
            finally:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.terminate()
                        proc.join(5)
        results = []
        for rank in range(world):
            with open(workdir / f"rank{rank}.json") as f:
                results.append(json.load(f))
    return results


# --------------------------------------------------------------------------- comparing ranks with one process


def close(a: float, b: float, rtol: float) -> bool:
    """Relative closeness, with NaN equal to NaN (a measurement may legitimately be NaN)."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


def assert_vectors_close(got, want, rtol: float) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def assert_cs_matches(got: dict, want: dict, rtol: float) -> None:
    """Two critical-sharpness results (as dicts) took the same decisions and the same values."""
    assert got["status"] == want["status"]
    assert got["evals"] == want["evals"]
    for key in ("sharpness", "eta", "loss0", "slope"):
        assert close(got[key], want[key], rtol), (key, got[key], want[key])
    for (eta_g, loss_g), (eta_w, loss_w) in zip(got["probes"], want["probes"], strict=True):
        assert close(eta_g, eta_w, rtol) and close(loss_g, loss_w, rtol)
    for g, w in zip(got.get("bracket", ()), want.get("bracket", ())):
        assert close(g, w, rtol)


try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    fully_shard = DTensor = None

requires_fsdp = pytest.mark.skipif(
    fully_shard is None or not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend and FSDP2 (fully_shard) is not available",
)
