"""The data-mix advisor's figures (matplotlib, Agg): the sweep's two curves against α and
the validation fine-tunes' trade-off. Drawn from a result dict as mix.json holds it, so the
report can redraw a missing PNG; ``write_mix_figures`` is what ``sharpscope mix`` and the
study hand to the advisor to draw its files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..analysis.mix import curve_value
from .png import atomic_write_png

__all__ = ["draw_sweep_figure", "draw_validation_figure", "write_mix_figures", "SWEEP_FIGURE", "VALIDATION_FIGURE"]

SWEEP_FIGURE = "mix_sweep"
VALIDATION_FIGURE = "mix_validation"
FIGURES_DIR = "figures"
DPI = 90


def write_mix_figures(result: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """out/figures/mix_sweep.png and, when the result has validation rows,
    out/figures/mix_validation.png; returns {"sweep_figure": path, "validation_figure": path}."""
    out = Path(out)
    paths = {"sweep_figure": draw_sweep_figure(result, out / FIGURES_DIR / f"{SWEEP_FIGURE}.png")}
    if result.get("validation"):
        fig = draw_validation_figure(result, out / FIGURES_DIR / f"{VALIDATION_FIGURE}.png")
        if fig is not None:
            paths["validation_figure"] = fig
    return paths


def _curve_for_plot(values: Sequence[float | None], statuses: Sequence[str]) -> list[float]:
    return [curve_value(v, s) for v, s in zip(values, statuses)]


def draw_sweep_figure(result: Mapping[str, Any], path: Path) -> Path:
    """Both curves against α on a log axis, the crossing marked (from a result dict as
    written to mix.json); infinite values (not a descent direction) are drawn as ▲ at the
    top edge, zeros (no increase) as ▼ at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["sweep"]
    alphas = np.array([r["alpha"] for r in rows], dtype=float)
    curves = [
        ("finetune", f"λ_c of the fine-tuning loss ({result['finetune']})", "#1f77b4"),
        ("pretrain", f"relative λ_c of the pretraining loss ({', '.join(result['pretrain'])})", "#d62728"),
    ]
    values = {key: np.array(_curve_for_plot([r[f"lambda_{key}"] for r in rows],
                                            [r[f"status_{key}"] for r in rows]), dtype=float)
              for key, _, _ in curves}
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in values.values()])
    lr = result.get("lr")
    if lr:
        finite = np.append(finite, 2.0 / lr)
    lo, hi = (finite.min(), finite.max()) if finite.size else (1.0, 10.0)
    top, bottom = hi * 2.0, lo / 2.0
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    labelled: set[str] = set()

    def once(text: str) -> str:  # each marker kind in the legend once
        if text in labelled:
            return "_nolegend_"
        labelled.add(text)
        return text

    for key, label, color in curves:
        v = values[key]
        shown = np.where(np.isfinite(v) & (v > 0), v, np.nan)
        ax.plot(alphas, shown, "o-", color=color, lw=1.4, ms=4, label=label)
        inf = np.isinf(v)
        if inf.any():
            ax.plot(alphas[inf], np.full(inf.sum(), top), "^", color=color, ms=8, ls="none",
                    label=once("not a descent direction (λ_c = ∞)"))
        zero = v == 0
        if zero.any():
            ax.plot(alphas[zero], np.full(zero.sum(), bottom), "v", color=color, ms=8, ls="none",
                    label=once("no increase found (λ_c ≈ 0)"))
    if lr:
        ax.axhline(2.0 / lr, color="0.5", lw=0.8, ls=":", label=f"2/lr (lr = {lr:.3g}, the run's at the checkpoint)")
    rec = result["crossing"].get("recommended_alpha")
    for c in result["crossing"].get("crossings", []):
        ax.axvline(c["alpha"], color="0.2", lw=1.0, ls="--",
                   label=f"crossing α = {c['alpha']:.3f}" + (" (recommended)" if c["alpha"] == rec else ""))
        at = _value_at(alphas, values["finetune"], c["alpha"])
        if at is not None:
            ax.plot([c["alpha"]], [at], "o", ms=10, mfc="none", mec="0.2", mew=1.5)
    ax.set_yscale("log")
    ax.set_ylim(bottom / 1.5, top * 1.5)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("pretraining fraction α of the fine-tuning batch")
    ax.set_ylabel("critical sharpness λ_c = 2/η_c along d_α")
    title = "Data-mix sweep: " + (f"recommended α = {rec:.3f}" if rec is not None else "the curves do not cross")
    ax.set_title(title)
    ax.legend(fontsize=7.5, loc="best")
    ax.grid(alpha=0.25, which="both")
    return atomic_write_png(fig, path, DPI)


