"""FSDP2 in `sharpscope train` (``parallel=fsdp``) on CPU: two gloo processes shard the
model (fully_shard per Block, then the root), train on halves of each global batch and log
what one process logs on the whole batch; their checkpoints are full state dicts that load
anywhere.

The AdamW runs happen in ONE spawn of two processes (module-scoped fixture): each worker
joins a gloo group and runs the Trainer in-process (as torchrun would, with the group
already made): an FSDP run with checkpoints at steps 6 and 12 (recording its final
parameters, gathered independently of the checkpoint code); the same run resumed under
FSDP from step 6; and, from a copy of its step-6 checkpoint, the run resumed under DDP.
The SAM run goes through torchrun and the CLI, the way a user launches it. The single-
process references run in the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from support.spawned_ranks import DTensor, requires_fsdp, spawn_ranks, write_rank_result
from sharpscope.cli import main

pytestmark = requires_fsdp

WORLD = 2
# Two sources and the arithmetic one: the evaluation under FSDP includes the gradient
# agreement and greedy decoding, both collective on every rank.
SETTINGS = ["steps=12", "monitor.every=3", "progress=false", "model.preset=nano", "model.block_size=32",
            "data.batch_size=8", "data.sources=arithmetic,code", "data.max_bytes=200000", "eval.every=6",
            "eval.batches=1", "eval.arithmetic_problems=4", "monitor.probe_batch_size=8", "monitor.exact_every=6",
            "monitor.lanczos_iters=6", "monitor.trace_samples=4", "schedule.warmup_steps=2", "checkpoint.every=6",
            "checkpoint.keep=5"]
SAM_SETTINGS = ["steps=8", "monitor.every=3", "progress=false", "model.preset=nano", "model.block_size=32",
                "data.batch_size=8", "data.sources=code", "data.max_bytes=200000", "eval.every=4", "eval.batches=1",
                "monitor.probe_batch_size=8", "schedule.warmup_steps=2", "optim.name=sam", "optim.rho=0.05"]
REL = 1e-5  # FSDP vs one process: the same numbers up to the float reduction order
ROOT_ENV = "SHARPSCOPE_FSDP_TEST_ROOT"


def rows(path: Path) -> list[dict]:
    path = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:08d}"


# --------------------------------------------------------------------------- the workers


def _train(overrides: list[str], out: Path, *, resume: bool = False):
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig
    from sharpscope.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, overrides), out, resume=resume)
    trainer.run()
    return trainer


def _sharding(trainer) -> dict:
    """Whether parameters, gradients and Adam's moments are DTensor shards, and how many
    elements this rank holds of how many."""
    params = trainer._parameters
    state = [trainer.optimizer.state[p]["exp_avg"] for p in params]
    return {
        "dtensors": all(isinstance(t, DTensor) for t in params + [p.grad for p in params] + state),
        "local": sum(p.to_local().numel() for p in params),
        "global": sum(p.numel() for p in params),
    }


def _evaluations_after_an_update(trainer) -> dict:
    """FSDP leaves the root's parameters unsharded after a forward without grad: an
    evaluation, then an update of the shards (as an optimizer step makes), then another
    evaluation must see the update. ``truth`` is evaluated after an explicit reshard."""
    first = trainer.evaluate()["eval/loss"]
    with torch.no_grad():
        for p in trainer._parameters:
            p.mul_(0.5)
    after = trainer.evaluate()["eval/loss"]
    trainer._reshard()
    truth = trainer.evaluate()["eval/loss"]
    return {"first": first, "after": after, "truth": truth}


def _worker(rank: int, world: int, workdir: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    root = Path(os.environ[ROOT_ENV])
    run, ddp_run = root / "fsdp", root / "ddp_from_fsdp"
    fsdp = [*SETTINGS, "parallel=fsdp"]
    trainers = []
    try:
        out: dict = {"rank": rank}
        trainer = _train(fsdp, run)
        trainers.append(trainer)
        out["sharding"] = _sharding(trainer)
        trainer._reshard()
        # The final parameters, each all-gathered from its shards (not through the
        # checkpoint code that the tests check).
        final = {name: p.full_tensor().detach().clone() for name, p in trainer.model.named_parameters()}
        out["forwards_after_an_update"] = _evaluations_after_an_update(trainer)
        if rank == 0:
            torch.save(final, root / "fsdp_final_parameters.pt")
            shutil.copy(run / "metrics.jsonl", root / "fsdp_whole.jsonl")
            # As if killed after step 6's checkpoint (the final one is kept aside).
            shutil.move(checkpoint(run, 12), root / "fsdp_final_checkpoint")
            shutil.copytree(run, ddp_run)
        dist.barrier()
        trainers.append(_train(fsdp, run, resume=True))
        trainers.append(_train([*SETTINGS, "parallel=ddp"], ddp_run, resume=True))
        write_rank_result(workdir, rank, out)
    finally:
        # FSDP's and DDP's models go before their process group (else an abort at exit).
        del trainers[:]
        trainer = None
        import gc

        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp_trainer")


@pytest.fixture(scope="module")
def ranks(root) -> list[dict]:
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv(ROOT_ENV, str(root))
        return spawn_ranks(_worker, WORLD, deadline_s=240.0)


@pytest.fixture(scope="module")
def single(root) -> Path:
    out = root / "single"
    assert main(["train", "--out", str(out), *SETTINGS]) == 0
    return out


def _launch(out: Path, settings: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "sharpscope", "train", "--out", str(out), *settings]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --------------------------------------------------------------------------- comparisons


def assert_rows_close(got: list[dict], want: list[dict], keys: tuple[str, ...], rel: float = REL) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for rg, rw in zip(got, want):
        assert set(rg) == set(rw), (rg["step"], set(rg) ^ set(rw))
        for key in keys:
            if key in rw:
                assert rg[key] == pytest.approx(rw[key], rel=rel), (rw["step"], key, rg[key], rw[key])


TRAIN_KEYS = ("lr", "train/loss", "train/grad_norm")
EVAL_KEYS = ("eval/loss", "eval/code/loss", "eval/arithmetic/loss", "eval/arithmetic/accuracy",
             "grad_cosine/mean", "grad_cosine/arithmetic~code")


# --------------------------------------------------------------------------- tests


def test_fsdp_shards_parameters_grads_and_optimizer_state(ranks):
    for r in ranks:
        s = r["sharding"]
        assert s["dtensors"]
        assert s["local"] < s["global"]  # each rank holds about half
    assert sum(r["sharding"]["local"] for r in ranks) == ranks[0]["sharding"]["global"]


def test_fsdp_evaluation_reads_the_current_shards(ranks):
    for r in ranks:
        e = r["forwards_after_an_update"]
        assert e["after"] != e["first"]  # the update is seen...
        assert e["after"] == e["truth"]  # ...in full, not through stale root parameters
    assert ranks[0]["forwards_after_an_update"] == ranks[1]["forwards_after_an_update"]


def test_fsdp_losses_equal_one_process_on_the_global_batch(ranks, root, single):
    got, want = rows(root / "fsdp_whole.jsonl"), rows(single)
    assert_rows_close(got, want, TRAIN_KEYS + EVAL_KEYS)
    # Evaluation ran on every rank in lockstep, and did not leave stale parameters behind:
    # the steps right after an evaluation (1 and 7) match as well as the others.
    assert any("grad_cosine/mean" in r for r in got) and any("eval/arithmetic/accuracy" in r for r in got)


def test_fsdp_monitor_and_exact_curvature_match_one_process(ranks, root, single):
    got, want = rows(root / "fsdp_whole.jsonl"), rows(single)
    a = [r for r in want if "sharpness/critical" in r]
    b = [r for r in got if "sharpness/critical" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 4, 7, 10]
    for ra, rb in zip(a, b):
        if ra["sharpness/critical"] is not None:
            # The line search takes the same decisions up to float reduction order; each
            # value is within its relative bracket width (rtol 1/16).
            assert rb["sharpness/critical"] == pytest.approx(ra["sharpness/critical"], rel=1 / 16)
    for key in ("sharpness/lambda_max", "sharpness/trace_per_param", "sharpness/preconditioned"):
        exact_a = [r[key] for r in want if key in r]
        exact_b = [r[key] for r in got if key in r]
        assert len(exact_a) == 2 and exact_b == pytest.approx(exact_a, rel=1e-3), key


def test_fsdp_checkpoint_has_the_single_process_layout(ranks, root, single):
    fsdp_ckpt, single_ckpt = root / "fsdp_final_checkpoint", checkpoint(single, 12)
    with safe_open(str(fsdp_ckpt / "model.safetensors"), "pt") as f, \
            safe_open(str(single_ckpt / "model.safetensors"), "pt") as g:
        assert f.metadata() == g.metadata()  # tied weights: one name stored, the other mapped
        assert sorted(f.keys()) == sorted(g.keys())
    a = torch.load(fsdp_ckpt / "optimizer.pt", weights_only=True)
    b = torch.load(single_ckpt / "optimizer.pt", weights_only=True)
    assert a["param_groups"] == b["param_groups"]  # parameters numbered as one process numbers them
    assert list(a["state"]) == sorted(b["state"])
    for i, entry in b["state"].items():
        assert {k: (v.shape, v.dtype) for k, v in a["state"][i].items()} == \
               {k: (v.shape, v.dtype) for k, v in entry.items()}


def test_fsdp_checkpoint_loads_in_one_process_with_the_final_parameters(ranks, root):
    from sharpscope.config import load_config
    from sharpscope.training.checkpoint import load_checkpoint
    from sharpscope.training.config import TrainConfig
    from sharpscope.training.data import ByteTokenizer
    from sharpscope.training.trainer import build_model, build_optimizer

    config = load_config(TrainConfig, None, SETTINGS)
    model = build_model(config.model, ByteTokenizer().vocab_size)
    optimizer = build_optimizer(config.optim, model)
    state = load_checkpoint(root / "fsdp_final_checkpoint", model, optimizer)
    assert state["step"] == 12
    final = torch.load(root / "fsdp_final_parameters.pt", weights_only=True)
    params = dict(model.named_parameters())
    assert params.keys() == final.keys()
    for name, p in params.items():
        assert torch.equal(p.detach(), final[name]), name
    assert len(optimizer.state) == len(params)


def test_fsdp_resume_is_exact(ranks, root):
    run = root / "fsdp"
    assert rows(run) == rows(root / "fsdp_whole.jsonl")
    a = load_file(str(checkpoint(run, 12) / "model.safetensors"))
    b = load_file(str(root / "fsdp_final_checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fsdp_checkpoint_resumes_under_ddp(ranks, root):
    whole, resumed = rows(root / "fsdp_whole.jsonl"), rows(root / "ddp_from_fsdp")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    assert resumed[:7] == whole[:7]  # up to the checkpoint: kept as written
    assert_rows_close(resumed[7:], whole[7:], TRAIN_KEYS + EVAL_KEYS)


def test_fsdp_checkpoint_resumes_in_one_process_and_measures(ranks, root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp", run)
    shutil.rmtree(checkpoint(run, 12))
    assert main(["train", "--out", str(run), *SETTINGS, "--resume"]) == 0
    whole, resumed = rows(root / "fsdp_whole.jsonl"), rows(run)
    assert resumed[:7] == whole[:7]
    assert_rows_close(resumed[7:], whole[7:], TRAIN_KEYS + EVAL_KEYS)
    # `sharpscope measure` reads a checkpoint written under FSDP.
    assert main(["measure", str(checkpoint(root / "fsdp", 6)), "--data", "code", "--batch-size", "2",
                 "--lanczos-iters", "3", "--trace-samples", "2", "--json"]) == 0


def test_sam_under_fsdp_matches_one_process(tmp_path):
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    assert main(["train", "--out", str(single), *SAM_SETTINGS]) == 0
    proc = _launch(fsdp, [*SAM_SETTINGS, "parallel=fsdp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = rows(fsdp), rows(single)
    # Every pass reduces its gradient under FSDP, so the perturbation follows the global
    # batch's gradient, as in one process (under DDP each rank's own).
    assert_rows_close(got, want, TRAIN_KEYS + ("eval/loss", "optim/loss_perturbed", "optim/grad_norm_clean"))
    increases = [(rg["optim/loss_increase"], rw["optim/loss_increase"]) for rg, rw in zip(got, want)
                 if "optim/loss_increase" in rw]
    assert len(increases) == 8
    for g, w in increases:  # a difference of two losses: the losses' rounding, absolutely
        assert g == pytest.approx(w, abs=1e-5)
    a = [r["sharpness/critical"] for r in want if "sharpness/critical" in r]
    b = [r["sharpness/critical"] for r in got if "sharpness/critical" in r]
    assert len(a) == 3 and b == pytest.approx(a, rel=1 / 16)


def test_bogus_parallel_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *SAM_SETTINGS, "parallel=bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "parallel" in err and "ddp" in err and "fsdp" in err and "bogus" in err
    assert not (tmp_path / "run").exists()
