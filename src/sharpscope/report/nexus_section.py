"""The study report's Nexus section: AdamW against Nexus at matched pretraining loss, from
STUDY/nexus/nexus.json (written by ``sharpscope.experiments.nexus``)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runs import atomic_write_bytes
from .html import figure_html, table_html

NEXUS_FILE = ("nexus", "nexus.json")
LABELS = {"adamw": "AdamW", "nexus": "Nexus"}
CAPTIONS = {
    "grad_cosine": "Cosine between per-source gradients on the validation batches over training, per pair and "
                   "their mean (dotted: the checkpoints compared at matched loss).",
    "segments": "Validation loss along the straight line from one per-source fine-tune (τ = 0) to another (τ = 1), "
                "from the matched-loss checkpoints: top, the mean over sources; bottom, the two end sources' own losses.",
    "distances": "Distance between per-source fine-tunes and each fine-tune's displacement, relative to ‖θ_0‖; "
                 "on the mean loss along each segment, the barrier (maximum minus the mean of the ends) and the "
                 "rise above the chord between the ends.",
}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ratio(a: Any, b: Any) -> float:
    try:
        return float(a) / float(b)
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(record["runs"][name]["minima"], dict) for name in LABELS):
            raise KeyError("runs")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a Nexus diagnostics record; delete it and re-run the study to rewrite it") from None
    return record


def render(study_dir: Path, out: Path) -> tuple[str, dict[str, Path]] | None:
    """(HTML body, {figure name: PNG under out/figures}) of the Nexus diagnostics, or None
    when the study has none (no nexus/nexus.json)."""
    study_dir, out = Path(study_dir), Path(out)
    path = study_dir.joinpath(*NEXUS_FILE)
    if not path.is_file():
        return None
    record = _read(path)
    runs = record["runs"]
    figures: dict[str, Path] = {}
    for name, relative in (record.get("figures") or {}).items():
        source = path.parent / relative
        if source.is_file() and source.stat().st_size > 0:
            target = out / "figures" / f"nexus_{name}.png"
            atomic_write_bytes(target, source.read_bytes())
            figures[f"nexus_{name}"] = target

    adamw, nexus = runs["adamw"], runs["nexus"]
    parts = [
        "<p>One AdamW and one Nexus run of the same model on the same sources and token budget "
        f"({html.escape(', '.join(adamw['minima']['sources']))}; {adamw['steps']} steps, "
        f"{_fmt(adamw.get('n_params'))} parameters). The claim tested: at the same pretraining loss, the minima "
        "of the individual sources lie closer together after Nexus than after AdamW.</p>",
        f"<p><b>Matched loss.</b> {html.escape(record['rule'])}. Final validation losses: AdamW "
        f"{_fmt(record['final_loss']['adamw'])}, Nexus {_fmt(record['final_loss']['nexus'])}; target "
        f"{_fmt(record['target_loss'])}. Checkpoints used: AdamW step {adamw['checkpoint_step']} "
        f"(eval/loss {_fmt(adamw['checkpoint_loss'])}), Nexus step {nexus['checkpoint_step']} "
        f"(eval/loss {_fmt(nexus['checkpoint_loss'])}).</p>",
    ]
    settings = adamw["minima"]["settings"]
    parts.append(
        f"<p class='note'>Per-source fine-tunes from each checkpoint: {settings['steps']} steps of "
        f"{html.escape(settings['optimizer'])}, lr {_fmt(settings['lr'])}, batch {settings['batch_size']}, "
        f"weight decay {_fmt(settings['weight_decay'])}, seed {settings['seed']}; the same for both runs. "
        "Distances are Euclidean over all parameters, relative to ‖θ_0‖; the barrier is the maximum loss along "
        "the segment minus the mean of its two ends (on the mean over sources); 'rise above chord' is the "
        "maximum of the loss minus the straight line between the ends. Gradient cosines: mean over the "
        "evaluations with 0 &lt; t ≤ 1/3 (early) and t &gt; 2/3 (late), and at the checkpoint.</p>")
    summary = []
    for name, r in runs.items():
        m = r["minima"]
        summary.append({
            "optimizer": LABELS.get(name, name), "checkpoint step": r["checkpoint_step"],
            "eval/loss at checkpoint": r["checkpoint_loss"],
            "mean ‖θ_a−θ_b‖/‖θ_0‖": m["mean_relative_distance"],
            "mean barrier": m["mean_barrier"],
            "mean rise above chord": m.get("mean_barrier_linear"),
            "grad cosine early": r["grad_cosine_early"], "grad cosine late": r["grad_cosine_late"],
            "grad cosine at checkpoint": r["grad_cosine_at_checkpoint"],
        })
    parts.append(table_html(summary))
    ratio = _ratio(nexus["minima"]["mean_relative_distance"], adamw["minima"]["mean_relative_distance"])
    parts.append(
        f"<p>Nexus / AdamW, mean relative distance between per-source fine-tunes: <b>{_fmt(ratio, 3)}</b> "
        "(below 1 is what the claim predicts); mean cosine between the fine-tunes' displacements: AdamW "
        f"{_fmt(_mean(adamw['minima']['displacement_cosine'].values()))}, Nexus "
        f"{_fmt(_mean(nexus['minima']['displacement_cosine'].values()))} (higher: the sources pull the same way). "
        "One run per optimizer: no uncertainty estimate.</p>")
    pairs = sorted(set(adamw["minima"]["distance"]) | set(nexus["minima"]["distance"]))
    pair_rows = []
    for pair in pairs:
        row: dict[str, Any] = {"pair": pair.replace("~", " vs ")}
        for name, r in runs.items():
            m, label = r["minima"], LABELS.get(name, name)
            row[f"{label} ‖θ_a−θ_b‖"] = m["distance"].get(pair)
            row[f"{label} relative"] = m["relative_distance"].get(pair)
            row[f"{label} cos(displacements)"] = m["displacement_cosine"].get(pair)
            row[f"{label} barrier"] = m["barrier"].get(pair, {}).get("mean")
            row[f"{label} rise above chord"] = m.get("barrier_linear", {}).get(pair, {}).get("mean")
        pair_rows.append(row)
    parts.append("<h3>Per pair of sources</h3>" + table_html(pair_rows))
    source_rows = []
    for source in adamw["minima"]["sources"]:
        row = {"source": source}
        for name, r in runs.items():
            m, label = r["minima"], LABELS.get(name, name)
            row[f"{label} ‖θ_s−θ_0‖/‖θ_0‖"] = m["relative_displacement"].get(source)
            row[f"{label} own loss θ_0 → θ_s"] = (f"{_fmt(m['losses']['theta0'].get(source))} → "
                                                 f"{_fmt(m['losses'].get(source, {}).get(source))}")
        source_rows.append(row)
    parts.append("<h3>Per-source fine-tunes</h3>" + table_html(source_rows))
    if "inner_cosine_early" in nexus:
        parts.append(f"<p class='note'>Nexus's own inner-step agreement (optim/inner_cosine): early "
                     f"{_fmt(nexus['inner_cosine_early'])}, late {_fmt(nexus['inner_cosine_late'])}.</p>")
    for name in ("grad_cosine", "segments", "distances"):
        key = f"nexus_{name}"
        if key in figures:
            parts.append(figure_html(key, figures[key], CAPTIONS[name]))
    parts.append("<p class='note'>Limits: one seed per optimizer, small models and short runs; the fine-tunes are "
                 "short probes of where each source pulls the model, not converged minima; the matching is only as "
                 "fine as the evaluation cadence. See docs/optimizers.md, 'Diagnostics: gradient agreement and minima "
                 "distance'.</p>")
    return "\n".join(parts), figures
