"""Validation: does sharpscope see the edge of stability where the literature says it is?

Two published observations, reproduced on scikit-learn's bundled digits (no download):

* Gradient descent (Cohen et al. 2021): with full-batch GD at step size η, the top Hessian
  eigenvalue λ_max grows during training (progressive sharpening) until it reaches 2/η,
  the largest curvature a quadratic can have without GD diverging along it, and then
  stays close to 2/η while the loss keeps falling, with ups and downs. Critical sharpness
  along the GD step (λ_c = 2/η_c, η_c the smallest step size at which the loss along −g
  is back above its starting value) should sit at 2/η there too, and η > η_c should be exactly the steps where
  the loss went up.
* Adam (Cohen et al. 2022): with full-batch Adam, the sharpness of the preconditioned
  Hessian P^{-1/2} H P^{-1/2} (preconditioned_sharpness) rises to Adam's own threshold
  (2 + 2β1)/((1 − β1)·η) = 38/η for β1 = 0.9 and stays near it.

Setup (all float64, so that the statistics are not a rounding question): the first N
digits images, pixels scaled to [0, 1]; a 64-100-100-10 tanh MLP with PyTorch's default
initialisation (seed 0); squared loss 0.5·‖f(x) − onehot(y)‖² per example, averaged over
the full batch. loss_fn returns the per-example losses, so λ_c carries a bootstrap
standard error. GD is torch.optim.SGD (no momentum) wrapped in SharpnessMonitor, which
measures λ_c along the step the optimizer took every CRITICAL_EVERY steps; λ_max (Lanczos,
hessian_eigenvalues) is measured every EVERY steps. Adam is torch.optim.Adam
(β = (0.9, 0.999), ε = 1e-8, no weight decay); its preconditioned sharpness is measured
every EVERY steps just before the step, with the optimizer's current state. One thread
(see main).

Printed: per run, the first step at which the measure reached 0.9 of its threshold, the
median (and quartiles) of measure/threshold after that step and over the second half of
the run, the share of steps before and after it on which the loss went up, and for GD
how often "λ_c above 2/η" and "the loss went up" agree; then one line of median ratios
per run. `--out DIR` also draws DIR/figures/validation_gd.png and validation_adam.png and
rewrites the numbers table between the markers in DIR/validation.md. Not part of
`make test`: about 4-5 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sharpscope.curvature import SharpnessMonitor, hessian_eigenvalues, preconditioned_sharpness

DTYPE = torch.float64
N_POINTS = 1000
HIDDEN = 100
SEED = 0
# Cadences are odd: at the edge of stability GD oscillates with period 2 along the top
# eigenvector, and an even cadence would see only one phase of that oscillation.
EVERY = 25  # λ_max / preconditioned sharpness (Lanczos, tens of H·v each)
CRITICAL_EVERY = 3  # λ_c (a few forward passes each)
REACH = 0.9  # "reached the threshold": the measure is within 10% of it
# Lanczos stops when its bound on the eigenvalue error is below 1e-3 relative: ten times
# finer than any ratio the summary reports, and half the products of the 1e-4 default.
EIG_TOL = 1e-3

# (η, steps). 2/η = 13.3, 20 and 30; the runs are long enough for λ_max to reach 2/η
# (0.9 of it after 150, 600 and 1625 steps with seed 0) and then spend well over a
# thousand steps there.
GD_RUNS = ((0.15, 1500), (0.1, 2500), (0.0667, 3500))
# 38/η = 76,000, 38,000 and 19,000; preconditioned sharpness reaches it within a few
# hundred steps.
ADAM_RUNS = ((5e-4, 2000), (1e-3, 2000), (2e-3, 2000))
ADAM_BETAS = (0.9, 0.999)

TABLE_BEGIN = "<!-- validation-table:begin -->"
TABLE_END = "<!-- validation-table:end -->"


@dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor
    hidden: int
    seed: int

    @property
    def batch(self):
        return (self.x, self.y)


def load_problem(n_points: int = N_POINTS, hidden: int = HIDDEN, seed: int = SEED) -> Problem:
    from sklearn.datasets import load_digits  # optional dependency: checked by main()

    digits = load_digits()
    x = torch.tensor(digits.data[:n_points], dtype=DTYPE) / 16.0  # pixel values are 0..16
    y = torch.nn.functional.one_hot(torch.tensor(digits.target[:n_points]), 10).to(DTYPE)
    return Problem(x, y, hidden, seed)


def make_model(problem: Problem) -> torch.nn.Module:
    torch.manual_seed(problem.seed)
    h = problem.hidden
    return torch.nn.Sequential(
        torch.nn.Linear(64, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh(), torch.nn.Linear(h, 10),
    ).to(DTYPE)


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    """Per-example squared loss; its mean is the training loss (Cohen et al.'s MSE on
    one-hot targets, with the conventional ½)."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1)


