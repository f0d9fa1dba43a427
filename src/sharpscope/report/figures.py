"""The study's figures (matplotlib, Agg backend): one PNG per question, labelled axes.

Each function takes a :class:`~sharpscope.analysis.study.StudyAnalysis` and returns a figure,
or None when the study has nothing to show for it (no schedule runs, no accuracy...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..analysis.runset import ordered, phase_verdict, run_keys, run_labels  # noqa: E402
from ..analysis.summaries import MEASURES, StudyAnalysis, by_model, lr_series  # noqa: E402
from .png import atomic_write_png  # noqa: E402
from ..metrics import (CRITICAL, EVAL_LOSS, LAMBDA_MAX, PRECONDITIONED, TRACE_PER_PARAM, TRAIN_GRAD_NORM,
                       TRAIN_LOSS, TWO_OVER_LR)

DPI = 90


def _colors(n: int):
    return plt.cm.viridis(np.linspace(0.05, 0.9, max(n, 1)))


def _legend(ax, **kw):
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, **kw)


def _size_axis(ax, ylabel: str) -> None:
    """Model size on a log x axis, the layout of every across-scale figure."""
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(ylabel)


def trajectories(a: StudyAnalysis):
    models = by_model(a.scale_runs())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, g in zip(_colors(len(models)), models):
        r = g[0]
        ax.plot(r.t, r.sharpness, color=color, lw=1.1, label=f"{r.run.model}")
        if np.isfinite(r.phases.t_peak):
            ax.axvline(r.phases.t_peak, color=color, lw=0.6, ls=":")
    ax.set_xlabel("training progress t")
    ax.set_ylabel(a.options.metric)
    ax.set_title("Sharpness trajectories by scale (dotted: detected peak)")
    _legend(ax, ncol=2)
    return fig


def loss(a: StudyAnalysis):
    models = by_model(a.scale_runs())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown = False
    for color, g in zip(_colors(len(models)), models):
        t, v = g[0].run.series(TRAIN_LOSS)
        if v.size:
            ax.plot(t, v, color=color, lw=1.1, label=g[0].run.model)
            shown = True
    if not shown:
        plt.close(fig)
        return None
    ax.set_xlabel("training progress t")
    ax.set_ylabel(TRAIN_LOSS)
    ax.set_title("Training loss by scale")
    _legend(ax, ncol=2)
    return fig


def accuracy(a: StudyAnalysis):
    rows = a.tables.get("downstream") or []
    if not rows:
        return None
    tasks = [k for k in rows[0] if k not in ("model", "n_params", "mean_accuracy", "final_sharpness")]
    n = np.array([r["n_params"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, task in zip(_colors(len(tasks)), tasks):
        ax.plot(n, [r[task] for r in rows], "o-", color=color, lw=1, ms=4, label=task)
    ax.plot(n, [r["mean_accuracy"] for r in rows], "ks-", lw=2, label="mean")
    _size_axis(ax, "downstream accuracy")
    ax.set_title("Downstream accuracy by scale")
    _legend(ax, ncol=2)
    return fig


def scaling_law(a: StudyAnalysis):
    law = a.scaling
    fit = law.summary()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    grid = np.logspace(np.log10(law.n_params.min()) - 0.2, np.log10(law.n_params.max()) + 0.2, 100)
    ax.plot(law.n_params, law.values, "ko", label="final sharpness")
    ax.plot(grid, law.loglinear.predict(np.log10(grid)), "C0-",
            label=f"log-linear: {fit.slope:.4f} log10 N + {fit.intercept:.4f} (R² {fit.r2:.4f}, AIC {fit.aic_loglinear:.2f})")
    ax.plot(grid, law.power_predict(grid), "C1--",
            label=f"power law: N^{fit.power_exponent:.4f} (R² {fit.power_r2:.4f}, AIC {fit.aic_power:.2f})")
    _size_axis(ax, f"final {a.options.metric}")
    ax.set_title("Scaling law of final sharpness")
    _legend(ax)
    return fig


def sharpness_gradient(a: StudyAnalysis):
    models = by_model(a.scale_runs())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    shown = False
    for color, g in zip(_colors(len(models)), models):
        r = g[0]
        _, s = r.run.series(a.options.metric)
        _, gn = r.run.series(TRAIN_GRAD_NORM)
        if gn.size == s.size and gn.size:
            ax1.scatter(gn, s, s=5, color=color, label=r.run.model)
            shown = True
    if not shown:
        plt.close(fig)
        return None
    rows = a.tables["correlations"]
    ax2.plot([r["n_params"] for r in rows], [r["r_sharpness_grad_norm"] for r in rows], "o-", label="r(sharpness, grad norm)")
    ax2.plot([r["n_params"] for r in rows], [r["r_sharpness_loss"] for r in rows], "s--", label="r(sharpness, loss)")
    ax1.set_xlabel(TRAIN_GRAD_NORM)
    ax1.set_ylabel(a.options.metric)
    ax1.set_title("Sharpness against gradient norm")
    _size_axis(ax2, "within-run Pearson r")
    ax2.set_title("Coupling by scale")
    _legend(ax1, ncol=2)
    _legend(ax2)
    fig.tight_layout()
    return fig


def sharpness_accuracy(a: StudyAnalysis):
    rows = [r for r in a.tables["scales"] if np.isfinite(r["mean_accuracy"])]
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    s = np.array([r["final_sharpness"] for r in rows])
    acc = np.array([r["mean_accuracy"] for r in rows])
    ax.plot(s, acc, "o")
    for r in rows:
        ax.annotate(r["model"], (r["final_sharpness"], r["mean_accuracy"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    k, b = np.polyfit(s, acc, 1)
    xs = np.linspace(s.min(), s.max(), 10)
    ax.plot(xs, k * xs + b, "C1--", label=f"r = {a.summary['r_final_sharpness_accuracy']:.4f}")
    ax.set_xlabel(f"final {a.options.metric}")
    ax.set_ylabel("mean downstream accuracy")
    ax.set_title("Flatter end, better downstream accuracy?")
    _legend(ax)
    return fig


def ablations(a: StudyAnalysis):
    rows = a.tables.get("ablations") or []
    if not rows:
        return None
    factors = sorted({r["factor"] for r in rows})
    models = sorted({(r["n_params"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.6), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        levels = sorted({r["level"] for r in rows if r["factor"] == factor})
        grid = np.full((len(models), len(levels)), np.nan)
        for r in rows:
            if r["factor"] == factor:
                grid[models.index((r["n_params"], r["model"])), levels.index(r["level"])] = r["peak_to_plateau"]
                mark = "✓" if r["three_phase"] else "✗"
                ax.text(levels.index(r["level"]), models.index((r["n_params"], r["model"])), mark,
                        ha="center", va="center", fontsize=11, color="white" if r["three_phase"] else "red")
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(levels)), [f"{v:g}" for v in levels])
        ax.set_yticks(range(len(models)), [m for _, m in models])
        ax.set_xlabel(factor)
        ax.set_ylabel("model")
        fig.colorbar(im, ax=ax, label="peak / plateau")
    fig.suptitle(f"Ablations: three-phase pattern kept in {a.summary['ablations_preserved']} (✓ kept, ✗ broken)")
    fig.tight_layout()
    return fig


def pac_bayes(a: StudyAnalysis):
    rows = a.tables["pac_bayes"]
    n = [r["n_params"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(n, [r["bound"] for r in rows], "o-", label=f"equation, δ = {rows[0]['delta']:g}, m = {rows[0]['m']:g}")
    ax.plot(n, [r["source_bound"] for r in rows], "s--", label="source's variant: √(S/m)·√(ln N)")
    _size_axis(ax, "PAC-Bayes bound")
    ax.set_title("Sharpness-based PAC-Bayes bound")
    _legend(ax)
    return fig


def measures(a: StudyAnalysis):
    models = by_model(a.scale_runs())
    names = [row["measure"] for row in a.tables.get("measures", [])]
    if len(names) < 2:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for color, g in zip(_colors(len(models)), models):
            t, v = g[0].run.series(MEASURES[name])
            ax.plot(t, v, color=color, lw=1, label=g[0].run.model)
        ax.set_xlabel("training progress t")
        ax.set_ylabel(MEASURES[name])
        row = next(r for r in a.tables["measures"] if r["measure"] == name)
        ax.set_title(f"{name}: slope {row['slope']:.3g}, R² {row['r2']:.3f}", fontsize=10)
    _legend(axes[0][0], ncol=2)
    fig.tight_layout()
    return fig


def schedules(a: StudyAnalysis):
    runs = a.group("schedules")
    if not runs:
        return None
    models = sorted({(r.run.n_params, r.run.model) for r in runs})
    names = sorted({str(r.run.config.get("schedule")) for r in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.8), squeeze=False, sharey=False)
    for ax, (_, model) in zip(axes[0], models):
        for color, name in zip(plt.cm.tab10(np.arange(len(names))), names):
            for r in runs:
                if r.run.model == model and str(r.run.config.get("schedule")) == name:
                    mark = "" if r.phases.preserved else " (broken)"
                    ax.plot(r.t, r.sharpness, color=color, lw=1, label=f"{name}{mark}")
        ax.set_title(model)
        ax.set_xlabel("training progress t")
        ax.set_ylabel(a.options.metric)
        _legend(ax)
    fig.suptitle("Learning-rate schedules")
    fig.tight_layout()
    return fig


def training(a: StudyAnalysis):
    """Measured runs: λ_c against the 2/lr stability line, and the losses."""
    runs = a.group("training")
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for (ax_s, ax_l), r in zip(axes, runs):
        run = r.run
        ax_s.plot(r.t, r.sharpness, ".-", lw=1, ms=3, label="critical sharpness λ_c")
        t_lr, two_over_lr = run.series(TWO_OVER_LR)
        if t_lr.size:
            ax_s.plot(t_lr, two_over_lr, "k--", lw=1, label="2/lr (stability edge of the step)")
        t_max, lam_max = run.series(LAMBDA_MAX)
        if t_max.size:
            ax_s.plot(t_max, lam_max, "s", ms=4, label="λ_max (Lanczos)")
        ax_s.set_yscale("log")
        ax_s.set_xlabel("training progress t")
        ax_s.set_title(f"{run.name} ({run.model})")
        _legend(ax_s)
        t_loss, loss_values = run.series(TRAIN_LOSS)
        ax_l.plot(t_loss, loss_values, lw=1, label=TRAIN_LOSS)
        t_eval, eval_loss = run.series(EVAL_LOSS)
        if t_eval.size:
            ax_l.plot(t_eval, eval_loss, "o-", ms=4, label=EVAL_LOSS)
        ax_l.set_xlabel("training progress t")
        ax_l.set_ylabel("loss (nats/token)")
        _legend(ax_l)
    fig.suptitle("Measured training runs")
    fig.tight_layout()
    return fig


def extrapolation(a: StudyAnalysis):
    law = a.scaling
    rows = a.tables.get("extrapolation")
    if not rows:  # a run report extrapolates only when asked to
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    n_max = max([law.n_params.max()] + [r["n_params"] for r in rows])
    grid = np.logspace(np.log10(law.n_params.min()), np.log10(n_max) + 0.1, 100)
    mean = law.loglinear.predict(np.log10(grid))
    half = 1.96 * law.loglinear.mean_stderr(np.log10(grid))
    ax.plot(law.n_params, law.values, "ko", label="fitted scales")
    ax.plot(grid, mean, "C0-", label="log-linear fit")
    ax.fill_between(grid, mean - half, mean + half, color="C0", alpha=0.2, label="95% interval of the mean")
    ax.errorbar([r["n_params"] for r in rows], [r["predicted"] for r in rows],
                yerr=[[r["predicted"] - r["lower"] for r in rows], [r["upper"] - r["predicted"] for r in rows]],
                fmt="C0s", capsize=3, label="predicted")
    obs = [r for r in rows if np.isfinite(r["observed"])]
    if obs:
        ax.plot([r["n_params"] for r in obs], [r["observed"] for r in obs], "C3^", ms=8, label="observed")
    _size_axis(ax, f"final {a.options.metric}")
    ax.set_title("Extrapolation beyond the fitted scales")
    _legend(ax)
    return fig


def phases(a: StudyAnalysis):
    rows = a.tables["phases"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (key, label) in enumerate((("phase1", "t < 0.2"), ("phase2", "0.2 ≤ t < 0.6"), ("phase3", "t ≥ 0.6"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, [r["model"] for r in rows])
    ax.set_xlabel("model")
    ax.set_ylabel(f"mean {a.options.metric}")
    ax.set_title("Phase means (fixed windows)")
    _legend(ax)
    return fig


FIGURES: dict[str, Callable[[StudyAnalysis], object]] = {
    "trajectories": trajectories, "loss": loss, "accuracy": accuracy, "scaling_law": scaling_law,
    "sharpness_gradient": sharpness_gradient, "sharpness_accuracy": sharpness_accuracy,
    "ablations": ablations, "pac_bayes": pac_bayes, "measures": measures, "schedules": schedules,
    "extrapolation": extrapolation, "phases": phases, "training": training,
}


def write_figures(a: StudyAnalysis, out: Path) -> dict[str, Path]:
    """Render every figure that has data; returns name -> PNG path.

    A run report (``a.kind == "runs"``) has the study's figures only when it fitted across
    sizes (the 'training' figure aside: every run has its own figure there), an overlay of
    the runs when it did not, and one figure per run."""
    folder = Path(out) / "figures"
    written = {}
    study_figures = FIGURES if a.kind == "study" else (
        {k: v for k, v in FIGURES.items() if k != "training"} if a.scaling is not None else {})
    for name, make in study_figures.items():
        fig = make(a)
        if fig is None:
            continue
        written[name] = atomic_write_png(fig, folder / f"{name}.png", DPI)
    if a.kind == "runs":
        if a.scaling is None:
            fig = overlay(a)
            if fig is not None:
                written["overlay"] = atomic_write_png(fig, folder / "overlay.png", DPI)
        for name, fig in run_figures(a):
            written[name] = atomic_write_png(fig, folder / f"{name}.png", DPI)
    return written


# --- run reports ------------------------------------------------------------------------

MEASURE_LABELS = {
    CRITICAL: "critical sharpness λ_c", LAMBDA_MAX: "λ_max (top Hessian eigenvalue)",
    TRACE_PER_PARAM: "tr(H) / P", PRECONDITIONED: "preconditioned λ_max (Adam)",
}
AXIS_LABELS = {CRITICAL: "λ_c", LAMBDA_MAX: "λ_max",
               TRACE_PER_PARAM: "tr(H) / P", PRECONDITIONED: "preconditioned λ_max"}
# Stability lines drawn beside a measure: the step's 2/lr for λ_c and λ_max (gradient
# descent's edge), and Adam's (2 + 2β1)/((1 − β1)·lr) = 38/lr at β1 = 0.9 for the
# preconditioned Hessian. The trace has no such line.
STABILITY_LINES = {
    CRITICAL: (2.0, "2/lr (edge of stability)"),
    LAMBDA_MAX: (2.0, "2/lr"),
    PRECONDITIONED: (38.0, "38/lr (Adam, β1 = 0.9)"),
}


def _sorted(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def _log_if_positive(ax, *arrays) -> None:
    """Log y when every finite value shown is positive: λ_c and 2/lr differ by decades."""
    values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if values.size and np.all(values > 0):
        ax.set_yscale("log")


def _measure_panel(ax, key: str, t: np.ndarray, v: np.ndarray, t_lr: np.ndarray, lr: np.ndarray) -> None:
    t, v = _sorted(t, v)
    ok = np.isfinite(v)
    ax.plot(t[ok], v[ok], ".-", lw=1, ms=4, label=MEASURE_LABELS.get(key, key))
    shown = [v[ok]]
    if key in STABILITY_LINES and t_lr.size:
        factor, label = STABILITY_LINES[key]
        tl, line = _sorted(t_lr, np.where(lr > 0, factor / np.where(lr > 0, lr, 1.0), np.nan))
        keep = np.isfinite(line)
        if keep.any():
            ax.plot(tl[keep], line[keep], "k--", lw=1, label=label)
            shown.append(line[keep])
    if (~ok).any():  # failed measurements: a mark on the time axis, since they have no value
        ax.plot(t[~ok], np.full(int((~ok).sum()), 0.03), "x", color="C3", ms=6,
                transform=ax.get_xaxis_transform(), label=f"failed ({int((~ok).sum())} of {v.size})")
    _log_if_positive(ax, *shown)
    ax.set_ylabel(AXIS_LABELS.get(key, key.split("/", 1)[-1]))
    _legend(ax)


def run_figure(r, label: str, metric: str):
    """One run: every sharpness measure it logs over t (the metric first, with the detected
    phases and the 2/lr line), then its losses. None when it logs neither."""
    run = r.run
    keys = [metric] + [k for k in MEASURE_LABELS if k != metric and np.isfinite(run.series(k)[1]).any()]
    if r.t.size == 0:
        keys = keys[1:]
    t_loss, train_loss = run.series(TRAIN_LOSS)
    t_eval, eval_loss = run.series(EVAL_LOSS)
    has_loss = bool(np.isfinite(train_loss).any() or np.isfinite(eval_loss).any())
    n = len(keys) + has_loss
    if n == 0:
        return None
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 2.3 * n + 0.7), sharex=True, squeeze=False)
    axes = axes[:, 0]
    t_lr, lr = lr_series(run)
    for ax, key in zip(axes, keys):
        t, v = (r.t, r.sharpness) if key == metric else run.series(key)
        _measure_panel(ax, key, t, v, t_lr, lr)
    if keys and keys[0] == metric:
        ax = axes[0]
        ph = r.phases
        if ph.preserved:
            ax.axvline(ph.t_peak, color="C2", lw=0.8, ls=":")
            if np.isfinite(ph.t_plateau):
                ax.axvspan(ph.t_plateau, float(np.nanmax(r.t)), color="C2", alpha=0.08)
        verdict = phase_verdict(r)
        reading = {"yes": "rise, decay, plateau (dotted: peak; shaded: plateau)",
                   "no": f"not three-phase: {ph.reason}", "undecidable": f"undecidable: {ph.reason}"}[verdict]
        ax.set_title(f"three-phase reading: {reading}", fontsize=9)
    if has_loss:
        ax = axes[-1]
        if np.isfinite(train_loss).any():
            ax.plot(*_sorted(t_loss, train_loss), lw=1, label=TRAIN_LOSS)
        if np.isfinite(eval_loss).any():
            ax.plot(*_sorted(t_eval, eval_loss), "o-", ms=3, lw=1, label=EVAL_LOSS)
        ax.set_ylabel("loss")
        _legend(ax)
    axes[-1].set_xlabel("training progress t")
    model = f" ({run.model})" if run.model != label else ""
    fig.suptitle(f"{label}{model}: {run.n_params:,.0f} parameters, group {', '.join(run.groups)}", fontsize=10)
    fig.tight_layout()
    return fig


def run_figures(a: StudyAnalysis):
    """(figure name, figure) of every run of a run report that logs anything to plot."""
    for r, label, key in run_keys(ordered(a.runs)):
        fig = run_figure(r, label, a.options.metric)
        if fig is not None:
            yield f"run-{key}", fig


def overlay(a: StudyAnalysis):
    """Every run's metric on one axis (and losses below): the runs side by side when there
    are too few sizes to fit across them."""
    runs = [(r, label) for r, label in zip(ordered(a.runs), run_labels(ordered(a.runs)))
            if np.isfinite(r.sharpness).any()]
    if len(runs) < 2:
        return None
    losses = [(r, label, *r.run.series(TRAIN_LOSS)) for r, label in runs]
    has_loss = any(np.isfinite(v).any() for *_, v in losses)
    fig, axes = plt.subplots(1 + has_loss, 1, figsize=(7.5, 3.4 * (1 + has_loss)), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for color, (r, label) in zip(_colors(len(runs)), runs):
        t, v = _sorted(r.t, r.sharpness)
        ok = np.isfinite(v)
        ax.plot(t[ok], v[ok], ".-", color=color, lw=1, ms=3, label=label)
    _log_if_positive(ax, *[r.sharpness for r, _ in runs])
    ax.set_ylabel(a.options.metric)
    ax.set_title("The runs side by side")
    _legend(ax)
    if has_loss:
        ax2 = axes[1, 0]
        for color, (r, label, t, v) in zip(_colors(len(runs)), losses):
            if np.isfinite(v).any():
                ax2.plot(*_sorted(t, v), color=color, lw=1, label=label)
        ax2.set_ylabel(TRAIN_LOSS)
        _legend(ax2)
    axes[-1, 0].set_xlabel("training progress t")
    fig.tight_layout()
    return fig
