"""sharpscope.curvature on a model sharded with FSDP2 (fully_shard; 2 CPU processes, gloo).

The requirement: with parameters held as DTensor shards, every rank takes part, the
measurements equal the single-process measurements on the same global batch, and the
model, its gradients and the optimizer state are left bit-identical.

All distributed work runs in ONE spawn of two processes (module-scoped fixture): each
worker builds the same tiny float64 GPT, applies fully_shard to every block and to the
root, runs the measurements and a short monitored AdamW loop, and writes plain floats,
lists and flags to ``rank{r}.json``. The single-process reference runs the same code on
the unsharded model with the shards as a list of batches ``[shard0, shard1]`` (equal
shard sizes make their mean loss the global-batch loss). Tests compare:

* rank 0 vs rank 1: equal (every rank takes the same decisions);
* ranks vs single process: status and evaluation counts exactly, values to 1e-9
  relative (float64), 1e-6 after a few optimizer steps;
* each rank's local shards of parameters, grads and AdamW state before and after the
  measurements (including two that fail inside a forward): bit-identical, and a
  monitored FSDP training run ends bit-identical to an unmonitored one.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from support.spawned_ranks import (DTensor, assert_cs_matches as _assert_cs_matches, assert_vectors_close, close, fully_shard,
                           requires_fsdp, spawn_ranks, write_rank_result)
from sharpscope.curvature import (
    DirectionCapture,
    SharpnessMonitor,
    critical_sharpness,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    preconditioned_sharpness,
    sharpness_gradient_decomposition,
    update_direction,
)
from sharpscope.training.model import GPT, GPTConfig

pytestmark = requires_fsdp

WORLD = 2
VOCAB, BLOCK = 63, 16  # 63: the embedding splits unevenly over 2 ranks (32 + 31 rows)
GLOBAL_B = 8  # shards of 4 sequences per rank
METHODS = ("fast", "paper")
TRAIN_STEPS, LR, WD = 3, 1e-2, 0.1
RTOL = 1e-9  # float64 measurements: ranks vs single process
TRAIN_RTOL = 1e-6  # after a few optimizer steps


# --------------------------------------------------------------------------- shared setup
# Everything below is used identically by the workers and by the single-process reference.


def make_model() -> GPT:
    torch.manual_seed(1234)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, d_model=32)
    return GPT(cfg).double()


def make_sharded_model(mesh) -> GPT:
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tokens(seed: int, batch: int = GLOBAL_B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, BLOCK + 1), generator=g)


def shards(batch: torch.Tensor) -> list[torch.Tensor]:
    return list(batch.chunk(WORLD, dim=0))


def forward_fn(model, batch: torch.Tensor) -> torch.Tensor:
    return model(batch[:, :-1])


def loss_fn(model, batch: torch.Tensor) -> torch.Tensor:
    logits = forward_fn(model, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def lm_outputs_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def whole(t: torch.Tensor) -> torch.Tensor:
    """The global tensor (an all-gather for a DTensor: every rank must call it)."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def flat(vectors) -> list[float]:
    return torch.cat([whole(v.detach()).reshape(-1) for v in vectors]).tolist()


def cs_record(r) -> dict:
    return {
        "sharpness": r.sharpness, "eta": r.eta, "evals": r.evals, "status": r.status,
        "loss0": r.loss0, "slope": r.slope, "probes": [list(p) for p in r.probes],
    }


def train_step(model, optimizer, one, capture=None) -> None:
    """One AdamW step on the global batch: under FSDP ``one`` is this rank's shard (FSDP
    averages the gradients over ranks); single-process it is [shard0, shard1]."""
    optimizer.zero_grad(set_to_none=True)
    batches = one if isinstance(one, list) else [one]
    loss = sum(loss_fn(model, b) for b in batches) / len(batches)
    loss.backward()
    if capture is None:
        optimizer.step()
    else:
        with capture:
            optimizer.step()


