"""`sharpscope analyze` on any run or folder of runs, written by real producers: tiny runs of
our own trainer and a tiny GPT-2 trained by the Hugging Face Trainer with the sharpscope
callback. One run, two sizes: a report with per-run figures and one line saying why no
fit across sizes; three sizes under one label: the fit across them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from support.cli_helpers import run_err, run_ok
from sharpscope.cli import main
from sharpscope.runs import read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SKIP = "fits skipped"

# Tiny trainer runs: one λ_c measurement per step so the three-phase detector has 12 points
# to read, and λ_max, trace and preconditioned sharpness twice (cheap settings: their values
# are not under test here); code only, so the evaluation is one batch and no arithmetic.
TINY = ["--steps", "12", "--monitor-every", "1", "progress=false", "model.preset=nano", "model.block_size=32",
        "data.batch_size=4", "data.sources=code", "data.max_bytes=60000", "eval.every=0", "eval.batches=1",
        "monitor.probe_batch_size=4", "schedule.warmup_steps=3", "monitor.exact_every=6",
        "monitor.lanczos_iters=4", "monitor.trace_samples=2"]
WIDTHS = (16, 24, 32)


def rows(report: Path, table: str) -> list[dict]:
    with open(report / "tables" / f"{table}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def copy_run(src: Path, dst: Path, **config) -> Path:
    """A copy of a real run (no checkpoints) with config keys replaced: a relabelled run."""
    dst.mkdir(parents=True)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def assert_figures(report: Path, names: set[str]) -> None:
    html = (report / "report.html").read_text(encoding="utf-8")
    for name in names:
        path = report / "figures" / f"{name}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000, name
        assert f"id='fig-{name}'" in html, name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[int, Path]:
    """Three real runs of our trainer at three widths (about 8K, 14K, 22K parameters)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for width in WIDTHS:
        out[width] = root / f"nano{width}"
        assert main(["train", "--out", str(out[width]), *TINY, f"model.d_model={width}", f"name=nano{width}"]) == 0
    return out


@pytest.fixture(scope="module")
def callback_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny GPT-2 trained by the Hugging Face Trainer with two sharpscope callbacks: one
    measuring normally, one with a budget of a single loss evaluation, so that every one of
    its measurements fails (max_evals) - a real run whose λ_c is null throughout."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    from sharpscope.integrations.hf import SharpnessCallback

    vocab, block = 64, 16

    def counting(n: int, seed: int) -> torch.Tensor:
        # sequences that count up from a random start: learnable, so the update is a descent
        # direction on a probe batch of the same kind and λ_c has a value
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        return (start + torch.arange(block)) % vocab

    class Tokens(Dataset):
        def __init__(self):
            self.ids = counting(64, 0)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    root = tmp_path_factory.mktemp("hf")
    probe = {"input_ids": counting(8, 1), "labels": counting(8, 1)}
    measured = SharpnessCallback(probe, every=1, run_dir=root / "gpt2-tiny", name="gpt2-tiny")
    failing = SharpnessCallback(probe, every=2, run_dir=root / "gpt2-failing", name="gpt2-failing", max_evals=1)
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=block, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(
        output_dir=str(root / "hf"), max_steps=8, per_device_train_batch_size=8, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", learning_rate=1e-3, disable_tqdm=True, seed=0)
    transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(),
                         callbacks=[measured, failing]).train()
    return root / "gpt2-tiny", root / "gpt2-failing"


# --- one run --------------------------------------------------------------------------

def test_one_callback_run(capsys, callback_runs, tmp_path):
    run_dir, _ = callback_runs
    _, lam = read_run(run_dir).series("sharpness/critical")
    assert lam.size == 8 and (lam > 0).all()  # the callback wrote a measured run
    report = tmp_path / "report"
    out = run_ok(capsys, ["analyze", run_dir, "--out", report])
    skip = [line for line in out.splitlines() if SKIP in line]
    assert len(skip) == 1 and "have 1" in skip[0], out
    assert "gpt2-tiny" in out
    assert_figures(report, {"run-gpt2-tiny"})
    table = rows(report, "runs")
    assert len(table) == 1 and table[0]["run"] == "gpt2-tiny" and table[0]["measurements"] == "8"
    assert float(table[0]["final_sharpness"]) > 0 and float(table[0]["edge_ratio"]) > 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["cross_scale"]["fitted"] is False and "scaling_law" not in summary
    assert SKIP in (report / "report.html").read_text(encoding="utf-8")
    assert not (report / "tables" / "scales.csv").exists()  # nothing across sizes
    assert not (report / "figures" / "scaling_law.png").exists()


def test_one_trained_run_with_every_measure(capsys, trained, tmp_path):
    report = tmp_path / "report"
    out = run_ok(capsys, ["analyze", trained[16], "--out", report])
    assert sum(SKIP in line for line in out.splitlines()) == 1
    row = rows(report, "runs")[0]
    assert row["three_phase"] in ("yes", "no")  # 12 measurements: the detector reads them
    for column in ("final_loss", "final_eval_loss", "phase1", "phase3", "frac_above_edge", "final_lambda_max",
                   "final_trace_per_param", "final_preconditioned"):
        assert row[column] not in ("", "nan"), column
    assert_figures(report, {"run-nano16"})


# --- sizes ----------------------------------------------------------------------------

