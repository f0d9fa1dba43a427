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
from ..analysis.summaries import MEASURES, StudyAnalysis, by_model  # noqa: E402
from ..sizes import size_label  # noqa: E402
from .curves import (LOSS_LABEL, STABILITY_LINES, T_LABEL, marks_present, scale_axis, sharpness_label,  # noqa: E402
                     stability_line, style_legend, trajectory)
from .png import atomic_write_png  # noqa: E402
from ..metrics import (CRITICAL, DESCENT_PROBE, DESCENT_STEP, EVAL_LOSS, LAMBDA_MAX, PRECONDITIONED,
                       TRACE_PER_PARAM, TRAIN_GRAD_NORM, TRAIN_LOSS)

DPI = 90


def _colors(n: int):
    return plt.cm.viridis(np.linspace(0.05, 0.9, max(n, 1)))


def _legend(ax, **kw):
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**{"fontsize": 8, **kw})


def _size_axis(ax, ylabel: str) -> None:
    """Model size on a log x axis, the layout of every across-scale figure."""
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(ylabel)


def _size_name(g) -> str:
    """A model's legend entry: its label and its size in parameters."""
    r = g[0].run
    size = f"{size_label(r.n_params)} params"
    seeds = f", {len(g)} seeds" if len(g) > 1 else ""
    return f"{size}{seeds}" if r.model in (size_label(r.n_params), size) else f"{r.model} ({size}{seeds})"


def sharpness_by_group(ax, groups, names, colors, a: StudyAnalysis, *, title: str, own_lines: bool = False) -> None:
    """Runs in groups (sizes, schedules) on one axis: per run its trajectory (curves.py)
    in its group's colour and its stability line (black, or the group's colour when
    ``own_lines``: schedules differ in exactly that line), a legend of the groups and one
    of the marks."""
    metric = a.options.metric
    shown, lines = [], []
    row = 0
    for color, g, name in zip(colors, groups, names):
        for i, r in enumerate(g):
            shown.append(trajectory(ax, r, color=color, label=name if i == 0 else None,
                                    statistic=a.options.final_statistic, row=row))
            lines.append(stability_line(ax, r.run, metric, color=color if own_lines else "k", label="_stability"))
            row += 1
    scale_axis(ax, *shown, *lines)
    nd, failed = marks_present([r for g in groups for r in g])
    has_line = any(v.size for v in lines)
    style_legend(ax, stability=STABILITY_LINES[metric][1] if has_line else None, has_not_descent=nd,
                 has_failed=failed, eta_space=any(r.eta is not None for g in groups for r in g))
    handles = [h for h, lab in zip(*ax.get_legend_handles_labels()) if not lab.startswith("_")]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", framealpha=0.85)
    ax.set_xlabel(T_LABEL)
    ax.set_ylabel(sharpness_label(metric))
    ax.set_title(title, fontsize=10)


def trajectories(a: StudyAnalysis):
    """The central figure: sharpness over training at each size."""
    models = by_model(a.scale_runs())
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    sharpness_by_group(ax, models, [_size_name(g) for g in models], _colors(len(models)), a,
                       title="Sharpness over training by model size")
    return fig


def loss(a: StudyAnalysis):
    models = by_model(a.scale_runs())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown = False
    for color, g in zip(_colors(len(models)), models):
        t, v = g[0].run.series(TRAIN_LOSS)
        if v.size:
            ax.plot(t, v, color=color, lw=1.1, label=_size_name(g))
            shown = True
    if not shown:
        plt.close(fig)
        return None
    ax.set_xlabel(T_LABEL)
    ax.set_ylabel(f"training {LOSS_LABEL}")
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
    _size_axis(ax, f"final {sharpness_label(a.options.metric)}")
    ax.set_title("Scaling law of final sharpness")
    _legend(ax)
    return fig