def _value_at(alphas, values, alpha: float) -> float | None:
    """Linear interpolation of a curve at ``alpha`` between its two grid neighbours, when
    both are finite and positive (where the crossing is drawn)."""
    for a0, a1, v0, v1 in zip(alphas, alphas[1:], values, values[1:]):
        if a0 <= alpha <= a1:
            if not (math.isfinite(v0) and math.isfinite(v1) and v0 > 0 and v1 > 0):
                return None
            return float(v0 if a1 == a0 else v0 + (v1 - v0) * (alpha - a0) / (a1 - a0))
    return None


def draw_validation_figure(result: Mapping[str, Any], path: Path) -> Path | None:
    """Left: gain, retention loss and score against α. Right: the trade-off plane
    (retention loss, gain) with the Pareto front, the best α and the recommendation."""
    validation = result.get("validation")
    if not validation or not validation.get("rows"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in validation["rows"] if r.get("gain") is not None and r.get("retention_loss") is not None]
    if not rows:
        return None
    a = np.array([r["alpha"] for r in rows], dtype=float)
    gain = np.array([r["gain"] for r in rows], dtype=float)
    ret = np.array([r["retention_loss"] for r in rows], dtype=float)
    score = np.array([r["score"] if r.get("score") is not None else np.nan for r in rows], dtype=float)
    w = validation.get("retention_weight", 1.0)
    rec = validation.get("recommended_alpha")
    best = validation.get("best_alpha")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    left.plot(a, gain, "o-", color="#1f77b4", label="gain (fine-tuning loss before − after)")
    left.plot(a, ret, "s-", color="#d62728", label="retention loss (pretraining loss after − before)")
    left.plot(a, score, "d--", color="#2ca02c", label=f"score = gain − {w:g}·retention loss")
    left.axhline(0, color="0.6", lw=0.6)
    if rec is not None:
        left.axvline(rec, color="0.2", ls="--", lw=1.0, label=f"recommended α = {rec:.3f} (crossing)")
    if best is not None:
        i = int(np.nanargmax(score))
        left.plot([a[i]], [score[i]], "*", color="#2ca02c", ms=14, label=f"best score: α = {best:.3f}")
    left.set_xlabel("pretraining fraction α")
    left.set_ylabel("validation loss change (nats/token)")
    left.set_title(f"Validation fine-tunes ({validation.get('steps')} steps, lr {validation.get('lr'):.3g})")
    left.legend(fontsize=7.5)
    left.grid(alpha=0.25)

    pareto = sorted((r["retention_loss"], r["gain"]) for r in rows if r.get("pareto"))
    if pareto:
        right.plot([p[0] for p in pareto], [p[1] for p in pareto], "-", color="0.6", lw=2, zorder=1,
                   label="Pareto front")
    right.scatter(ret, gain, c=a, cmap="viridis", vmin=0, vmax=1, s=40, zorder=2)
    for i, r in enumerate(rows):  # labels alternate above and below: close points stay readable
        right.annotate(f"α={r['alpha']:.2f}", (r["retention_loss"], r["gain"]), textcoords="offset points",
                       xytext=(5, 4 if i % 2 == 0 else -11), fontsize=7.5)
    if rec is not None:
        rr = next((r for r in rows if r.get("recommended")), None)
        if rr is not None:
            right.scatter([rr["retention_loss"]], [rr["gain"]], s=180, facecolors="none", edgecolors="#d62728",
                          lw=1.8, zorder=3, label=f"recommended α = {rec:.3f}")
    if best is not None and validation.get("best_score") is not None:
        i = int(np.nanargmax(score))
        right.scatter([ret[i]], [gain[i]], marker="*", s=160, color="#2ca02c", zorder=4,
                      label=f"best score α = {best:.3f}")
        xs = np.linspace(np.nanmin(ret), np.nanmax(ret), 2) if np.nanmax(ret) > np.nanmin(ret) else ret[i] + np.array([-0.01, 0.01])
        right.plot(xs, validation["best_score"] + w * xs, ":", color="#2ca02c", lw=1,
                   label="equal score through the best")
    right.set_xlabel("retention loss: pretraining loss after − before (lower is better)")
    right.set_ylabel("gain: fine-tuning loss before − after (higher is better)")
    right.set_title("Trade-off (colour: α)")
    right.legend(fontsize=7.5)
    right.grid(alpha=0.25)
    fig.tight_layout()
    return atomic_write_png(fig, path, DPI)
