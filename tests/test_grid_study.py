"""The measured study (``sharpscope study``): grid planning, compute-matched budgets,
resumable runs, sharding, and the report with the simulated-vs-measured comparison."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from sharpscope.cli import main
from sharpscope.config import load_config, to_dict
from sharpscope.errors import UserError
from sharpscope.experiments.grid_study import StudyConfig, plan_study, run_study
from sharpscope.experiments.plan import parse_shape, run_state, stored_train_settings
from sharpscope.training.checkpoint import list_checkpoints
from sharpscope.training.model import GPT, GPTConfig, count_parameters

# A grid that trains in seconds: three one-block models, two schedules at one size.
TINY = [
    'sizes=["1x8","1x16","1x24"]', "seeds=[0,1]", 'schedule_sizes=["1x16"]', 'schedules=["cosine","constant"]',
    "schedule_seeds=[0]", "budget.tokens_per_param=0.5", "budget.min_steps=12", "monitor_points=6",
    "exact_points=2", "eval_points=2", "checkpoint_points=3", "train.model.block_size=16", "train.data.batch_size=4",
    'train.data.sources=["arithmetic","code"]', "train.data.max_bytes=100000", "train.eval.batches=1",
    "train.eval.arithmetic_problems=3", "train.monitor.probe_batch_size=4", "train.monitor.lanczos_iters=4",
    "train.monitor.trace_samples=2",
]


def tiny_config(*extra: str) -> StudyConfig:
    return load_config(StudyConfig, None, [*TINY, *extra])


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    run_study(tiny_config(), out, progress=False)
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- planning --------------------------------------------------------------------------

def test_budget_is_tokens_per_param():
    cfg = load_config(StudyConfig, None, ["budget.min_steps=1"])
    tokens_per_step = cfg.train.data.batch_size * cfg.train.model.block_size
    for run in plan_study(cfg):
        assert run.steps == math.ceil(cfg.budget.tokens_per_param * run.n_params / tokens_per_step)
        assert run.tokens == run.steps * tokens_per_step
        assert run.tokens >= cfg.budget.tokens_per_param * run.n_params


def test_min_and_max_steps():
    runs = plan_study(load_config(StudyConfig, None, ["budget.min_steps=500", "budget.max_steps=1000"]))
    assert min(r.steps for r in runs) == 500 and max(r.steps for r in runs) == 1000


def test_parameter_counts_are_the_built_models():
    cfg = StudyConfig()
    for run in plan_study(cfg)[:5]:
        layers, heads, width = run.shape
        model = GPT(GPTConfig(vocab_size=256, block_size=cfg.train.model.block_size, n_layer=layers,
                              n_head=heads, d_model=width))
        assert count_parameters(model) == run.n_params


def test_default_ladder_spans_a_decade_and_a_half():
    runs = plan_study(StudyConfig())
    sizes = sorted({r.n_params for r in runs})
    assert len(sizes) >= 5 and math.log10(sizes[-1] / sizes[0]) >= 1.5


def test_grid_layout_and_order():
    cfg = StudyConfig()
    runs = plan_study(cfg)
    assert len(runs) == len(cfg.sizes) * len(cfg.seeds) + len(cfg.schedule_sizes) * (len(cfg.schedules) - 1)
    assert len({r.name for r in runs}) == len(runs)
    # every prefix is usable: the whole ladder at the first seed comes first
    assert [r.size for r in runs[:len(cfg.sizes)]] == cfg.sizes
    assert all(r.seed == cfg.seeds[0] for r in runs[:len(cfg.sizes)])
    schedules = [r for r in runs if "schedules" in r.groups]
    assert {(r.size, r.schedule) for r in schedules} == {(s, k) for s in cfg.schedule_sizes for k in cfg.schedules}
    for r in runs:  # cadences are fractions of the run
        assert r.config.monitor.every == max(1, r.steps // cfg.monitor_points)
        assert r.config.schedule.warmup_steps == round(cfg.warmup_fraction * r.steps)
        assert r.config.group == r.groups[0] and r.config.groups == r.groups[1:]


@pytest.mark.parametrize("size,shape", [("2x64", (2, 2, 64)), ("3x4x96", (3, 4, 96)), ("1x24", (1, 1, 24)),
                                        ("tiny", (2, 4, 64))])
def test_parse_shape(size, shape):
    assert parse_shape(size) == shape


@pytest.mark.parametrize("override,needle", [
    ('sizes=["1x8","1x16"]', "at least 3"),
    ('sizes=["1x8","1x16","big"]', "neither a preset"),
    ('sizes=["1x8","1x16","1x3x16"]', "heads dividing width"),
    ('schedules=["cosine","cyclic"]', "unknown schedule"),
    ('schedule_sizes=["9x512"]', "not in 'sizes'"),
    ("budget.tokens_per_param=0", "tokens_per_param"),
    ("seeds=[]", "at least one seed"),
])
def test_bad_plans(override, needle):
    with pytest.raises(UserError, match=needle):
        plan_study(load_config(StudyConfig, None, [*TINY, override]))


def test_cli_bad_input_one_line(capsys, tmp_path):
    assert main(["study", "--out", str(tmp_path / "s"), 'sizes=["1x8"]']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sharpscope: error:")
    assert not (tmp_path / "s").exists()
    assert main(["study", "--out", str(tmp_path / "s"), "--shard", "2/2", *TINY]) == 2


def test_cli_plan(capsys, tmp_path):
    assert main(["study", "--out", str(tmp_path / "s"), "--plan", *TINY]) == 0
    out = capsys.readouterr().out
    assert "1x8-cosine-s0" in out and "1x16-constant-s0" in out and "7 runs" in out
    assert not (tmp_path / "s").exists()


# --- running ---------------------------------------------------------------------------

def test_study_writes_every_run(tiny_study):
    plan = json.loads((tiny_study / "study.json").read_text())
    assert len(plan["runs"]) == 7
    for r in plan["runs"]:
        run = tiny_study / "runs" / r["name"]
        config = json.loads((run / "config.json").read_text())
        assert config["n_params"] == r["n_params"] and config["schedule"] == r["schedule"]
        assert run_state(run, r["steps"]) == "done"
        metrics = rows(run)
        assert metrics[-1]["step"] == r["steps"] and metrics[-1]["tokens"] == r["tokens"]
        assert sum("sharpness/critical" in m for m in metrics) >= 6
        assert any("sharpness/lambda_max" in m for m in metrics)
        assert len(list_checkpoints(run)) == 1  # only the latest is kept


def test_stored_train_settings(tiny_study, tmp_path):
    """A finished run's settings read back equal to the plan's; a missing or garbled
    config.json reads as None (so the run counts as trained with other settings)."""
    planned = next(r for r in plan_study(tiny_config()) if r.name == "1x24-cosine-s0")
    assert stored_train_settings(tiny_study / "runs" / planned.name) == to_dict(planned.config)
    assert stored_train_settings(tmp_path / "absent") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    assert stored_train_settings(tmp_path / "bad") is None


def test_rerun_skips_finished_runs(tiny_study):
    before = {p: p.stat().st_mtime_ns for p in (tiny_study / "runs").rglob("metrics.jsonl")}
    result = run_study(tiny_config(), tiny_study, progress=False)
    assert not result.ran and not result.resumed and len(result.skipped) == 7
    # the mix and Nexus parts keep their own state: changing them does not re-plan the grid
    result = run_study(tiny_config("nexus.steps=7", "mix.steps=9"), tiny_study, progress=False)
    assert len(result.skipped) == 7
    assert before == {p: p.stat().st_mtime_ns for p in (tiny_study / "runs").rglob("metrics.jsonl")}


def test_unfinished_run_resumes_exactly(tiny_study, tmp_path):
    """An interrupted run (its last checkpoint lost, log cut) is resumed from the checkpoint
    before and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out)
    run = out / "runs" / "1x24-cosine-s0"
    want_rows = rows(run)
    want_weights = (list_checkpoints(run)[-1] / "model.safetensors").read_bytes()
    # re-create the mid-run state: train the same run to its second checkpoint only
    cfg = tiny_config()
    planned = next(r for r in plan_study(cfg) if r.name == "1x24-cosine-s0")
    shutil.rmtree(run)
    from dataclasses import replace

    from sharpscope.training.trainer import train

    every = planned.config.checkpoint.every
    with pytest.raises(_Stop):
        train(replace(planned.config, steps=planned.steps), run, on_step=_stop_after(2 * every))
    assert run_state(run, planned.steps) == "partial"
    result = run_study(cfg, out, progress=False)
    assert result.resumed == ["1x24-cosine-s0"] and not result.ran
    assert rows(run) == want_rows
    assert (list_checkpoints(run)[-1] / "model.safetensors").read_bytes() == want_weights


