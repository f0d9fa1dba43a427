"""The data-mix advisor's numbers (pure Python, no torch): a line search's outcome as a
curve value, where two curves over α cross and the recommendation that follows, and the
validation fine-tunes' scores and Pareto front. ``sharpscope.experiments.mix`` measures
the curves and runs the fine-tunes; this module only reads their rows."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = ["curve_value", "find_crossings", "crossing_summary", "trade_off"]


def curve_value(sharpness: float | None, status: str) -> float:
    """The value a line-search outcome takes on a curve: 2/η_c when bracketed, +∞ when the
    loss rises for every step ("not_descent"), 0 when it never rises ("no_increase"), NaN
    otherwise (a zero direction)."""
    if sharpness is not None and math.isfinite(sharpness):
        return float(sharpness)
    if status == "not_descent":
        return math.inf
    if status == "no_increase":
        return 0.0
    return math.nan


def find_crossings(alphas: Sequence[float], first: Sequence[float], second: Sequence[float]) -> list[dict[str, Any]]:
    """Where the curve ``first`` crosses ``second`` (both over ascending ``alphas``).

    The difference δ(α) = first − second is formed where both values are known (NaN points
    are skipped; ∞ − ∞ is unknown). A crossing is a grid point where δ = 0 ("at_grid"), or
    a pair of consecutive known points where δ changes sign: then α* = α_i + (α_j − α_i)·
    δ_i/(δ_i − δ_j), linear interpolation ("interpolated"). When one end of the pair is
    infinite (a "not a descent direction" point) the interpolation's limit, the finite end,
    is taken ("at_finite_end"); when both are, the midpoint ("midpoint"). ``direction`` is
    "rising" when ``first`` goes from below ``second`` to above it, else "falling".
    """
    if not (len(alphas) == len(first) == len(second)):
        raise ValueError("alphas and the two curves must have the same length")
    known = []
    for a, f, s in zip(alphas, first, second):
        f = math.nan if f is None else float(f)
        s = math.nan if s is None else float(s)
        delta = f - s
        if not math.isnan(delta):
            known.append((float(a), delta))
    crossings: list[dict[str, Any]] = []
    for i, (a, delta) in enumerate(known):
        if delta == 0:
            before = known[i - 1][1] if i > 0 else None
            after = known[i + 1][1] if i + 1 < len(known) else None
            direction = "rising" if (before is not None and before < 0) or (after is not None and after > 0) \
                else "falling"
            crossings.append({"alpha": a, "between": [a, a], "kind": "at_grid", "direction": direction})
    for (a0, d0), (a1, d1) in zip(known, known[1:]):
        if d0 == 0 or d1 == 0 or (d0 < 0) == (d1 < 0):
            continue
        if math.isinf(d0) and math.isinf(d1):
            alpha, kind = 0.5 * (a0 + a1), "midpoint"
        elif math.isinf(d0):
            alpha, kind = a1, "at_finite_end"
        elif math.isinf(d1):
            alpha, kind = a0, "at_finite_end"
        else:
            alpha, kind = a0 + (a1 - a0) * d0 / (d0 - d1), "interpolated"
        crossings.append({"alpha": alpha, "between": [a0, a1], "kind": kind,
                          "direction": "rising" if d0 < 0 else "falling"})
    crossings.sort(key=lambda c: c["alpha"])
    return crossings


def crossing_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The crossings of λ_FT and λ_PT in sweep rows, the recommended α and a sentence."""
    alphas = [r["alpha"] for r in rows]
    ft = [r["lambda_finetune"] for r in rows]
    pt = [r["lambda_pretrain"] for r in rows]
    crossings = find_crossings(alphas, ft, pt)
    if crossings:
        best = crossings[0]
        note = (f"the curves cross at α = {best['alpha']:.3f} ({best['kind'].replace('_', ' ')} between "
                f"α = {best['between'][0]:g} and {best['between'][1]:g}); λ_c of the fine-tuning loss is "
                f"{'below' if best['direction'] == 'rising' else 'above'} the relative λ_c of the pretraining "
                "loss at smaller α")
        if len(crossings) > 1:
            where = ", ".join(f"{c['alpha']:.3f}" for c in crossings)
            note += f"; they cross {len(crossings)} times in all (at α = {where}), the first is recommended"
        return {"crossings": crossings, "recommended_alpha": best["alpha"], "crosses": True, "note": note}
    pairs = [(a, f, s) for a, f, s in zip(alphas, ft, pt) if f is not None and s is not None
             and math.isfinite(f) and math.isfinite(s) and f > 0 and s > 0]
    closest = min(pairs, key=lambda p: abs(math.log(p[1] / p[2])))[0] if pairs else None
    signs = {(f - s) > 0 for _, f, s in zip(alphas, ft, pt)
             if f is not None and s is not None and not math.isnan(f - s)}
    if signs == {True}:
        side = "λ_c of the fine-tuning loss stays above the relative λ_c of the pretraining loss at every α"
    elif signs == {False}:
        side = "λ_c of the fine-tuning loss stays below the relative λ_c of the pretraining loss at every α"
    else:
        side = "too few α have both values measured"
    note = f"the curves do not cross in [{min(alphas):g}, {max(alphas):g}]: {side}"
    if closest is not None:
        note += f"; they come closest (in ratio) at α = {closest:g}"
    return {"crossings": [], "recommended_alpha": None, "crosses": False, "closest_alpha": closest, "note": note}