def sharpness_gradient(a: StudyAnalysis):
    models = by_model(a.scale_runs())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    shown = False
    values, uphill = [], 0
    for color, g in zip(_colors(len(models)), models):
        for i, r in enumerate(g):
            t_s, s = r.run.series(a.options.metric)
            t_g, gn = r.run.series(TRAIN_GRAD_NORM)
            _, i_s, i_g = np.intersect1d(t_s, t_g, return_indices=True)
            s, gn = s[i_s], gn[i_g]
            keep = np.isfinite(s) & np.isfinite(gn)
            if keep.any():
                ax1.scatter(gn[keep], s[keep], s=6, alpha=0.5, color=color, label=_size_name(g) if i == 0 else None)
                values.append(s[keep])
                shown = True
            if r.eta is not None:
                uphill += int((r.eta.eta == 0).sum())
    if not shown:
        plt.close(fig)
        return None
    scale_axis(ax1, *values)
    if uphill:  # no silent gaps: λ_c = ∞ has no place on the axis
        ax1.text(0.99, 0.02, f"{uphill} uphill updates (λ_c = ∞) not shown", transform=ax1.transAxes,
                 ha="right", va="bottom", fontsize=7, color="0.3")
    rows = a.tables["correlations"]
    ax2.plot([r["n_params"] for r in rows], [r["r_sharpness_grad_norm"] for r in rows], "o-", label="r(sharpness, grad norm)")
    ax2.plot([r["n_params"] for r in rows], [r["r_sharpness_loss"] for r in rows], "s--", label="r(sharpness, loss)")
    ax1.set_xlabel("gradient norm ‖g‖ (train/grad_norm)")
    ax1.set_ylabel(sharpness_label(a.options.metric))
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
    ax.set_xlabel(f"final {sharpness_label(a.options.metric)}")
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
        key, shown = MEASURES[name], []
        for color, g in zip(_colors(len(models)), models):
            for i, r in enumerate(g):
                label = _size_name(g) if i == 0 else None
                if key == a.options.metric:
                    shown.append(trajectory(ax, r, color=color, label=label, statistic=a.options.final_statistic))
                    continue
                t, v = r.run.series(key)
                t, v = t[np.isfinite(v)], v[np.isfinite(v)]
                ax.plot(t, v, "o-", color=color, lw=1, ms=3, label=label)
                shown.append(v)
        scale_axis(ax, *shown)
        ax.set_xlabel(T_LABEL)
        ax.set_ylabel(sharpness_label(key))
        row = next(r for r in a.tables["measures"] if r["measure"] == name)
        ax.set_title(f"{name}: slope {row['slope']:.3g}, R² {row['r2']:.3f}", fontsize=10)
    _legend(axes[0][0], fontsize=7)
    fig.tight_layout()
    return fig


def schedules(a: StudyAnalysis):
    runs = a.group("schedules")
    if not runs:
        return None
    models = sorted({(r.run.n_params, r.run.model) for r in runs})
    names = sorted({str(r.run.config.get("schedule")) for r in runs})
    fig, axes = plt.subplots(len(models), 1, figsize=(8.5, 4.2 * len(models)), squeeze=False)
    for ax, (n_params, model) in zip(axes[:, 0], models):
        groups, labels = [], []
        for name in names:
            g = [r for r in runs if r.run.model == model and str(r.run.config.get("schedule")) == name]
            groups.append(g)
            labels.append(f"{name}" + ("" if all(r.phases.preserved for r in g) else " (not three-phase)"))
        size = f"{size_label(n_params)} parameters"
        sharpness_by_group(ax, groups, labels, plt.cm.tab10(np.arange(len(names))), a, own_lines=True,
                           title=(size if model == size_label(n_params) else f"{model} ({size})")
                           + ": each schedule's own stability line dashed in its colour")
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
        shown = [trajectory(ax_s, r, color="C0", label="critical sharpness λ_c",
                            statistic=a.options.final_statistic)]
        shown.append(stability_line(ax_s, run, CRITICAL))
        t_max, lam_max = run.series(LAMBDA_MAX)
        if np.isfinite(lam_max).any():
            ax_s.plot(t_max, lam_max, "s", color="C3", ms=4, label="λ_max (Lanczos)")
            shown.append(lam_max)
        scale_axis(ax_s, *shown)
        nd, failed = marks_present([r])
        style_legend(ax_s, stability=None, has_not_descent=nd, has_failed=failed, eta_space=r.eta is not None)
        ax_s.legend(fontsize=7, loc="upper left")
        ax_s.set_xlabel(T_LABEL)
        ax_s.set_ylabel(sharpness_label(CRITICAL))
        ax_s.set_title(f"{run.name} ({run.model})")
        t_loss, loss_values = run.series(TRAIN_LOSS)
        ax_l.plot(t_loss, loss_values, lw=1, label=TRAIN_LOSS)
        t_eval, eval_loss = run.series(EVAL_LOSS)
        if t_eval.size:
            ax_l.plot(t_eval, eval_loss, "o-", ms=4, label=EVAL_LOSS)
        ax_l.set_xlabel(T_LABEL)
        ax_l.set_ylabel(LOSS_LABEL)
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
    _size_axis(ax, f"final {sharpness_label(a.options.metric)}")
    ax.set_title("Extrapolation beyond the fitted scales")
    _legend(ax)
    return fig


