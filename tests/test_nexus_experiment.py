"""Nexus diagnostics: per-source minima distance from a checkpoint, the AdamW-vs-Nexus study
at matched loss (resumable, nexus.json, figures) and its report section, on tiny CPU runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sharpscope.config import from_dict, load_config
from sharpscope.errors import UserError
from sharpscope.experiments.minima import minima_distance, pair_name
from sharpscope.experiments.nexus import NexusStudyConfig, run_nexus_study
from sharpscope.report.nexus_figures import write_nexus_figures
from sharpscope.report.nexus_section import render
from sharpscope.training import data as data_lib
from sharpscope.training.checkpoint import list_checkpoints, load_checkpoint
from sharpscope.training.config import TrainConfig
from sharpscope.training.trainer import build_model, lm_loss

TRAIN = ["model.block_size=32", "data.batch_size=4", "data.max_bytes=200000", "eval.batches=1",
         "eval.arithmetic_problems=0", "monitor.every=0"]
NEXUS = ["enabled=true", "size=nano", "steps=30", "eval_points=5", "inner_steps=2", "finetune_steps=6",
         "finetune_lr=1e-3", "segment_points=3"]
SOURCES = ["arithmetic", "code", "prose"]
PNG = b"\x89PNG\r\n\x1a\n"


def configs(*extra: str) -> tuple[NexusStudyConfig, TrainConfig]:
    return load_config(NexusStudyConfig, None, [*NEXUS, *extra]), load_config(TrainConfig, None, TRAIN)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg, train = configs()
    result = run_nexus_study(cfg, out, train, log=None, draw=write_nexus_figures)
    return out, result


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def theta0_of(checkpoint: Path):
    """(θ_0 by name, the model holding it, the run's train config as a dict)."""
    run_config = json.loads((checkpoint.parent.parent / "config.json").read_text())["train"]
    model = build_model(from_dict(TrainConfig, run_config).model, 256)
    load_checkpoint(checkpoint, model, None)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, model, run_config


def norm_of_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([(a[n] - b[n]).double().reshape(-1) for n in a])))


# --- the study ------------------------------------------------------------------------

def test_both_runs_trained_with_checkpoints_at_every_evaluation(study):
    out, result = study
    assert result.ran == ["adamw", "nexus"] and not result.resumed and not result.skipped
    for name in ("adamw", "nexus"):
        run = out / "nexus" / name
        config = json.loads((run / "config.json").read_text())
        assert config["optimizer"] == name and config["sources"] == ["code", "prose", "arithmetic"]
        evaluated = [r["step"] for r in rows(run) if "eval/loss" in r]
        assert evaluated == [0, 6, 12, 18, 24, 30]
        assert [int(p.name[4:]) for p in list_checkpoints(run)] == evaluated[1:]
        assert all("grad_cosine/mean" in r for r in rows(run) if "eval/loss" in r)
    a, n = (json.loads((out / "nexus" / x / "config.json").read_text())["train"] for x in ("adamw", "nexus"))
    assert {k for k in a if a[k] != n[k]} == {"name", "optim"}  # same model, data, budget and seed


def test_matched_loss_rule(study):
    out, result = study
    record = json.loads((out / "nexus" / "nexus.json").read_text())
    assert record == result.record
    for key in ("settings", "rule", "target_loss", "final_loss", "runs", "summary", "figures"):
        assert key in record, key
    evals = {name: [r for r in rows(out / "nexus" / name) if "eval/loss" in r] for name in ("adamw", "nexus")}
    finals = {name: e[-1]["eval/loss"] for name, e in evals.items()}
    assert record["final_loss"] == finals
    target = max(finals.values())
    assert record["target_loss"] == target
    for name, e in evals.items():
        earliest = next(r for r in e if r["step"] > 0 and r["eval/loss"] <= target)
        run = record["runs"][name]
        assert run["checkpoint_step"] == earliest["step"] and run["checkpoint_loss"] == earliest["eval/loss"]
        assert run["checkpoint"] == f"{name}/checkpoints/step{earliest['step']:08d}"
        assert (out / "nexus" / run["checkpoint"]).is_dir()
        minima = run["minima"]
        assert minima["step"] == earliest["step"] and minima["sources"] == SOURCES
        assert set(minima["distance"]) == {"arithmetic~code", "arithmetic~prose", "code~prose"}
        # θ_0's losses are the run's own evaluation at that step, to the bit
        for source in ("code", "prose", "arithmetic"):
            assert minima["losses"]["theta0"][source] == earliest[f"eval/{source}/loss"]
        assert minima["losses"]["theta0"]["mean"] == pytest.approx(earliest["eval/loss"], rel=1e-15)
    worse = max(finals, key=finals.get)
    assert record["runs"][worse]["checkpoint_step"] == 30