def lambda_max(model: torch.nn.Module, problem: Problem) -> float:
    return hessian_eigenvalues(model, loss_fn, problem.batch, k=1, tol=EIG_TOL).values[0]


@dataclass
class Run:
    """One training run. ``loss[s]`` is the loss at θ_s (before step s); ``loss`` has one
    more entry than there are steps (the final θ). ``measured_steps[i]`` is where
    ``measure[i]`` was taken (at θ_s); ``critical[i]`` is λ_c at θ_s along step s for
    s = ``critical_steps[i]`` (GD only). ``threshold`` is the measure's stability threshold (2/η or 38/η)."""

    optimizer: str
    lr: float
    threshold: float
    loss: np.ndarray
    measured_steps: np.ndarray
    measure: np.ndarray
    critical_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    critical: np.ndarray = field(default_factory=lambda: np.zeros(0))
    critical_se: np.ndarray = field(default_factory=lambda: np.zeros(0))
    critical_failed: int = 0
    raw_lambda_max: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seconds: float = 0.0


def gd_threshold(lr: float) -> float:
    """GD on a quadratic with curvature λ diverges along that direction iff λ > 2/η."""
    return 2.0 / lr


def adam_threshold(lr: float, beta1: float) -> float:
    """Heavy-ball momentum β1 on a quadratic with curvature λ (Adam with P frozen) is stable
    iff λ < (2 + 2β1)/((1 − β1)·η): 38/η for β1 = 0.9."""
    return (2 + 2 * beta1) / ((1 - beta1) * lr)


def run_gd(problem: Problem, lr: float, steps: int, every: int = EVERY,
           critical_every: int = CRITICAL_EVERY) -> Run:
    """Full-batch GD; λ_c along the step every ``critical_every`` steps (the monitor, at
    θ_s along the step it took), λ_max every ``every`` steps and at the final θ, so that
    the last measurement is of the model the run leaves behind."""
    t0 = time.perf_counter()
    model = make_model(problem)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = SharpnessMonitor(model, loss_fn, problem.batch, opt, every=critical_every)
    losses, crit, crit_se, crit_at, at, lam = [], [], [], [], [], []
    failed = 0
    for s in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, problem.batch).mean()
        loss.backward()
        losses.append(loss.item())
        if s % every == 0:
            at.append(s)
            lam.append(lambda_max(model, problem))
        with monitor.around_step(s):
            opt.step()
        if monitor.latest is not None:
            result = monitor.last
            failed += result.status != "ok"
            crit_at.append(s)
            crit.append(result.sharpness)
            crit_se.append(result.stderr)
    with torch.no_grad():
        losses.append(loss_fn(model, problem.batch).mean().item())
    at.append(steps)
    lam.append(lambda_max(model, problem))
    return Run("gd", lr, gd_threshold(lr), np.array(losses), np.array(at), np.array(lam), np.array(crit_at),
               np.array(crit), np.array(crit_se), failed, seconds=time.perf_counter() - t0)


def run_adam(problem: Problem, lr: float, steps: int, every: int = EVERY, raw_every: int = 125) -> Run:
    """Full-batch Adam; preconditioned sharpness every ``every`` steps from step ``every`` on
    (Adam has no preconditioner before its first step), measured before the step with the
    state Adam has then (its v̂ lags the step's by one gradient: with β2 = 0.999 a change of
    about 0.1%). The raw λ_max every ``raw_every`` steps, for contrast."""
    t0 = time.perf_counter()
    model = make_model(problem)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=1e-8, weight_decay=0.0)
    losses, at, pre, raw = [], [], [], []
    threshold = adam_threshold(lr, ADAM_BETAS[0])
    for s in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, problem.batch).mean()
        loss.backward()
        losses.append(loss.item())
        if s > 0 and s % every == 0:
            r = preconditioned_sharpness(model, loss_fn, problem.batch, opt, tol=EIG_TOL)
            if not math.isclose(r.threshold, threshold):  # the table's 38/η must be the library's
                raise RuntimeError(f"preconditioned_sharpness threshold {r.threshold} != {threshold}")
            at.append(s)
            pre.append(r.value)
            raw.append(lambda_max(model, problem) if s % raw_every == 0 else math.nan)
        opt.step()
    with torch.no_grad():
        losses.append(loss_fn(model, problem.batch).mean().item())
    return Run("adam", lr, threshold, np.array(losses), np.array(at), np.array(pre), raw_lambda_max=np.array(raw),
               seconds=time.perf_counter() - t0)


