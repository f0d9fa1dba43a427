"""The Nexus diagnostics' figures (matplotlib, Agg), drawn from the nexus.json record:
gradient cosine over training, loss along the segments between per-source fine-tunes, and
distances/barriers per pair. ``write_nexus_figures`` is what the study hands to the Nexus
diagnostics to draw STUDY/nexus/figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..analysis.nexus import MEAN
from .png import atomic_write_png

__all__ = ["write_nexus_figures", "FIGURES"]

COLORS = {"adamw": "#1f77b4", "nexus": "#d62728"}
LABELS = {"adamw": "AdamW", "nexus": "Nexus"}
FIGURES = ("grad_cosine", "segments", "distances")


def write_nexus_figures(record: dict[str, Any], nexus_dir: Path, *, only_missing: bool = False) -> dict[str, Path]:
    """figures/grad_cosine.png, figures/segments.png and figures/distances.png (matplotlib,
    Agg, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = nexus_dir / "figures"
    makers = {"grad_cosine": _grad_cosine_figure, "segments": _segments_figure, "distances": _distances_figure}
    out = {}
    for name in FIGURES:
        path = folder / f"{name}.png"
        out[name] = path
        if only_missing and path.is_file() and path.stat().st_size > 0:
            continue
        atomic_write_png(makers[name](plt, record), path)
    return out


def _nan(values):
    return [math.nan if v is None else v for v in values]


def _grad_cosine_figure(plt, record):
    runs = record["runs"]
    keys = sorted({k for r in runs.values() for k in r["grad_cosine"] if k not in ("step", "t", MEAN)})
    panels = [MEAN, *keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], panels):
        for name, r in runs.items():
            series = r["grad_cosine"]
            if key in series:
                ax.plot(series["step"], _nan(series[key]), marker="o", ms=3, color=COLORS[name], label=LABELS[name])
            ax.axvline(r["checkpoint_step"], color=COLORS[name], ls=":", lw=1)
        ax.axhline(0, color="#999", lw=0.6)
        ax.set_title("mean over pairs" if key == MEAN else key.replace("~", " vs "), fontsize=10)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("cos(g_a, g_b), validation batches")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Cross-source gradient cosine over training (dotted: checkpoint at matched loss)", fontsize=10)
    fig.tight_layout()
    return fig


def _segments_figure(plt, record):
    runs = record["runs"]
    pairs = sorted({k for r in runs.values() for k in r["minima"]["segments"]})
    fig, axes = plt.subplots(2, len(pairs), figsize=(3.8 * len(pairs), 6.4), squeeze=False)
    for col, pair in enumerate(pairs):
        a, b = pair.split("~")
        for name, r in runs.items():
            m = r["minima"]
            if pair not in m["segments"]:
                continue
            curves = m["segments"][pair]
            barrier = m["barrier"][pair][MEAN]
            axes[0][col].plot(m["tau"], _nan(curves[MEAN]), marker="o", ms=3, color=COLORS[name],
                              label=f"{LABELS[name]} (barrier {barrier:.3g})")
            axes[0][col].axhline(m["losses"]["theta0"][MEAN], color=COLORS[name], ls=":", lw=1,
                                 label=f"{LABELS[name]} θ_0")
            axes[1][col].plot(m["tau"], _nan(curves[a]), color=COLORS[name], label=f"{LABELS[name]}: {a}")
            axes[1][col].plot(m["tau"], _nan(curves[b]), color=COLORS[name], ls="--", label=f"{LABELS[name]}: {b}")
        axes[0][col].set_title(f"θ_{a} (τ=0) → θ_{b} (τ=1)", fontsize=10)
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=7)
        axes[1][col].set_xlabel("τ")
    axes[0][0].set_ylabel("mean validation loss over sources\n(dotted: at θ_0)")
    axes[1][0].set_ylabel("validation loss of the two ends' sources")
    fig.suptitle("Loss along the segment between two per-source fine-tunes", fontsize=10)
    fig.tight_layout()
    return fig


def _bars(ax, groups: list[str], values: dict[str, list[float]], title: str) -> None:
    width = 0.8 / max(len(values), 1)
    for i, (name, vals) in enumerate(values.items()):
        xs = [j + (i - (len(values) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, _nan(vals), width=width, color=COLORS[name], label=LABELS[name])
    ax.axhline(0, color="#999", lw=0.6)
    finite = [v for vals in values.values() for v in vals if v is not None and math.isfinite(v)]
    if finite and all(v == 0 for v in finite):
        ax.text(0.5, 0.7, "0 for every pair", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                color="#555")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace("~", "\nvs ") for g in groups], fontsize=8)
    ax.set_title(title, fontsize=10)


def _distances_figure(plt, record):
    runs = record["runs"]
    pairs = sorted({k for r in runs.values() for k in r["minima"]["distance"]})
    sources = sorted({k for r in runs.values() for k in r["minima"]["displacement"]})
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    _bars(axes[0], pairs, {n: [r["minima"]["relative_distance"].get(p) for p in pairs] for n, r in runs.items()},
          "‖θ_a − θ_b‖ / ‖θ_0‖")
    _bars(axes[1], sources, {n: [r["minima"]["relative_displacement"].get(s) for s in sources]
                             for n, r in runs.items()}, "fine-tune displacement ‖θ_s − θ_0‖ / ‖θ_0‖")
    _bars(axes[2], pairs, {n: [r["minima"]["barrier"].get(p, {}).get(MEAN) for p in pairs] for n, r in runs.items()},
          "barrier: max − mean of ends (mean loss)")
    _bars(axes[3], pairs, {n: [r["minima"].get("barrier_linear", {}).get(p, {}).get(MEAN) for p in pairs]
                           for n, r in runs.items()}, "rise above the chord (mean loss)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Per-source minima at matched pretraining loss", fontsize=10)
    fig.tight_layout()
    return fig