def test_gradient_cosine_over_training_is_read_from_both_runs(study):
    out, result = study
    for name, run in result.record["runs"].items():
        logged = [r for r in rows(out / "nexus" / name) if "grad_cosine/mean" in r]
        series = run["grad_cosine"]
        assert series["step"] == [r["step"] for r in logged]
        for key in ("mean", "arithmetic~code", "arithmetic~prose", "code~prose"):
            assert series[key] == [r[f"grad_cosine/{key}"] for r in logged]
        early = [r["grad_cosine/mean"] for r in logged if 0 < r["step"] / 30 <= 1 / 3]
        late = [r["grad_cosine/mean"] for r in logged if r["step"] / 30 > 2 / 3]
        assert run["grad_cosine_early"] == pytest.approx(sum(early) / len(early))
        assert run["grad_cosine_late"] == pytest.approx(sum(late) / len(late))
    assert "inner_cosine_early" in result.record["runs"]["nexus"]


def test_figures_are_non_empty_pngs(study):
    out, result = study
    assert set(result.record["figures"]) == {"grad_cosine", "segments", "distances"}
    for relative in result.record["figures"].values():
        data = (out / "nexus" / relative).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_rerun_skips_finished_runs_and_reuses_the_record(study):
    out, _ = study
    before = file_digests(out / "nexus")
    cfg, train = configs()
    again = run_nexus_study(cfg, out, train, log=None, draw=write_nexus_figures)
    assert again.skipped == ["adamw", "nexus"] and not again.ran and not again.resumed and again.reused
    assert file_digests(out / "nexus") == before


def test_partial_run_is_resumed_exactly(study, tmp_path):
    out, result = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    nexus_run = copy / "nexus" / "nexus"
    shutil.rmtree(list_checkpoints(nexus_run)[-1])  # as if killed between the last two checkpoints
    cfg, train = configs()
    again = run_nexus_study(cfg, copy, train, log=None, draw=write_nexus_figures)
    assert again.resumed == ["nexus"] and again.skipped == ["adamw"] and not again.reused
    assert rows(nexus_run) == rows(out / "nexus" / "nexus")
    assert again.record["runs"]["nexus"]["minima"] == result.record["runs"]["nexus"]["minima"]


def test_run_with_other_settings_is_refused(study, tmp_path):
    out, _ = study
    copy = tmp_path / "study"
    shutil.copytree(out / "nexus" / "adamw", copy / "nexus" / "adamw")
    cfg, train = configs("inner_lr=0.02")  # the AdamW run's config records the Nexus settings too
    with pytest.raises(UserError, match="other settings"):
        run_nexus_study(cfg, copy, train, log=None, draw=write_nexus_figures)
    with pytest.raises(UserError, match="two distinct sources"):
        run_nexus_study(configs('sources=["code"]')[0], tmp_path / "x", train, log=None, draw=write_nexus_figures)


# --- minima_distance ------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(study):
    out, _ = study
    checkpoint = list_checkpoints(out / "nexus" / "adamw")[2]  # step 18
    before = file_digests(checkpoint.parent.parent)
    kwargs = dict(steps=5, lr=1e-3, batch_size=3, segment_points=4, seed=3, keep_states=True)
    first = minima_distance(checkpoint, ["code", "arithmetic", "prose"], **kwargs)
    second = minima_distance(checkpoint, None, **kwargs)
    after = file_digests(checkpoint.parent.parent)
    return checkpoint, first, second, before, after


def test_checkpoint_and_run_are_untouched(measured):
    _, _, _, before, after = measured
    assert before == after


def test_minima_distance_is_deterministic(measured):
    _, first, second, _, _ = measured
    assert first.as_dict() == second.as_dict()
    for source in first.states:
        for name, tensor in first.states[source].items():
            assert torch.equal(tensor, second.states[source][name])


