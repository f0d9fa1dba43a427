"""sharpscope.curvature under torch.distributed (DDP, 2 CPU processes, gloo).

The requirement: every rank takes part, losses (and H·v products, gradients) are averaged
over ranks so every rank takes the same decisions, and the result equals the
single-process result on the same global batch. Each rank passes its own shard; the
single-process equivalent is the list of shards ``[shard0, shard1]`` (a list of batches
whose mean loss is the objective; equal shard sizes make it the global-batch loss).

All distributed work runs in ONE spawn of two processes (module-scoped fixture): each
worker wraps the same tiny float64 GPT in DistributedDataParallel, runs every measurement
and a short monitored AdamW training loop, and writes plain floats/lists/strings to
``rank{r}.json``. The single-process reference is computed in the test process with the
same code path on ``[shard0, shard1]``. Tests then compare:

* rank 0 vs rank 1: exactly equal (same decisions, same evaluation counts, same values);
* ranks vs single process: relative 1e-9 for losses/eigenvalues/traces (float64),
  evaluation counts, statuses and product counts exactly; 1e-6 for the training loop.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from support.spawned_ranks import assert_cs_matches as _assert_cs_matches, assert_vectors_close, close, spawn_ranks, write_rank_result
from sharpscope.curvature import (
    SharpnessMonitor,
    critical_sharpness,
    hessian_eigenvalues,
    hessian_trace,
    update_direction,
)
from sharpscope.training.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2
VOCAB, BLOCK = 32, 16
GLOBAL_B = 8  # shards of 4 sequences per rank
METHODS = ("fast", "paper")
TRAIN_STEPS, EVERY, LR, WD = 4, 2, 1e-2, 0.1
RTOL = 1e-9  # float64 measurements: ranks vs single process
TRAIN_RTOL = 1e-6  # after a few optimizer steps


# --------------------------------------------------------------------------- shared setup
# Everything below is used identically by the workers and by the single-process reference.


def make_model(dropout: float = 0.0) -> GPT:
    torch.manual_seed(1234)
    cfg = GPTConfig(
        vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, d_model=16, dropout=dropout
    )
    return GPT(cfg).double()


def tokens(seed: int, batch: int = GLOBAL_B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, BLOCK + 1), generator=g)


def shards(batch: torch.Tensor) -> list[torch.Tensor]:
    return list(batch.chunk(WORLD, dim=0))


def loss_fn(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def sequence_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """Per-sequence losses (1-D): the mean of the objective is loss_fn's, and the
    critical-sharpness bootstrap has examples to resample."""
    logits = model(batch[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return per_token.view(batch.shape[0], -1).mean(dim=1)


def measure_batch() -> torch.Tensor:
    return tokens(11)


def probe_batch() -> torch.Tensor:
    return tokens(12)


def train_batch(step: int) -> torch.Tensor:
    return tokens(100 + step)


def flat(vectors) -> list[float]:
    return torch.cat([v.detach().reshape(-1) for v in vectors]).tolist()


def params_flat(model) -> list[float]:
    return flat(p for p in model.parameters())


def cs_record(r) -> dict:
    return {
        "sharpness": r.sharpness, "eta": r.eta, "evals": r.evals, "status": r.status,
        "loss0": r.loss0, "bracket": list(r.bracket), "slope": r.slope,
        "probes": [list(p) for p in r.probes],
    }


def eig_record(r) -> dict:
    return {"values": list(r.values), "matvecs": r.matvecs, "converged": r.converged,
            "residuals": list(r.residuals)}


def trace_record(r) -> dict:
    return {"estimate": r.estimate, "stderr": r.stderr, "matvecs": r.matvecs,
            "n_params": r.n_params, "by_parameter": dict(r.by_parameter)}


def global_measurements(model, one, listed, *, extra_options: dict | None = None) -> dict:
    """The measurements on the global objective.

    ``one`` is the batch argument of critical_sharpness/update_direction (the rank's
    shard under DDP, ``[shard0, shard1]`` in a single process); ``listed`` the batches of
    the Hessian routines (``[shard]`` under DDP, ``[shard0, shard1]`` single-process).
    """
    out: dict = {}
    direction = update_direction(model, loss_fn, one)
    out["direction"] = flat(direction)
    for method in METHODS:
        out[f"critical_{method}"] = cs_record(
            critical_sharpness(model, loss_fn, one, direction, method=method)
        )
    # A warm-started second measurement (the monitor's path through the public API).
    first = critical_sharpness(model, loss_fn, one, direction, method="fast")
    out["critical_warm"] = cs_record(
        critical_sharpness(model, loss_fn, one, direction, method="fast", warm_start=first)
    )
    per_example = critical_sharpness(model, sequence_losses, one, direction, method="fast")
    out["critical_per_example"] = {**cs_record(per_example), "stderr": per_example.stderr,
                                   "eta_stderr": per_example.eta_stderr, "descent": per_example.descent}
    out["eigen"] = eig_record(hessian_eigenvalues(model, loss_fn, listed, k=2))
    out["trace"] = trace_record(hessian_trace(model, loss_fn, listed, samples=8))
    # Direction of a fresh AdamW's first step, from the global gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    out["adamw_direction"] = flat(update_direction(model, loss_fn, one, opt))
    return out


def local_measurements(model, shard, **options) -> dict:
    """Measurements on one shard alone (``distributed=False`` under DDP)."""
    direction = update_direction(model, loss_fn, shard, **options)
    return {
        "direction": flat(direction),
        "critical": cs_record(critical_sharpness(model, loss_fn, shard, direction, **options)),
        "eigen": eig_record(hessian_eigenvalues(model, loss_fn, [shard], k=2, **options)),
    }


def train_mode_measurements(model, one) -> dict:
    """Critical sharpness of a model with dropout, measured in train mode (fixed masks)."""
    direction = update_direction(model, loss_fn, one, mode="train")
    return {
        "direction": flat(direction),
        "critical": cs_record(
            critical_sharpness(model, loss_fn, one, direction, method="paper", mode="train")
        ),
    }


def monitored_training(model, batch_of_step, probe) -> list[dict]:
    """A short AdamW loop with a SharpnessMonitor; returns one log row per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    monitor = SharpnessMonitor(model, loss_fn, probe, optimizer, every=EVERY)
    log = []
    for step in range(TRAIN_STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch_of_step(step))
        loss.backward()
        with monitor.around_step(step):
            optimizer.step()
        row = {"step": step, "measured": monitor.latest is not None}
        if monitor.latest is not None:
            row.update(monitor.latest)
            row["status"] = monitor.last.status
        log.append(row)
    return log