def measurements(model, one, listed) -> dict:
    """Every measurement on the global objective; ``one`` and ``listed`` as in
    test_curvature_distributed (this rank's shard under FSDP, [shard0, shard1] else)."""
    out: dict = {}
    direction = update_direction(model, loss_fn, one)
    out["direction"] = flat(direction)
    for method in METHODS:
        out[f"grad_{method}"] = cs_record(
            critical_sharpness(model, loss_fn, one, direction, method=method)
        )
    # A whole (unsharded) direction, the same on every rank, is accepted as well.
    whole_direction = [whole(d).clone() for d in direction]
    out["grad_whole"] = cs_record(critical_sharpness(model, loss_fn, one, whole_direction))
    # tol 1e-3 (not 1e-5) keeps the test fast: 20 products instead of 29, every one of
    # them an all-gather of v and an all-reduce of H·v.
    eig = hessian_eigenvalues(model, loss_fn, listed, k=2, tol=1e-3)
    out["eigen"] = {"values": eig.values, "matvecs": eig.matvecs, "converged": eig.converged}
    # The double-backward product (a fresh forward per product): a few products suffice.
    eig = hessian_eigenvalues(model, loss_fn, listed, k=1, product="double", max_iter=6)
    out["eigen_double"] = {"values": eig.values, "matvecs": eig.matvecs}
    # One forward-over-reverse product, along a whole vector given the same on every rank.
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    out["hv_jvp"] = flat(hessian_vector_product(model, loss_fn, listed, v, method="jvp"))
    tr = hessian_trace(model, loss_fn, listed, samples=8)
    out["trace"] = {"estimate": tr.estimate, "stderr": tr.stderr, "matvecs": tr.matvecs,
                    "n_params": tr.n_params, "by_parameter": tr.by_parameter}
    dec = sharpness_gradient_decomposition(model, forward_fn, listed, output_loss_fn=lm_outputs_loss)
    out["decomposition"] = [dec.tau_logit, dec.tau_func, dec.tau_cross, dec.curvature]

    # An AdamW step's direction, captured around a real step, measured at the new θ.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    capture = DirectionCapture(model, optimizer=optimizer)
    train_step(model, optimizer, one, capture)
    out["adamw_direction"] = flat(capture.direction)
    for method in METHODS:
        out[f"adamw_{method}"] = cs_record(
            critical_sharpness(model, loss_fn, one, capture.direction, method=method)
        )
    # The direction AdamW would take next (a step taken and undone).
    out["adamw_next"] = flat(update_direction(model, loss_fn, one, optimizer))
    pre = preconditioned_sharpness(model, loss_fn, listed, optimizer, tol=1e-3)
    out["preconditioned"] = {"value": pre.value, "matvecs": pre.matvecs}
    return out


def monitored_training(model, one, probe) -> list[dict]:
    """A short AdamW loop with a SharpnessMonitor measuring every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    monitor = SharpnessMonitor(model, loss_fn, probe, optimizer, every=1)
    log = []
    for step in range(TRAIN_STEPS):
        optimizer.zero_grad(set_to_none=True)
        batches = one(step)
        batches = batches if isinstance(batches, list) else [batches]
        (sum(loss_fn(model, b) for b in batches) / len(batches)).backward()
        with monitor.around_step(step):
            optimizer.step()
        log.append({**monitor.latest, "status": monitor.last.status})
    return log


def train_batch(step: int) -> torch.Tensor:
    return tokens(100 + step)


# --------------------------------------------------------------------------- the workers


def local_state(model, optimizer) -> list[torch.Tensor]:
    """This rank's shards of the parameters, their grads and the optimizer state."""
    out = [p.detach().to_local().clone() for p in model.parameters()]
    out += [p.grad.to_local().clone() for p in model.parameters()]
    for p in model.parameters():
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor):
                out.append((value.to_local() if isinstance(value, DTensor) else value).clone())
    return out


def untouched_checks(mesh, rank: int) -> dict:
    """Measure a sharded model mid-training; compare its local state bit for bit."""
    model = make_sharded_model(mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    shard = shards(tokens(11))[rank]
    train_step(model, optimizer, shard)
    optimizer.zero_grad(set_to_none=False)
    loss_fn(model, shard).backward()  # grads present during the measurements
    grads = [p.grad for p in model.parameters()]
    before = local_state(model, optimizer)
    direction = update_direction(model, loss_fn, shard, optimizer)
    for method in METHODS:
        critical_sharpness(model, loss_fn, shard, direction, method=method)
    hessian_eigenvalues(model, loss_fn, [shard], k=1, max_iter=5)
    hessian_trace(model, loss_fn, [shard], samples=2)
    raised = False
    try:
        critical_sharpness(model, loss_fn, shard, direction, distributed=False)
    except ValueError:
        raised = True
    first = cs_record(critical_sharpness(model, loss_fn, shard, direction))
    # An error in the middle of a forward (a block's hook, after FSDP has all-gathered
    # the block), in a probe and while an operator is built: every rank raises at the
    # same point, and the model must come back intact and measure as before.
    calls = {"n": 0}

    def fail_in_forward(module, args):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("injected")

    handle = model.blocks[1].register_forward_pre_hook(fail_in_forward)
    errors = 0
    for measure in (
        lambda: critical_sharpness(model, loss_fn, shard, direction),
        lambda: hessian_eigenvalues(model, loss_fn, [shard], k=1, max_iter=5, product="double"),
    ):
        calls["n"] = 0
        try:
            measure()
        except RuntimeError:
            errors += 1
    handle.remove()
    again = cs_record(critical_sharpness(model, loss_fn, shard, direction))
    after = local_state(model, optimizer)
    return {
        "state_equal": len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)),
        "n_tensors": len(before),
        "same_grad_objects": all(p.grad is g for p, g in zip(model.parameters(), grads)),
        "sharded_after": all(isinstance(p, DTensor) for p in model.parameters()),
        "training": model.training,
        "distributed_false_raises": raised,
        "injected_errors_raised": errors,
        "measures_as_before_after_errors": again == first,
    }