def test_two_sizes_skip_with_one_line(capsys, trained, tmp_path):
    study = tmp_path / "study"
    for width in WIDTHS[:2]:
        copy_run(trained[width], study / f"nano{width}")
    report = tmp_path / "report"
    out = run_ok(capsys, ["analyze", study, "--out", report])
    skip = [line for line in out.splitlines() if SKIP in line]
    assert len(skip) == 1 and "have 2" in skip[0], out
    assert [r["run"] for r in rows(report, "runs")] == ["nano16", "nano24"]
    assert not (report / "tables" / "scales.csv").exists()
    assert not (report / "tables" / "claims.csv").exists()  # no cross-scale claims on two sizes
    assert_figures(report, {"run-nano16", "run-nano24", "overlay"})


def test_three_sizes_under_a_user_label_fit_across(capsys, trained, tmp_path):
    study = tmp_path / "study"
    for width in WIDTHS:
        copy_run(trained[width], study / f"nano{width}", group="my-sweep")
    report = tmp_path / "report"
    out = run_ok(capsys, ["analyze", study, "--out", report])
    assert SKIP not in out
    assert "cross-scale fit over group 'my-sweep': 3 sizes" in out
    assert "final sharpness = " in out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["cross_scale"]["fitted"] is True and summary["scaling_law"]["n"] == 3
    assert [float(r["n_params"]) for r in rows(report, "scales")] == sorted(
        read_run(trained[w]).config["n_params"] for w in WIDTHS)
    assert {r["claim"] for r in rows(report, "claims")} >= {"loglinear_law", "edge_of_stability"}
    assert not (report / "tables" / "extrapolation.csv").exists()  # 13B-70B means nothing here
    assert not (report / "tables" / "schedules.csv").exists()  # no schedule runs: no table
    assert_figures(report, {"scaling_law", "trajectories", "measures", "run-nano16", "run-nano24", "run-nano32"})


def test_callback_and_trainer_runs_fit_together(capsys, trained, callback_runs, tmp_path):
    """A callback run and two trained runs, all written under the default label
    'training': three sizes, fitted across."""
    study = tmp_path / "study"
    shutil.copytree(callback_runs[0], study / "hf")
    for width in WIDTHS[:2]:
        copy_run(trained[width], study / f"nano{width}")
    report = tmp_path / "report"
    out = run_ok(capsys, ["analyze", study, "--out", report, "--no-figures"])
    assert "cross-scale fit over group 'training': 3 sizes" in out
    assert len(rows(report, "scales")) == 3


def test_labels_one_per_size_are_pooled_and_group_flag(capsys, trained, tmp_path):
    study = tmp_path / "study"
    for width, label in zip(WIDTHS, ("small", "medium", "large")):
        copy_run(trained[width], study / label, group=label)
    out = run_ok(capsys, ["analyze", study, "--out", tmp_path / "pooled", "--no-figures"])
    assert "cross-scale fit over groups 'large', 'medium', 'small' (one size each): 3 sizes" in out
    out = run_ok(capsys, ["analyze", study, "--out", tmp_path / "two", "--no-figures", "--group", "small,large"])
    assert sum(SKIP in line for line in out.splitlines()) == 1
    line = run_err(capsys, ["analyze", study, "--out", tmp_path / "bad", "--group", "huge"])
    assert "huge" in line and "'small'" in line


# --- missing series -------------------------------------------------------------------

def test_missing_series_do_not_crash(capsys, trained, callback_runs, tmp_path):
    """A run whose every λ_c is null, a run cut after 2 measurements, a run without
    train/loss: each gets its row and figure."""
    study = tmp_path / "study"
    _, failing = callback_runs
    shutil.copytree(failing, study / "failing")
    short = copy_run(trained[16], study / "short", name="short")
    lines = (short / "metrics.jsonl").read_text().splitlines(keepends=True)
    (short / "metrics.jsonl").write_text("".join(ln for ln in lines if json.loads(ln)["step"] <= 2))
    no_loss = copy_run(trained[24], study / "no-loss", name="no-loss")
    kept = [{k: v for k, v in json.loads(ln).items() if k != "train/loss"}
            for ln in (no_loss / "metrics.jsonl").read_text().splitlines()]
    (no_loss / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    _, lam = read_run(study / "failing").series("sharpness/critical")
    assert lam.size and not (lam == lam).any()  # every measurement failed, written as null
    report = tmp_path / "report"
    out = run_ok(capsys, ["analyze", study, "--out", report])
    skip = [line for line in out.splitlines() if SKIP in line]
    assert len(skip) == 1 and "without a finite final sharpness/critical" in skip[0], out
    table = {r["run"]: r for r in rows(report, "runs")}
    assert table["gpt2-failing"]["failed_share"] == "1.0"
    assert "max_evals" in table["gpt2-failing"]["failed"]
    assert table["gpt2-failing"]["three_phase"] == "undecidable"
    assert table["short"]["measurements"] == "2" and table["short"]["three_phase"] == "undecidable"
    assert table["no-loss"]["final_loss"] in ("", "nan")
    assert_figures(report, {"run-gpt2-failing", "run-short", "run-no-loss", "overlay"})


# --- bad input ------------------------------------------------------------------------

def test_bad_input_is_one_line(capsys, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no runs" in run_err(capsys, ["analyze", tmp_path / "empty", "--out", tmp_path / "r1"])
    broken = copy_run(trained[16], tmp_path / "broken")
    with open(broken / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "t": 1.0,\n')
    line = run_err(capsys, ["analyze", broken, "--out", tmp_path / "r2"])
    assert str(broken / "metrics.jsonl") in line and "malformed" in line
    line = run_err(capsys, ["analyze", trained[16], "--out", tmp_path / "r3", "--metric", "sharpness/nope"])
    assert "--metric" in line and "sharpness/critical" in line
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()