def first_reach(steps: np.ndarray, ratio: np.ndarray, level: float = REACH) -> int | None:
    """The first step whose ratio is at least ``level`` (None if never)."""
    hit = np.flatnonzero(ratio >= level)
    return int(steps[hit[0]]) if hit.size else None


def after_stats(steps: np.ndarray, ratio: np.ndarray, start: int | None) -> tuple[float, float, float, int]:
    """Median, lower and upper quartile of ``ratio`` from step ``start`` on, and how many."""
    if start is None:
        return (math.nan,) * 3 + (0,)
    r = ratio[steps >= start]
    r = r[np.isfinite(r)]
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return float(med), float(q1), float(q3), int(r.size)


def summarize(run: Run) -> dict:
    """The numbers the validation reports for one run (ratios are measure/threshold)."""
    ratio = run.measure / run.threshold
    reach = first_reach(run.measured_steps, ratio)
    med, q1, q3, n = after_stats(run.measured_steps, ratio, reach)
    rises = np.diff(run.loss) > 0  # rises[s]: step s raised the loss
    steps = np.arange(rises.size)
    # The second half of the run, away from the first overshoot: the equilibrium level.
    late = run.measured_steps >= rises.size // 2
    out = {"optimizer": run.optimizer, "lr": run.lr, "threshold": run.threshold, "steps": rises.size,
           "reach": reach, "median": med, "q1": q1, "q3": q3, "n": n,
           "late_median": float(np.median(ratio[late])),
           "start_ratio": float(ratio[0]), "peak_ratio": float(np.nanmax(ratio)),
           "rises_before": float(rises[steps < reach].mean()) if reach else math.nan,
           "rises_after": float(rises[steps >= reach].mean()) if reach is not None else math.nan,
           "loss_at_reach": float(run.loss[reach]) if reach is not None else math.nan,
           "loss_end": float(run.loss[-1]), "seconds": run.seconds}
    if run.optimizer == "gd":
        c = run.critical / run.threshold
        c_steps = run.critical_steps
        c_reach = first_reach(c_steps, c)
        c_med, c_q1, c_q3, c_n = after_stats(c_steps, c, c_reach)
        ok = np.isfinite(c)
        # η > η_c along the step is, for a loss that crosses L0 once along the line, the same
        # statement as "this step raised the loss".
        agree = float(((c[ok] > 1) == rises[c_steps[ok]]).mean())
        out.update(c_reach=c_reach, c_median=c_med, c_q1=c_q1, c_q3=c_q3, c_n=c_n, c_failed=run.critical_failed,
                   c_late_median=float(np.nanmedian(c[c_steps >= rises.size // 2])),
                   c_before=float(np.nanmedian(c[c_steps < reach])) if reach else math.nan,
                   c_rel_se=float(np.nanmedian(run.critical_se / run.critical)), agree=agree, agree_n=int(ok.sum()))
    else:
        raw = run.raw_lambda_max
        ok = np.isfinite(raw) & (run.measured_steps >= (reach if reach is not None else 0))
        out["raw_over_2_lr"] = float(np.median(raw[ok] * run.lr / 2)) if ok.any() else math.nan
    return out


def _fmt(x, spec=".3f") -> str:
    if x is None:
        return "never"
    return "–" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def _spread(s: dict, prefix: str = "") -> str:
    return (f"{_fmt(s[prefix + 'median'])} ({_fmt(s[prefix + 'q1'])}–{_fmt(s[prefix + 'q3'])}, "
            f"n={s[prefix + 'n']})")


def table(summaries: list[dict]) -> str:
    """The markdown tables of the printed summary (also written into validation.md)."""
    gd = [s for s in summaries if s["optimizer"] == "gd"]
    adam = [s for s in summaries if s["optimizer"] == "adam"]
    lines = []
    if gd:
        lines += ["Gradient descent, λ_max (Lanczos) against 2/η:", "",
                  "| η | 2/η | steps | λ_max·η/2 at step 0 | peak λ_max·η/2 | first step with λ_max ≥ 0.9·2/η "
                  "| median λ_max·η/2 from then on (quartiles, n) | median λ_max·η/2, second half of the run "
                  "| steps that raised the loss, before / after | loss at that step → end |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in gd:
            lines.append(
                f"| {s['lr']:g} | {s['threshold']:.1f} | {s['steps']} | {s['start_ratio']:.2f} | {s['peak_ratio']:.2f} "
                f"| {_fmt(s['reach'], 'd')} | {_spread(s)} | {_fmt(s['late_median'])} "
                f"| {_fmt(s['rises_before'], '.1%')} / {_fmt(s['rises_after'], '.1%')} "
                f"| {s['loss_at_reach']:.4f} → {s['loss_end']:.4f} |")
        lines += ["", "Gradient descent, critical sharpness λ_c along the step against 2/η:", "",
                  "| η | median λ_c·η/2 before λ_max reached 0.9·2/η | first step with λ_c ≥ 0.9·2/η "
                  "| median λ_c·η/2 from then on (quartiles, n) | median λ_c·η/2, second half of the run "
                  "| failed searches | median relative standard error of λ_c "
                  "| measured steps on which (λ_c > 2/η) = (the step raised the loss) |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in gd:
            lines.append(
                f"| {s['lr']:g} | {_fmt(s['c_before'], '.4f')} | {_fmt(s['c_reach'], 'd')} | {_spread(s, 'c_')} "
                f"| {_fmt(s['c_late_median'])} | {s['c_failed']} | {s['c_rel_se']:.1%} "
                f"| {s['agree']:.1%} of {s['agree_n']} |")
        lines.append("")
    if adam:
        lines += ["Adam, β1 = 0.9: preconditioned sharpness against 38/η:", "",
                  f"| η | 38/η | steps | ratio at step {EVERY} | peak ratio | first step with ratio ≥ 0.9 "
                  "| median ratio from then on (quartiles, n) | median ratio, second half of the run "
                  "| raw λ_max·η/2 from then on (median) | steps that raised the loss, before / after "
                  "| loss at that step → end |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in adam:
            lines.append(
                f"| {s['lr']:g} | {s['threshold']:,.0f} | {s['steps']} | {s['start_ratio']:.3f} | {s['peak_ratio']:.3f} "
                f"| {_fmt(s['reach'], 'd')} | {_spread(s)} | {_fmt(s['late_median'])} "
                f"| {_fmt(s['raw_over_2_lr'], '.3f')} | {_fmt(s['rises_before'], '.1%')} / {_fmt(s['rises_after'], '.1%')} "
                f"| {s['loss_at_reach']:.5f} → {s['loss_end']:.5f} |")
        lines.append("")
    return "\n".join(lines)


def _loss_panel(ax, r: Run, *, first: bool) -> None:
    """The full-batch training loss under a run's sharpness panel (log scale)."""
    ax.plot(np.arange(r.loss.size), r.loss, lw=0.8, color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    if first:
        ax.set_ylabel("training loss (full batch)")


def draw(runs: list[Run], figures: Path) -> list[Path]:
    """One PNG per experiment: a column per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sharpscope.report.png import atomic_write_png

    figures.mkdir(parents=True, exist_ok=True)
    written = []
    gd = [r for r in runs if r.optimizer == "gd"]
    if gd:
        fig, axes = plt.subplots(2, len(gd), figsize=(4.2 * len(gd), 6.0), squeeze=False, sharex="col")
        for j, r in enumerate(gd):
            ax = axes[0, j]
            ax.plot(r.critical_steps, r.critical, ".", ms=1.2, color="tab:orange", alpha=0.5,
                    label=f"λ_c along the step (every {CRITICAL_EVERY} steps)")
            ax.plot(r.measured_steps, r.measure, "-", lw=1.3, color="tab:blue", label="λ_max (Lanczos)")
            ax.axhline(r.threshold, color="k", ls="--", lw=1, label="2/η")
            ax.set_yscale("log")
            ax.set_ylim(top=r.threshold * 3)  # the bottom follows λ_c before the edge
            ax.set_title(f"GD, η = {r.lr:g} (2/η = {r.threshold:.1f})", fontsize=10)
            if j == 0:
                ax.set_ylabel("sharpness")
                ax.legend(fontsize=7, loc="lower right", markerscale=6)
            _loss_panel(axes[1, j], r, first=j == 0)
        fig.tight_layout()
        written.append(atomic_write_png(fig, figures / "validation_gd.png", dpi=100))
    adam = [r for r in runs if r.optimizer == "adam"]
    if adam:
        fig, axes = plt.subplots(2, len(adam), figsize=(4.2 * len(adam), 6.0), squeeze=False, sharex="col")
        for j, r in enumerate(adam):
            ax = axes[0, j]
            ax.plot(r.measured_steps, r.measure, "-", lw=1.3, color="tab:purple", label="preconditioned sharpness")
            ax.axhline(r.threshold, color="k", ls="--", lw=1, label="38/η")
            raw = np.isfinite(r.raw_lambda_max)
            ax.plot(r.measured_steps[raw], r.raw_lambda_max[raw], "o-", ms=2.5, lw=0.8, color="tab:blue",
                    label="raw λ_max")
            ax.axhline(2 / r.lr, color="tab:blue", ls=":", lw=1, label="2/η")
            ax.set_yscale("log")
            ax.set_title(f"Adam, η = {r.lr:g} (38/η = {r.threshold:,.0f})", fontsize=10)
            if j == 0:
                ax.set_ylabel("sharpness")
                ax.legend(fontsize=7, loc="center right")
            _loss_panel(axes[1, j], r, first=j == 0)
        fig.tight_layout()
        written.append(atomic_write_png(fig, figures / "validation_adam.png", dpi=100))
    return written


def update_doc(doc: Path, text: str) -> bool:
    """Replace the table between the markers in ``doc``; False when there are none."""
    if not doc.exists():
        return False
    body = doc.read_text()
    if TABLE_BEGIN not in body or TABLE_END not in body:
        return False
    head, rest = body.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_BEGIN}\n{text}\n{TABLE_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="docs folder: write figures/validation_*.png and the table "
                                                 "in validation.md")
    parser.add_argument("--only", choices=("gd", "adam"), help="run one experiment")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    # make bench runs on machines without scikit-learn: one line, not a traceback, and
    # exit 0 so that the benchmarks after this one still run.
    if importlib.util.find_spec("sklearn") is None:
        print("bench_edge_of_stability: skipped, scikit-learn is not installed (pip install scikit-learn)")
        return 0
    # The matrices are small (1000 x 100): a second thread gains little, and on a shared
    # 2-core machine two threads per process made every step several times slower.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    problem = load_problem(seed=args.seed)
    n_params = sum(p.numel() for p in make_model(problem).parameters())
    print(f"digits: {problem.x.shape[0]} points, MLP 64-{problem.hidden}-{problem.hidden}-10 tanh "
          f"({n_params} parameters), {str(DTYPE).removeprefix('torch.')}, seed {args.seed}")
    runs = []
    if args.only in (None, "gd"):
        for lr, steps in GD_RUNS:
            runs.append(run_gd(problem, lr, steps))
            print(f"  GD   η={lr:<7g} {steps} steps, {runs[-1].seconds:.0f} s", flush=True)
    if args.only in (None, "adam"):
        for lr, steps in ADAM_RUNS:
            runs.append(run_adam(problem, lr, steps))
            print(f"  Adam η={lr:<7g} {steps} steps, {runs[-1].seconds:.0f} s", flush=True)
    summaries = [summarize(r) for r in runs]
    text = table(summaries)
    print()
    print(text)
    for s in summaries:
        label = "λ_max·η/2" if s["optimizer"] == "gd" else "preconditioned·η/38"
        line = f"ratio {label} after reaching (median): {_fmt(s['median'])}   [{s['optimizer']} η={s['lr']:g}]"
        if s["optimizer"] == "gd":
            line += f";  λ_c·η/2: {_fmt(s['c_median'])}"
        print(line)
    if args.out is not None:
        for path in draw(runs, args.out / "figures"):
            print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
        doc = args.out / "validation.md"
        print(f"updated the table in {doc}" if update_doc(doc, text) else f"{doc} has no table markers: not changed")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