# --------------------------------------------------------------------------- the workers


def _worker(rank: int, world: int, workdir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(make_model())
        inner = ddp.module
        shard = shards(measure_batch())[rank]
        out: dict = {"rank": rank}

        before = params_flat(inner)
        out["global"] = global_measurements(ddp, shard, [shard])
        # Explicit options: distributed=True and a process group of its own.
        direction = update_direction(ddp, loss_fn, shard, distributed=True)
        out["explicit_true"] = cs_record(
            critical_sharpness(ddp, loss_fn, shard, direction, method="fast", distributed=True)
        )
        group = dist.new_group(list(range(world)))
        direction = update_direction(ddp, loss_fn, shard, process_group=group)
        out["explicit_group"] = cs_record(
            critical_sharpness(ddp, loss_fn, shard, direction, method="fast", process_group=group)
        )
        out["local"] = local_measurements(ddp, shard, distributed=False)
        out["untouched"] = {
            "params_equal": params_flat(inner) == before,
            "grads_none": all(p.grad is None for p in inner.parameters()),
            "training": inner.training and ddp.training,
        }

        out["dropout"] = train_mode_measurements(DDP(make_model(dropout=0.25)), shard)

        # DDP training on the same (measured) model: gradients are averaged over ranks.
        probe = shards(probe_batch())[rank]
        out["train_log"] = monitored_training(
            ddp, lambda step: shards(train_batch(step))[rank], probe
        )
        out["final_params"] = params_flat(inner)

        write_rank_result(workdir, rank, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(_worker, WORLD)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process results on [shard0, shard1] (and on each shard alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        both = shards(measure_batch())
        out: dict = {"global": global_measurements(model, both, both)}
        out["local"] = [local_measurements(model, s, distributed=False) for s in both]
        out["dropout"] = train_mode_measurements(make_model(dropout=0.25), both)
        trained = make_model()
        out["train_log"] = monitored_training(trained, train_batch, shards(probe_batch()))
        out["final_params"] = params_flat(trained)
        return out
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- comparisons


def assert_cs_matches(got: dict, want: dict, rtol: float = RTOL) -> None:
    _assert_cs_matches(got, want, rtol)


# --------------------------------------------------------------------------- tests: ranks agree


def test_every_rank_reports_identical_results(ranks):
    r0, r1 = ranks
    for key in ("global", "explicit_true", "explicit_group", "dropout", "train_log", "final_params"):
        assert r0[key] == r1[key], key


def test_local_measurements_differ_between_ranks(ranks):
    """Sanity: the shards differ, so a purely local measurement is rank-specific."""
    r0, r1 = ranks
    assert r0["local"]["critical"]["loss0"] != r1["local"]["critical"]["loss0"]
    assert r0["local"]["direction"] != r1["local"]["direction"]


def test_measurements_leave_the_ddp_model_untouched(ranks):
    for r in ranks:
        assert r["untouched"] == {"params_equal": True, "grads_none": True, "training": True}


# --------------------------------------------------------------------------- tests: equal to one process


def test_update_direction_is_the_global_batch_gradient(ranks, reference):
    for r in ranks:
        assert_vectors_close(r["global"]["direction"], reference["global"]["direction"], RTOL)


def test_update_direction_with_optimizer_matches(ranks, reference):
    for r in ranks:
        assert_vectors_close(
            r["global"]["adamw_direction"], reference["global"]["adamw_direction"], RTOL
        )


@pytest.mark.parametrize("method", METHODS)
def test_critical_sharpness_matches_single_process(ranks, reference, method):
    want = reference["global"][f"critical_{method}"]
    assert want["status"] == "ok" and math.isfinite(want["sharpness"]) and want["sharpness"] > 0
    for r in ranks:
        assert_cs_matches(r["global"][f"critical_{method}"], want)


def test_warm_started_critical_sharpness_matches(ranks, reference):
    want = reference["global"]["critical_warm"]
    assert want["status"] == "ok"
    for r in ranks:
        assert_cs_matches(r["global"]["critical_warm"], want)


def test_per_example_stderr_matches_single_process(ranks, reference):
    # Each rank's shard is one stratum of the bootstrap, as each batch of the list is in
    # one process: the example losses are gathered rank-major, so the standard error is
    # the single process's, and the same on every rank.
    want = reference["global"]["critical_per_example"]
    assert math.isfinite(want["stderr"]) and want["stderr"] > 0
    for r in ranks:
        got = r["global"]["critical_per_example"]
        assert_cs_matches(got, want)
        for key in ("stderr", "eta_stderr", "descent"):
            assert close(got[key], want[key], RTOL), key


@pytest.mark.parametrize("key", ["explicit_true", "explicit_group"])
def test_explicit_distributed_options_match_single_process(ranks, reference, key):
    for r in ranks:
        assert_cs_matches(r[key], reference["global"]["critical_fast"])


def test_hessian_eigenvalues_match_single_process(ranks, reference):
    want = reference["global"]["eigen"]
    assert len(want["values"]) == 2 and want["values"][0] >= want["values"][1]
    for r in ranks:
        got = r["global"]["eigen"]
        assert got["matvecs"] == want["matvecs"]
        assert got["converged"] == want["converged"]
        for g, w in zip(got["values"], want["values"], strict=True):
            assert close(g, w, RTOL), (g, w)


def test_hessian_trace_matches_single_process(ranks, reference):
    want = reference["global"]["trace"]
    assert math.isfinite(want["estimate"]) and math.isfinite(want["stderr"])
    for r in ranks:
        got = r["global"]["trace"]
        assert got["matvecs"] == want["matvecs"] == 8
        assert got["n_params"] == want["n_params"]
        assert close(got["estimate"], want["estimate"], RTOL)
        assert close(got["stderr"], want["stderr"], RTOL)
        assert got["by_parameter"].keys() == want["by_parameter"].keys()
        scale = max(abs(v) for v in want["by_parameter"].values())
        for name, w in want["by_parameter"].items():
            assert abs(got["by_parameter"][name] - w) <= RTOL * scale, name


def test_monitor_in_ddp_training_matches_single_process_loop(ranks, reference):
    want = reference["train_log"]
    measured = [row["step"] for row in want if row["measured"]]
    assert measured == list(range(0, TRAIN_STEPS, EVERY))
    for r in ranks:
        got = r["train_log"]
        assert [row["step"] for row in got if row["measured"]] == measured
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            if not w["measured"]:
                continue
            assert g["status"] == w["status"] == "ok"
            assert g["sharpness/evals"] == w["sharpness/evals"]
            for key in ("sharpness/critical", "sharpness/eta_c", "sharpness/lr_over_eta_c"):
                assert close(g[key], w[key], TRAIN_RTOL), (g["step"], key, g[key], w[key])
        assert_vectors_close(r["final_params"], reference["final_params"], TRAIN_RTOL)


# --------------------------------------------------------------------------- tests: distributed=False


def test_distributed_false_measures_the_local_shard_only(ranks, reference):
    for rank, r in enumerate(ranks):
        got, want = r["local"], reference["local"][rank]
        assert_vectors_close(got["direction"], want["direction"], RTOL)
        assert_cs_matches(got["critical"], want["critical"])
        assert got["eigen"]["matvecs"] == want["eigen"]["matvecs"]
        for g, w in zip(got["eigen"]["values"], want["eigen"]["values"], strict=True):
            assert close(g, w, RTOL)
        # ...and it is not the global measurement.
        assert not close(got["critical"]["loss0"], reference["global"]["critical_fast"]["loss0"], 1e-6)


# --------------------------------------------------------------------------- tests: train mode


def test_train_mode_with_dropout_matches_single_process(ranks, reference):
    """mode="train" keeps dropout with masks fixed per batch; the distributed objective
    should still be the single-process objective on [shard0, shard1]."""
    want = reference["dropout"]
    for r in ranks:
        got = r["dropout"]
        assert_vectors_close(got["direction"], want["direction"], RTOL)
        assert_cs_matches(got["critical"], want["critical"])