def test_distances_are_the_norms_of_the_parameter_differences(measured):
    checkpoint, result, _, _, _ = measured
    theta0, _, _ = theta0_of(checkpoint)
    states = result.states
    assert set(states) == set(SOURCES) and set(states["code"]) == set(theta0)
    zero = {n: torch.zeros_like(t) for n, t in theta0.items()}
    assert result.theta0_norm == pytest.approx(norm_of_difference(theta0, zero), rel=1e-12)
    for source in SOURCES:
        expected = norm_of_difference(states[source], theta0)
        assert expected > 0
        assert result.displacement[source] == pytest.approx(expected, rel=1e-12)
        assert result.relative_displacement[source] == pytest.approx(expected / result.theta0_norm, rel=1e-12)
    for a, b in [("arithmetic", "code"), ("arithmetic", "prose"), ("code", "prose")]:
        key = pair_name(b, a)
        assert key == f"{a}~{b}"
        expected = norm_of_difference(states[a], states[b])
        assert result.distance[key] == pytest.approx(expected, rel=1e-12)
        da = torch.cat([(states[a][n] - theta0[n]).double().reshape(-1) for n in theta0])
        db = torch.cat([(states[b][n] - theta0[n]).double().reshape(-1) for n in theta0])
        assert result.displacement_cosine[key] == pytest.approx(float(da @ db / (da.norm() * db.norm())), rel=1e-9)


def test_fine_tune_is_plain_adamw_on_the_source_alone(measured):
    """The same fine-tune written out here: fresh AdamW, constant lr, no decay, batches
    source_batch(s, k) of a sampler seeded with ``seed``."""
    checkpoint, result, _, _, _ = measured
    _, model, run_config = theta0_of(checkpoint)
    sources = data_lib.load_sources(run_config["data"]["sources"], max_bytes=run_config["data"]["max_bytes"], seed=0)
    sampler = data_lib.BatchSampler(sources, batch_size=3, block_size=32, seed=3, split="train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    model.train()
    losses = []
    for k in range(5):
        optimizer.zero_grad()
        loss = lm_loss(model, sampler.source_batch("prose", k))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses == result.finetune_loss["prose"]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), result.states["prose"][name]), name


def test_segment_ends_are_the_fine_tuned_models_losses(measured):
    checkpoint, result, _, _, _ = measured
    _, model, run_config = theta0_of(checkpoint)
    sources = data_lib.load_sources(run_config["data"]["sources"], max_bytes=run_config["data"]["max_bytes"], seed=0)
    val = data_lib.validation_batches(sources, batch_size=4, block_size=32, n_batches=1, seed=0)
    model.eval()

    def losses_of(state):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
            return {s: float(lm_loss(model, batches[0])) for s, batches in val.items()}

    assert result.tau == [0.0, 1 / 3, 2 / 3, 1.0]
    for key, curves in result.segments.items():
        a, b = key.split("~")
        at_a, at_b = losses_of(result.states[a]), losses_of(result.states[b])
        for source in SOURCES:
            assert curves[source][0] == at_a[source] and curves[source][-1] == at_b[source]
            assert result.losses[a][source] == at_a[source]
        mean = curves["mean"]
        assert mean[0] == pytest.approx(sum(at_a.values()) / 3, rel=1e-12)
        assert result.barrier[key]["mean"] == pytest.approx(max(mean) - (mean[0] + mean[-1]) / 2, rel=1e-12)
        assert result.barrier_linear[key]["mean"] >= 0  # τ = 0 is on the chord


def test_minima_distance_errors(measured):
    checkpoint = measured[0]
    with pytest.raises(UserError, match="not in the run"):
        minima_distance(checkpoint, ["poetry"], steps=1, lr=1e-3, batch_size=2, segment_points=2, seed=0)
    with pytest.raises(UserError, match="segment_points"):
        minima_distance(checkpoint, None, steps=1, lr=1e-3, batch_size=2, segment_points=1, seed=0)


# --- report section -------------------------------------------------------------------

def test_render_without_and_with_the_diagnostics(study, tmp_path):
    out, result = study
    assert render(tmp_path / "empty", tmp_path / "report") is None
    body, figures = render(out, tmp_path / "report")
    assert set(figures) == {"nexus_grad_cosine", "nexus_segments", "nexus_distances"}
    for name, path in figures.items():
        assert path.parent == tmp_path / "report" / "figures"
        assert path.read_bytes().startswith(PNG)
        assert f"id='fig-{name}'" in body
    record = result.record
    assert "Matched loss" in body and f"step {record['runs']['adamw']['checkpoint_step']}" in body
    assert f"step {record['runs']['nexus']['checkpoint_step']}" in body
    assert "arithmetic vs code" in body and "grad cosine early" in body and "<table>" in body