def monitor_does_not_perturb(mesh, rank: int) -> bool:
    """A monitored FSDP run and an unmonitored one end with bit-identical shards."""
    finals = []
    for monitored in (False, True):
        model = make_sharded_model(mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        monitor = SharpnessMonitor(model, loss_fn, shards(tokens(12))[rank], optimizer, every=1)
        for step in range(TRAIN_STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, shards(train_batch(step))[rank]).backward()
            if monitored:
                with monitor.around_step(step):
                    optimizer.step()
            else:
                optimizer.step()
        finals.append(local_state(model, optimizer))
    return all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def vector_checks(mesh) -> dict:
    """The parameter-space reductions on a mixed vector: rows sharded unevenly (3 + 2 and
    1 + 0 rows), replicated, and whole tensors, against the same sums on whole tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sharpscope.tensors import fsdp
    from sharpscope.tensors import vectors as vec

    g = torch.Generator().manual_seed(3)
    wholes = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((5, 3), (1, 4), (7,), (4, 2))]
    placements = [[Shard(0)], [Shard(0)], [Replicate()], None]

    def lay_out(tensors):
        return [t if pl is None else distribute_tensor(t, mesh, pl, src_data_rank=None)
                for t, pl in zip(tensors, placements)]

    laid = lay_out(wholes)
    other = lay_out([2.0 * t + 1.0 for t in wholes])
    with_nan = [t.clone() for t in wholes]
    with_nan[0][4, 1] = math.nan  # in rank 1's shard only
    gathered = fsdp.FullParameters(laid, wholes).gather(laid)
    return {
        "dots": [vec.dot(laid, other), vec.dot(wholes, [2.0 * t + 1.0 for t in wholes])],
        "per_tensor": [vec.dots(laid, other), vec.dots(wholes, [2.0 * t + 1.0 for t in wholes])],
        "dots_with": [vec.dots_with([laid, other], laid),
                      vec.dots_with([wholes, [2.0 * t + 1.0 for t in wholes]], wholes)],
        "finite": [vec.is_finite(laid), vec.is_finite(lay_out(with_nan))],
        "gather_exact": all(torch.equal(a, b) for a, b in zip(gathered, wholes, strict=True)),
    }


def _worker(rank: int, world: int, workdir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        out: dict = {"rank": rank}
        model = make_sharded_model(mesh)
        out["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        out["vectors"] = vector_checks(mesh)
        out["embedding_rows"] = model.tok_emb.weight.to_local().shape[0]
        shard = shards(tokens(11))[rank]
        out["global"] = measurements(model, shard, [shard])
        out["train_log"] = monitored_training(
            make_sharded_model(mesh), lambda step: shards(train_batch(step))[rank],
            shards(tokens(12))[rank],
        )
        out["untouched"] = untouched_checks(mesh, rank)
        out["monitor_does_not_perturb"] = monitor_does_not_perturb(mesh, rank)
        write_rank_result(workdir, rank, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(_worker, WORLD)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process results on [shard0, shard1] with the unsharded model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        both = shards(tokens(11))
        out: dict = {"global": measurements(make_model(), both, both)}
        out["train_log"] = monitored_training(
            make_model(), lambda step: shards(train_batch(step)), shards(tokens(12))
        )
        return out
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- comparisons


def assert_cs_matches(got: dict, want: dict, rtol: float = RTOL) -> None:
    _assert_cs_matches(got, want, rtol)


# --------------------------------------------------------------------------- tests


def test_fsdp_ranks_agree_and_parameters_are_sharded(ranks):
    r0, r1 = ranks
    assert r0["sharded"] and r1["sharded"]
    assert (r0["embedding_rows"], r1["embedding_rows"]) == (32, 31)  # uneven shards
    for key in ("vectors", "global", "train_log", "untouched", "monitor_does_not_perturb"):
        assert r0[key] == r1[key], key


def test_fsdp_vector_reductions_count_each_entry_once(ranks):
    """Sharded parts are summed over ranks, replicated and whole ones counted once."""
    for r in ranks:
        v = r["vectors"]
        got, want = v["dots"]
        assert close(got, want, 1e-12)
        for g, w in zip(*v["per_tensor"], strict=True):
            assert close(g, w, 1e-12)
        for g, w in zip(*v["dots_with"], strict=True):
            assert close(g, w, 1e-12)
        assert v["finite"] == [True, False]  # a NaN in one rank's shard stops every rank
        assert v["gather_exact"]


def test_fsdp_gradient_direction_is_the_global_batch_gradient(ranks, reference):
    for r in ranks:
        assert_vectors_close(r["global"]["direction"], reference["global"]["direction"], RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_critical_sharpness_along_gradient_matches_single_process(ranks, reference, method):
    want = reference["global"][f"grad_{method}"]
    assert want["status"] == "ok" and want["sharpness"] > 0
    for r in ranks:
        assert_cs_matches(r["global"][f"grad_{method}"], want)


def test_fsdp_accepts_a_whole_direction(ranks, reference):
    for r in ranks:
        assert_cs_matches(r["global"]["grad_whole"], reference["global"]["grad_fast"])


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_critical_sharpness_along_captured_adamw_step_matches(ranks, reference, method):
    want = reference["global"][f"adamw_{method}"]
    assert want["status"] == "ok"
    for r in ranks:
        assert_vectors_close(r["global"]["adamw_direction"], reference["global"]["adamw_direction"], RTOL)
        assert_cs_matches(r["global"][f"adamw_{method}"], want)
        assert_vectors_close(r["global"]["adamw_next"], reference["global"]["adamw_next"], RTOL)


def test_fsdp_hessian_eigenvalues_and_trace_match_single_process(ranks, reference):
    want = reference["global"]
    for r in ranks:
        got = r["global"]
        for key in ("eigen", "eigen_double"):
            assert got[key]["matvecs"] == want[key]["matvecs"], key
            for g, w in zip(got[key]["values"], want[key]["values"], strict=True):
                assert close(g, w, RTOL), (key, g, w)
        assert got["eigen"]["converged"] and want["eigen"]["converged"]
        t_got, t_want = got["trace"], want["trace"]
        assert t_got["matvecs"] == t_want["matvecs"] == 8
        assert t_got["n_params"] == t_want["n_params"]
        assert close(t_got["estimate"], t_want["estimate"], RTOL)
        assert close(t_got["stderr"], t_want["stderr"], RTOL)
        scale = max(abs(v) for v in t_want["by_parameter"].values())
        assert t_got["by_parameter"].keys() == t_want["by_parameter"].keys()
        for name, w in t_want["by_parameter"].items():
            assert abs(t_got["by_parameter"][name] - w) <= RTOL * scale, name


def test_fsdp_forward_over_reverse_product_matches(ranks, reference):
    for r in ranks:
        assert_vectors_close(r["global"]["hv_jvp"], reference["global"]["hv_jvp"], RTOL)


def test_fsdp_ggn_decomposition_and_preconditioned_sharpness_match(ranks, reference):
    want = reference["global"]
    for r in ranks:
        got = r["global"]
        for g, w in zip(got["decomposition"], want["decomposition"], strict=True):
            assert abs(g - w) <= 1e-9 * max(1.0, abs(w)), (g, w)
        assert got["preconditioned"]["matvecs"] == want["preconditioned"]["matvecs"]
        assert close(got["preconditioned"]["value"], want["preconditioned"]["value"], RTOL)


def test_fsdp_monitored_training_matches_single_process(ranks, reference):
    want = reference["train_log"]
    # On this probe batch the first Adam steps are far past their critical lr, and one is
    # not even a descent direction: the outcomes must match, whatever they are.
    assert any(row["status"] == "ok" for row in want)
    for r in ranks:
        for g, w in zip(r["train_log"], want, strict=True):
            assert g["status"] == w["status"]
            assert g["sharpness/evals"] == w["sharpness/evals"]
            for key in ("sharpness/critical", "sharpness/eta_c", "sharpness/lr_over_eta_c"):
                assert close(g[key], w[key], TRAIN_RTOL), (key, g[key], w[key])


def test_fsdp_measurements_leave_shards_grads_and_optimizer_state_bit_identical(ranks):
    for r in ranks:
        u = r["untouched"]
        assert u["n_tensors"] > 0
        assert u == {
            "state_equal": True, "n_tensors": u["n_tensors"], "same_grad_objects": True,
            "sharded_after": True, "training": True, "distributed_false_raises": True,
            "injected_errors_raised": 2, "measures_as_before_after_errors": True,
        }
        assert r["monitor_does_not_perturb"]
