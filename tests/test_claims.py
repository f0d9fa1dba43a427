"""Claims (analysis/claims.py, analysis/compare.py) on hand-built studies whose answer is
known: a ladder whose final sharpness falls with N holds the log-linear claim, a rising one
does not, a flat noisy one is inconclusive; the claims come in their registered order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from sharpscope.analysis.claims import CLAIMS, evaluate_claims
from sharpscope.analysis.compare import compare_summaries
from sharpscope.analysis.study import analyze_runs
from sharpscope.analysis.verdicts import FAILS, HOLDS, UNCLEAR
from sharpscope.runs import read_study, write_run

SIZES = [1e4, 3e4, 1e5, 3e5, 1e6]
T = np.linspace(0, 1, 101)


def three_phase(peak: float, final: float, t_peak: float = 0.15, decay: float = 8.0) -> np.ndarray:
    rise = final + (peak - final) * T / t_peak
    fall = final + (peak - final) * np.exp(-decay * (T - t_peak))
    return np.where(T < t_peak, rise, fall)


def write_ladder(root, finals, peaks=None, *, lr=None, seeds=(0,), noise=0.0, source="measured", shape=None):
    rng = np.random.default_rng(0)
    peaks = peaks if peaks is not None else [2.5 * f for f in finals]
    for n, final, peak in zip(SIZES, finals, peaks):
        for seed in seeds:
            s = (shape(peak, final) if shape else three_phase(peak, final)) * (1 + noise * rng.standard_normal(T.size))
            rows = []
            for i, t in enumerate(T):
                row = {"step": i, "t": float(t), "sharpness/critical": float(s[i]),
                       "train/loss": float(3 + 2 * np.exp(-5 * t) - 0.1 * math.log10(n)),
                       "train/grad_norm": float(0.5 * s[i] + 0.1)}
                if lr is not None:
                    row["lr"] = lr
                rows.append(row)
            rows[-1]["eval/loss"] = float(final + 2)  # validation loss rises with final sharpness
            write_run(root / f"{int(n)}-s{seed}", {"name": f"{int(n)}-s{seed}", "model": f"{int(n)}", "n_params": n,
                                                   "source": source, "seed": seed, "group": "scales"}, rows)
    return root


def claims_of(root) -> dict:
    return analyze_runs(read_study(root)).summary["claims"]


def test_falling_ladder_holds(tmp_path):
    finals = [2.0 - 0.2 * math.log10(n) for n in SIZES]
    c = claims_of(write_ladder(tmp_path, finals, peaks=[3 + 0.3 * math.log10(n) for n in SIZES]))
    assert c["loglinear_law"]["verdict"] == HOLDS
    assert c["loglinear_law"]["value"] == pytest.approx(-0.2, rel=2e-2)
    assert c["three_phase"]["verdict"] == HOLDS and c["three_phase"]["value"] == 1.0
    assert c["peak_grows"]["verdict"] == HOLDS
    assert c["flatter_end"]["verdict"] == HOLDS
    assert c["sharpness_loss"]["verdict"] == HOLDS  # validation loss = final + 2
    # the statistic is scipy's
    x = np.log10(SIZES)
    fit = stats.linregress(x, finals)
    assert c["loglinear_law"]["p_value"] == pytest.approx(fit.pvalue, rel=1e-6, abs=1e-300)


def test_rising_ladder_does_not_hold(tmp_path):
    finals = [0.5 + 0.2 * math.log10(n) for n in SIZES]
    c = claims_of(write_ladder(tmp_path, finals))
    assert c["loglinear_law"]["verdict"] == FAILS
    assert c["loglinear_law"]["value"] > 0


def test_flat_noisy_ladder_is_inconclusive(tmp_path):
    finals = [1.0, 1.03, 0.98, 1.02, 0.99]
    c = claims_of(write_ladder(tmp_path, finals))
    assert c["loglinear_law"]["verdict"] == UNCLEAR


def test_no_three_phases(tmp_path):
    rising = lambda peak, final: final + (peak - final) * T  # noqa: E731 - monotone rise, peak at the end
    c = claims_of(write_ladder(tmp_path, [1.0, 0.9, 0.8, 0.7, 0.6], shape=rising))
    assert c["three_phase"]["verdict"] == FAILS and c["three_phase"]["value"] == 0.0


@pytest.mark.parametrize("lr,verdict", [(2.0, HOLDS), (0.2, FAILS), (5.0, FAILS)])
def test_edge_of_stability(tmp_path, lr, verdict):
    # plateau at 1.0: λ_c·lr/2 = lr/2 late in the run
    c = claims_of(write_ladder(tmp_path, [1.0] * 5, peaks=[1.2] * 5, lr=lr))
    assert c["edge_of_stability"]["verdict"] == verdict


def test_claims_come_in_registry_order(tmp_path):
    finals = [2.0 - 0.2 * math.log10(n) for n in SIZES]
    a = analyze_runs(read_study(write_ladder(tmp_path, finals, lr=1.0)))
    names = [row["claim"] for row in a.tables["claims"]]
    assert names == list(a.summary["claims"]) == [c.key for c in evaluate_claims(a)]
    # no schedule runs: one 'schedules' claim stands in for the three schedule claims
    assert names == ["three_phase", "loglinear_law", "loglinear_vs_power", "peak_grows", "flatter_end",
                     "sharpness_loss", "sharpness_accuracy", "coupling_grows", "schedules", "early_prediction",
                     "measures_agree", "edge_of_stability"]
    assert len(CLAIMS) == 16  # with sharpness_source_loss and restart_spikes, schedule_pattern, schedule_final


def test_seed_spread_enters_the_scales_table(tmp_path):
    finals = [2.0 - 0.2 * math.log10(n) for n in SIZES]
    a = analyze_runs(read_study(write_ladder(tmp_path, finals, seeds=(0, 1, 2), noise=0.02)))
    assert all(row["n_runs"] == 3 and row["final_sharpness_std"] > 0 for row in a.tables["scales"])
    assert a.summary["claims"]["loglinear_law"]["n"] == 5  # the fit is over sizes, seeds averaged


# --- compare ---------------------------------------------------------------------------

def _schedule_claims(preserved: dict, ratio: dict, noise_cv=None) -> dict:
    return {"claims": {
        "schedule_pattern": {"claim": "c", "statistic": "s", "summary": "", "value": 0.0, "verdict": UNCLEAR,
                             "details": {"preserved": preserved}},
        "schedule_final": {"claim": "c", "statistic": "s", "summary": "", "value": 0.0, "verdict": UNCLEAR,
                           "details": {"ratio": ratio, "noise_cv": noise_cv}}}}


def test_compare_schedule_pattern_and_direction():
    cells = {"constant@smallest": 0.0, "constant@largest": 1.0, "cosine@smallest": 1.0, "wsd@middle": 1.0,
             "linear@largest": 1.0}
    ratio = {"constant@smallest": 1.2, "constant@largest": 1.15, "wsd@middle": 1.06, "linear@largest": 1.01}
    sim = _schedule_claims(cells, ratio)
    same = {r["claim"]: r for r in compare_summaries(sim, _schedule_claims(cells, ratio, 0.01))}
    assert same["schedule_pattern"]["verdict"] == HOLDS and same["schedule_pattern"]["measured_value"] == 1.0
    assert same["schedule_final"]["verdict"] == HOLDS
    flipped = {k: 1.0 - v for k, v in cells.items()}
    opposite = {k: 2 - v for k, v in ratio.items()}
    other = {r["claim"]: r for r in compare_summaries(sim, _schedule_claims(flipped, opposite, 0.01))}
    assert other["schedule_pattern"]["verdict"] == FAILS
    assert other["schedule_final"]["verdict"] == FAILS
    # within the seed spread nothing counts
    noisy = {r["claim"]: r for r in compare_summaries(sim, _schedule_claims(cells, opposite, 0.5))}
    assert noisy["schedule_final"]["verdict"] == UNCLEAR


def test_compare_lines_up_all_claims(tmp_path):
    finals = [2.0 - 0.2 * math.log10(n) for n in SIZES]
    a = analyze_runs(read_study(write_ladder(tmp_path / "a", finals))).summary
    b = analyze_runs(read_study(write_ladder(tmp_path / "b", [0.5 + 0.2 * math.log10(n) for n in SIZES]))).summary
    rows = {r["claim"]: r for r in compare_summaries(a, b)}
    assert set(rows) == set(a["claims"]) | set(b["claims"])
    assert rows["loglinear_law"]["simulated_verdict"] == HOLDS and rows["loglinear_law"]["verdict"] == FAILS


def test_undecidable_runs_make_the_pattern_inconclusive(tmp_path):
    def gappy(peak, final):
        s = three_phase(peak, final)
        s[::3] = np.nan  # a third of the measurements failed (e.g. not a descent direction)
        return s

    c = claims_of(write_ladder(tmp_path, [1.0, 0.9, 0.8, 0.7, 0.6], shape=gappy))
    assert c["three_phase"]["verdict"] == UNCLEAR
    assert c["three_phase"]["details"]["undecidable"] == 5


def test_schedule_cells_the_detector_cannot_read_are_left_out(tmp_path):
    def run(name, n, schedule, s):
        rows = [{"step": i, "t": float(t), "sharpness/critical": float(v), "train/loss": 1.0, "train/grad_norm": 1.0}
                for i, (t, v) in enumerate(zip(T, s))]
        write_run(tmp_path / name, {"name": name, "model": f"{int(n)}", "n_params": n, "source": "measured",
                                    "group": "schedules", "schedule": schedule}, rows)

    gappy = three_phase(2.0, 1.0).copy()
    gappy[::3] = np.nan
    for n in SIZES[:3]:
        run(f"{int(n)}-cosine", n, "cosine", three_phase(2.0, 1.0))
        run(f"{int(n)}-constant", n, "constant", gappy)
    write_ladder(tmp_path / "ladder", [1.0, 0.9, 0.8, 0.7, 0.6])
    claims = claims_of(tmp_path)
    preserved = claims["schedule_pattern"]["details"]["preserved"]
    assert set(preserved) == {"cosine@smallest", "cosine@middle", "cosine@largest"}  # constant cells unreadable


def test_negative_coupling_does_not_hold(tmp_path):
    # gradient norm falling while sharpness rises: within-run r < 0 at every size
    finals = [2.0 - 0.2 * math.log10(n) for n in SIZES]
    root = write_ladder(tmp_path, finals)
    for run_dir in root.iterdir():
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in lines:
            row["train/grad_norm"] = 5.0 - row["sharpness/critical"]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    c = claims_of(root)
    assert c["coupling_grows"]["verdict"] == FAILS


def test_median_final_resists_an_outlier(tmp_path):
    from sharpscope.analysis.study import AnalysisOptions

    finals = [2.0 - 0.2 * math.log10(n) for n in SIZES]
    root = write_ladder(tmp_path, finals)
    run_dir = root / f"{int(SIZES[0])}-s0"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines[-3]["sharpness/critical"] = 1e4  # one wild measurement in the final window
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    mean = analyze_runs(read_study(root)).summary
    median = analyze_runs(read_study(root), AnalysisOptions(final_statistic="median")).summary
    assert mean["claims"]["loglinear_law"]["verdict"] != HOLDS
    assert median["claims"]["loglinear_law"]["verdict"] == HOLDS
    assert median["final_statistic"] == "median"