class _Stop(Exception):
    pass


def _stop_after(step: int):
    def hook(done: int, total: int) -> None:
        if done == step:
            raise _Stop
    return hook


def test_run_without_checkpoint_starts_over(tiny_study, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out)
    run = out / "runs" / "1x8-cosine-s1"
    want = rows(run)
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    result = run_study(tiny_config(), out, progress=False)
    assert result.ran == ["1x8-cosine-s1"]
    assert rows(run) == want


def test_changed_settings_refused_then_forced(tiny_study, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["study", "--out", str(out), "--no-progress", *TINY, "train.optim.lr=1e-3"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}  # nothing touched
    # --force retrains only the runs whose settings changed: a new seed adds runs, keeps the rest
    result = run_study(tiny_config("seeds=[0,1,2]"), out, progress=False, force=True)
    assert sorted(result.ran) == ["1x16-cosine-s2", "1x24-cosine-s2", "1x8-cosine-s2"]
    assert len(result.skipped) == 7
    # a changed training setting retrains every run it touches, finished ones included
    result = run_study(tiny_config("seeds=[0,1,2]", "train.optim.lr=1e-3"), out, progress=False, force=True)
    assert len(result.ran) == 10 and not result.skipped
    assert json.loads((out / "runs" / "1x8-cosine-s0" / "config.json").read_text())["train"]["optim"]["lr"] == 1e-3


def test_shards_cover_the_grid(tmp_path):
    cfg = tiny_config('sizes=["1x8","1x12","1x16"]', "seeds=[0]", 'schedules=["cosine"]')
    a = run_study(cfg, tmp_path, shard=(0, 2), progress=False)
    b = run_study(cfg, tmp_path, shard=(1, 2), progress=False)
    assert sorted(a.ran + b.ran) == sorted(r.name for r in plan_study(cfg))
    assert not set(a.ran) & set(b.ran)


# --- report ----------------------------------------------------------------------------

def test_study_report_compares_with_the_simulation(tiny_study, tmp_path, capsys):
    report = tmp_path / "report"
    from sharpscope.report.study import write_study_report

    html = write_study_report(tiny_study, report)
    text = html.read_text()
    assert "The simulated study&#x27;s claims on measured runs" in text or "claims on measured runs" in text
    comparison = json.loads((report / "comparison.json").read_text())
    keys = {row["claim"] for row in comparison}
    for claim in ("three_phase", "loglinear_law", "loglinear_vs_power", "peak_grows", "flatter_end",
                  "sharpness_loss", "sharpness_accuracy", "coupling_grows", "restart_spikes", "schedule_pattern",
                  "schedule_final", "early_prediction", "measures_agree", "edge_of_stability"):
        assert claim in keys
    for row in comparison:
        assert row["verdict"] in ("holds", "does not hold", "inconclusive")
        if row["claim"] != "sharpness_source_loss":  # the simulated runs have no per-source loss
            assert row["simulated_verdict"] in ("holds", "does not hold", "inconclusive")
    # the measured summary carries the same claims, computed by the analysis
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["claims"]) == keys - {"restart_spikes"}  # this grid has no restarts run
    # the standalone command gives the same rows from the two summaries
    sim = tmp_path / "sim"
    assert main(["simulate", "--out", str(sim), "--no-figures"]) == 0
    assert main(["compare", str(sim / "report"), str(report), "--out", str(tmp_path / "cmp")]) == 0
    again = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["verdict"] for r in again] == [r["verdict"] for r in comparison]
    assert "hold" in capsys.readouterr().out