def trade_off(rows: list[dict[str, Any]], retention_weight: float = 1.0) -> dict[str, Any]:
    """Scores and Pareto front of validation rows (each with ``alpha``, ``gain``,
    ``retention_loss`` and ``recommended``), in place; returns the verdict.

    score = gain − w·retention loss. A row is on the Pareto front when no other row has a
    retention loss as low and a gain as high with at least one strictly better. NaN rows
    (diverged) are on neither.
    """
    for r in rows:
        g, rl = r["gain"], r["retention_loss"]
        r["score"] = g - retention_weight * rl if math.isfinite(g) and math.isfinite(rl) else math.nan
    finite = [r for r in rows if math.isfinite(r["score"])]
    for r in rows:
        r["pareto"] = math.isfinite(r["score"]) and not any(
            o is not r and o["retention_loss"] <= r["retention_loss"] and o["gain"] >= r["gain"]
            and (o["retention_loss"] < r["retention_loss"] or o["gain"] > r["gain"]) for o in finite)
    ranked = sorted(finite, key=lambda r: -r["score"])
    rank_of = {id(r): i + 1 for i, r in enumerate(ranked)}
    for r in rows:
        r["rank"] = rank_of.get(id(r))
    best = ranked[0] if ranked else None
    rec = next((r for r in rows if r.get("recommended")), None)
    verdict: dict[str, Any] = {
        "criterion": (f"score(α) = gain − {retention_weight:g}·retention loss, where gain = fine-tuning validation "
                      "loss before − after and retention loss = pretraining validation loss after − before "
                      "(nats per token); the best α has the highest score. Pareto front: the α that no other "
                      "validated α beats on both (lower retention loss and higher gain)."),
        "retention_weight": retention_weight,
        "best_alpha": best["alpha"] if best else None,
        "best_score": best["score"] if best else None,
        "pareto_alphas": [r["alpha"] for r in rows if r["pareto"]],
        "recommended_alpha": rec["alpha"] if rec else None,
    }
    if rec is None:
        verdict.update(recommended_is_best=None, recommended_on_pareto=None, recommended_rank=None,
                       recommended_regret=None,
                       statement="no recommendation to check (the curves do not cross); "
                                 f"the best validated α is {_alpha_text(verdict['best_alpha'])}")
        return verdict
    is_best = best is not None and rec is best
    regret = best["score"] - rec["score"] if best is not None and math.isfinite(rec["score"]) else math.nan
    verdict.update(recommended_is_best=is_best, recommended_on_pareto=bool(rec["pareto"]),
                   recommended_rank=rec["rank"], recommended_regret=regret)
    if is_best:
        statement = f"the recommended α = {rec['alpha']:.3f} has the best score of the {len(finite)} validated α"
    else:
        statement = (f"the recommended α = {rec['alpha']:.3f} ranks {rec['rank'] or '-'} of {len(finite)} by score "
                     f"(best: α = {_alpha_text(verdict['best_alpha'])}, score higher by {regret:.4g})")
    statement += "; it is " + ("on" if rec["pareto"] else "not on") + " the Pareto front"
    verdict["statement"] = statement
    return verdict


def _alpha_text(alpha: float | None) -> str:
    return "none" if alpha is None else f"{alpha:.3f}"