def phases(a: StudyAnalysis):
    rows = a.tables["phases"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    values = []
    for i, (key, label) in enumerate((("phase1", "t < 0.2"), ("phase2", "0.2 ≤ t < 0.6"), ("phase3", "t ≥ 0.6"))):
        v = np.array([r[key] for r in rows], dtype=float)
        ax.bar(x + (i - 1) * 0.27, np.where(np.isfinite(v), v, 0.0), width=0.27, label=label)
        for j in np.flatnonzero(~np.isfinite(v)):  # no silent gaps: say why a bar is missing
            ax.text(x[j] + (i - 1) * 0.27, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        values.append(v)
    scale_axis(ax, *values)
    if ax.get_yscale() != "log":
        ax.set_ylim(bottom=0)
    ax.set_xticks(x, [r["model"] for r in rows])
    ax.set_xlabel("model (parameters)")
    eta = any(r.eta is not None for r in a.runs)
    ax.set_ylabel(f"{sharpness_label(a.options.metric)}" + (", 2/⟨η_c⟩ over the window" if eta else ", mean"))
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


def _sorted(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def _measure_panel(ax, key: str, run, t: np.ndarray, v: np.ndarray) -> None:
    """A measure other than the analysed metric (few exact measurements: points joined),
    against its stability line; failed values marked on the time axis."""
    t, v = _sorted(t, v)
    ok = np.isfinite(v)
    ax.plot(t[ok], v[ok], "o-", lw=1, ms=3, label=MEASURE_LABELS.get(key, key))
    shown = [v[ok], stability_line(ax, run, key)]
    if (~ok).any():  # failed measurements: a mark on the time axis, since they have no value
        ax.plot(t[~ok], np.full(int((~ok).sum()), 0.03), "x", color="C3", ms=6,
                transform=ax.get_xaxis_transform(), label=f"failed ({int((~ok).sum())} of {v.size})")
    scale_axis(ax, *shown)
    ax.set_ylabel(sharpness_label(key), fontsize=8)
    _legend(ax, loc="upper left")


def _metric_panel(ax, r, metric: str, statistic: str) -> None:
    """The analysed metric: its trajectory (curves.py) against its stability line."""
    shown = [trajectory(ax, r, color="C0", label=MEASURE_LABELS.get(metric, metric), statistic=statistic),
             stability_line(ax, r.run, metric)]
    scale_axis(ax, *shown)
    nd, failed = marks_present([r])
    style_legend(ax, stability=None, has_not_descent=nd, has_failed=failed, eta_space=r.eta is not None)
    _legend(ax, loc="upper left")
    ax.set_ylabel(sharpness_label(metric), fontsize=8)


def _descent_panel(ax, run) -> bool:
    """gᵀd/‖d‖ on the step's batch and on the probe, where the run logs them: an uphill
    update (not_descent) is one whose probe value is ≤ 0."""
    drawn = False
    for key, label, style in ((DESCENT_STEP, "on the step's batch", "o-"), (DESCENT_PROBE, "on the probe", "s-")):
        t, v = run.series(key)
        if np.isfinite(v).any():
            ax.plot(*_sorted(t[np.isfinite(v)], v[np.isfinite(v)]), style, lw=0.8, ms=2.5, label=label)
            drawn = True
    if drawn:
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylabel("descent gᵀd/‖d‖", fontsize=8)
        _legend(ax, loc="upper right")
    return drawn


def run_figure(r, label: str, metric: str, statistic: str = "mean"):
    """One run: every sharpness measure it logs over t (the metric first, with the detected
    phases and its stability line), the descent of its updates where logged, then its
    losses. None when it logs none of them."""
    run = r.run
    keys = [metric] + [k for k in MEASURE_LABELS if k != metric and np.isfinite(run.series(k)[1]).any()]
    if r.t.size == 0 and r.eta is None:
        keys = keys[1:]
    t_loss, train_loss = run.series(TRAIN_LOSS)
    t_eval, eval_loss = run.series(EVAL_LOSS)
    has_loss = bool(np.isfinite(train_loss).any() or np.isfinite(eval_loss).any())
    has_descent = any(np.isfinite(run.series(k)[1]).any() for k in (DESCENT_STEP, DESCENT_PROBE))
    n = len(keys) + has_descent + has_loss
    if n == 0:
        return None
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.5 * n + 0.8), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, key in zip(axes, keys):
        if key == metric:
            _metric_panel(ax, r, metric, statistic)
        else:
            _measure_panel(ax, key, run, *run.series(key))
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
    if has_descent:
        _descent_panel(axes[len(keys)], run)
    if has_loss:
        ax = axes[-1]
        if np.isfinite(train_loss).any():
            ax.plot(*_sorted(t_loss, train_loss), lw=1, label=TRAIN_LOSS)
        if np.isfinite(eval_loss).any():
            ax.plot(*_sorted(t_eval, eval_loss), "o-", ms=3, lw=1, label=EVAL_LOSS)
        ax.set_ylabel(LOSS_LABEL, fontsize=8)
        _legend(ax)
    axes[-1].set_xlabel(T_LABEL)
    model = f" ({run.model})" if run.model != label else ""
    fig.suptitle(f"{label}{model}: {run.n_params:,.0f} parameters, group {', '.join(run.groups)}", fontsize=10)
    fig.tight_layout()
    return fig


def run_figures(a: StudyAnalysis):
    """(figure name, figure) of every run of a run report that logs anything to plot."""
    for r, label, key in run_keys(ordered(a.runs)):
        fig = run_figure(r, label, a.options.metric, a.options.final_statistic)
        if fig is not None:
            yield f"run-{key}", fig


def overlay(a: StudyAnalysis):
    """Every run's metric on one axis (and losses below): the runs side by side when there
    are too few sizes to fit across them."""
    runs = [(r, label) for r, label in zip(ordered(a.runs), run_labels(ordered(a.runs)))
            if np.isfinite(r.sharpness).any() or (r.eta is not None and r.eta.used.any())]
    if len(runs) < 2:
        return None
    losses = [(r, label, *r.run.series(TRAIN_LOSS)) for r, label in runs]
    has_loss = any(np.isfinite(v).any() for *_, v in losses)
    fig, axes = plt.subplots(1 + has_loss, 1, figsize=(8.5, 3.8 * (1 + has_loss)), sharex=True, squeeze=False)
    sharpness_by_group(axes[0, 0], [[r] for r, _ in runs], [label for _, label in runs], _colors(len(runs)), a,
                       title="The runs side by side")
    if has_loss:
        ax2 = axes[1, 0]
        for color, (r, label, t, v) in zip(_colors(len(runs)), losses):
            if np.isfinite(v).any():
                ax2.plot(*_sorted(t, v), color=color, lw=1, label=label)
        ax2.set_ylabel(f"training {LOSS_LABEL}")
        _legend(ax2)
    axes[-1, 0].set_xlabel(T_LABEL)
    fig.tight_layout()
    return fig