def test_compare_bad_input(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- the report as a person sees it: headless chromium ---------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHECK_PAGE = """<!DOCTYPE html><html><body><iframe id="f" src="{src}" style="width:1200px;height:900px"></iframe>
<pre id="result">pending</pre><script>
window.addEventListener('load', function () {{
  var lines = [];
  try {{
    var images = document.getElementById('f').contentDocument.images;
    for (var i = 0; i < images.length; i++) {{
      lines.push(JSON.stringify({{alt: images[i].alt, complete: images[i].complete,
                                 width: images[i].naturalWidth, height: images[i].naturalHeight}}));
    }}
    document.getElementById('result').textContent = 'IMAGES\\n' + lines.join('\\n') + '\\nEND';
  }} catch (e) {{ document.getElementById('result').textContent = 'ERROR ' + e; }}
}});
</script></body></html>"""


def _browser_images(chromium: str, report: Path, tmp_path: Path) -> list[dict]:
    """Every <img> of the report as the browser loaded it (complete, natural size)."""
    import subprocess

    page = tmp_path / "check.html"
    page.write_text(CHECK_PAGE.format(src=report.resolve().as_uri()))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "IMAGES" in dom and "END" in dom, f"the check page did not run: {dom[-500:]}"
    body = dom[dom.index("IMAGES") + len("IMAGES"):dom.index("END")]
    return [json.loads(line.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"'))
            for line in body.strip().splitlines()]


def _screenshot(chromium: str, report: Path, png: Path) -> None:
    import subprocess

    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,4000", f"--screenshot={png}", report.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)


def _is_blank(png: Path | bytes) -> bool:
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("L")
    return float(np.asarray(image, dtype=float).std()) < 1.0


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("kind", ["measured", "simulated"])
def test_report_renders_in_a_browser(kind, tiny_study, tmp_path):
    import base64
    import re

    from sharpscope.report.study import write_study_report

    if kind == "measured":
        report = write_study_report(tiny_study, tmp_path / "report")
    else:
        assert main(["simulate", "--out", str(tmp_path / "sim")]) == 0
        report = tmp_path / "sim" / "report" / "report.html"
    html = report.read_text()
    embedded = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(embedded) >= 6
    for data in embedded:  # every figure has content
        assert not _is_blank(base64.b64decode(data))
    images = _browser_images(_chromium(), report, tmp_path)
    assert len(images) == len(embedded)
    broken = [i["alt"] for i in images if not i["complete"] or i["width"] == 0 or i["height"] == 0]
    assert not broken, f"images the browser could not load: {broken}"
    shot = tmp_path / "report.png"
    _screenshot(_chromium(), report, shot)
    assert shot.stat().st_size > 10_000 and not _is_blank(shot)


def test_study_under_torchrun_matches_one_process(tiny_study, tmp_path):
    """Two gloo processes walk the same grid and train every run together (DDP): the runs
    are the single-process runs on the same global batches."""
    import os
    import subprocess
    import sys

    grid = ['sizes=["1x8","1x16","1x24"]', "seeds=[0]", 'schedules=["cosine"]']
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sharpscope", "study", "--out", str(out), "--no-progress", "--no-report", *TINY, *grid]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("1x8-cosine-s0", "1x16-cosine-s0", "1x24-cosine-s0"):
        a, b = rows(tiny_study / "runs" / name), rows(out / "runs" / name)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            for key in ("train/loss", "eval/loss"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-4), (name, ra["step"], key)


def test_report_names_a_corrupt_plan(tiny_study, tmp_path):
    from sharpscope.report.study import write_study_report

    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out)
    (out / "study.json").write_text("{not json")
    with pytest.raises(UserError, match="study.json is not a study plan"):
        write_study_report(out, tmp_path / "report", figures=False)
