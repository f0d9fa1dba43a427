"""The data-mix advisor's section of the measured study's report (from STUDY/mix/mix.json).

``render(study_dir, out)`` returns None when the study has no data-mix analysis, else the
section's HTML body and its figures {name: png}, copied into ``out/figures/`` (redrawn
from mix.json when the PNGs are missing).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runs import atomic_write_bytes
from .html import figure_html, table_html

FIGURES = ("mix_sweep", "mix_validation")
CAPTIONS = {
    "mix_sweep": ("Critical sharpness of the fine-tuning loss and relative critical sharpness of the pretraining "
                  "loss along the optimizer's update direction d_α on the mixed batch, against the pretraining "
                  "fraction α; the dashed line marks where they cross (the recommended α). ▲: not a descent "
                  "direction (λ_c = ∞)."),
    "mix_validation": ("Short fine-tunes from the checkpoint at several α: gain (fine-tuning validation loss "
                       "before − after), retention loss (pretraining validation loss after − before) and the "
                       "score; right, the trade-off plane with the Pareto front, the best α and the "
                       "recommendation."),
}


def _value(value: Any, status: str | None = None) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "∞ (not descent)" if value > 0 else value
    if value == 0.0 and status == "no_increase":
        return "0 (no increase)"
    return value


def _sweep_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"α": r["alpha"], "pretraining rows": f"{r['n_pretrain']}/{r['n_pretrain'] + r['n_finetune']}",
             "λ_c fine-tuning": _value(r["lambda_finetune"], r["status_finetune"]),
             "status FT": r["status_finetune"],
             "relative λ_c pretraining": _value(r["lambda_pretrain"], r["status_pretrain"]),
             "status PT": r["status_pretrain"], "probe loss FT": r["loss_finetune"],
             "probe loss PT": r["loss_pretrain"]} for r in result["sweep"]]


def _validation_rows(validation: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"α": r["alpha"], "recommended": r["recommended"], "status": r["status"], "gain": r["gain"],
             "retention loss": r["retention_loss"], "score": r["score"], "rank": r["rank"], "Pareto": r["pareto"],
             "PT loss after": r["pretrain_loss_after"], "FT loss after": r["finetune_loss_after"]}
            for r in validation["rows"]]


def _figures(result: dict[str, Any], mix_dir: Path, out: Path) -> dict[str, Path]:
    from .mix_figures import draw_sweep_figure, draw_validation_figure

    figures: dict[str, Path] = {}
    for name, draw in zip(FIGURES, (draw_sweep_figure, draw_validation_figure)):
        source = mix_dir / "figures" / f"{name}.png"
        target = Path(out) / "figures" / f"{name}.png"
        if source.is_file():
            atomic_write_bytes(target, source.read_bytes())
            figures[name] = target
        elif draw(result, target) is not None:
            figures[name] = target
    return figures


def render(study_dir: Path, out: Path) -> tuple[str, dict[str, Path]] | None:
    """(HTML body, {figure name: png}) of STUDY/mix/mix.json, or None when it is absent."""
    mix_dir = Path(study_dir) / "mix"
    if not (mix_dir / "mix.json").is_file():
        return None
    from ..experiments.mix import read_result

    try:
        result = read_result(mix_dir)
    except UserError as exc:
        return f"<p class='note'>The data-mix analysis could not be read: {html.escape(str(exc))}</p>", {}
    figures = _figures(result, mix_dir, out)
    crossing = result["crossing"]
    rec = result.get("recommended_alpha")
    cfg = result.get("config", {})
    parts = [
        "<p>The data-mix advisor sweeps the pretraining fraction α of a fine-tuning batch at the checkpoint "
        f"<code>{html.escape(str(result['checkpoint']))}</code> (step {result['step']}): pretraining data "
        f"<b>{html.escape(' + '.join(result['pretrain']))}</b>, fine-tuning data <b>{html.escape(result['finetune'])}</b>. "
        f"For each α the run's own optimizer ({html.escape(str(result.get('direction_optimizer')))}, "
        f"{'a fresh state' if result.get('moments') == 'fresh' else 'its state restored from the checkpoint'}) "
        "gives the update direction d_α on a mixed batch of "
        f"{cfg.get('batch_size', '?')} sequences; λ_c of the fine-tuning loss and the relative λ_c of the "
        "pretraining loss are measured along d_α on fixed probe batches.</p>",
        f"<p><b>{'Recommended α = ' + format(rec, '.3f') if rec is not None else 'No recommendation'}</b>: "
        f"{html.escape(crossing['note'])}.</p>",
    ]
    if "mix_sweep" in figures:
        parts.append(figure_html("mix_sweep", figures["mix_sweep"], CAPTIONS["mix_sweep"]))
    parts.append(table_html(_sweep_rows(result)))
    validation = result.get("validation")
    if validation:
        parts.append(f"<h3>Validation: {validation['steps']} fine-tuning steps per α at lr {validation['lr']:.3g}</h3>")
        parts.append(f"<p>Criterion: {html.escape(validation['criterion'])}</p>")
        parts.append(f"<p><b>Verdict</b>: {html.escape(validation['statement'])}.</p>")
        if "mix_validation" in figures:
            parts.append(figure_html("mix_validation", figures["mix_validation"], CAPTIONS["mix_validation"]))
        parts.append(table_html(_validation_rows(validation)))
    else:
        parts.append("<p class='note'>No validation fine-tunes were run (validate = false).</p>")
    return "\n".join(parts), figures
