"""Side by side: the simulated study's claims against a measured study's, one row per claim.

Both sides are ``summary.json`` files written by the analysis (``summary["claims"]``), so
the comparison never recomputes anything: it lines the two up and, for the two schedule
claims whose verdict is a comparison by nature, decides it here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .verdicts import FAILS, HOLDS, UNCLEAR, fraction_verdict

DEFAULT_NOISE_CV = 0.05
"""Relative spread of final sharpness assumed when the measured study has one seed."""


def load_summary(path: str | Path) -> dict[str, Any]:
    """summary.json of a report directory (or the file itself)."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"'{path}' has no summary.json; pass a report directory written by "
                        "sharpscope analyze, simulate or study (or a study directory of runs)")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is not valid JSON ({exc}); re-run the analysis that wrote it") from None
    if not isinstance(summary, dict) or "claims" not in summary:
        raise UserError(f"{file} has no claims; it was written by an older sharpscope: re-run sharpscope analyze")
    return summary


def _schedule_pattern(sim: dict, measured: dict) -> tuple[float, str, str, int]:
    a = sim.get("details", {}).get("preserved", {})
    b = measured.get("details", {}).get("preserved", {})
    common = sorted(k for k in set(a) & set(b) if a[k] is not None and b[k] is not None)
    if not common:
        return math.nan, UNCLEAR, "no schedule × scale cell in common", 0
    match = [(a[k] >= 0.5) == (b[k] >= 0.5) for k in common]
    share = float(np.mean(match))
    verdict = HOLDS if share >= 0.8 else FAILS if share <= 0.5 else UNCLEAR
    differ = [k for k, m in zip(common, match) if not m]
    text = f"{sum(match)}/{len(common)} cells match" + (f"; differ: {', '.join(differ)}" if differ else "")
    return share, verdict, text, len(common)


def _schedule_final(sim: dict, measured: dict) -> tuple[float, str, str, int]:
    a = sim.get("details", {}).get("ratio", {})
    b = measured.get("details", {}).get("ratio", {})
    noise = measured.get("details", {}).get("noise_cv")
    noise = DEFAULT_NOISE_CV if noise is None or not math.isfinite(noise) else noise
    informative, agree, notes = 0, 0, []
    for key in sorted(set(a) & set(b)):
        sa, sb = a[key], b[key]
        if sa is None or sb is None or not (math.isfinite(sa) and math.isfinite(sb)):
            continue
        if abs(sb - 1) < 2 * noise:  # within the seed-to-seed spread: says nothing
            notes.append(f"{key} {sb:.3f} (within noise)")
            continue
        informative += 1
        same = np.sign(sa - 1) == np.sign(sb - 1)
        agree += bool(same)
        notes.append(f"{key} {sb:.3f} vs sim {sa:.3f}{'' if same else ' (opposite)'}")
    if informative == 0:
        return math.nan, UNCLEAR, f"no cell beyond 2× the seed spread ({noise:.1%}); " + "; ".join(notes), 0
    verdict = fraction_verdict(agree, informative)
    return agree / informative, verdict, f"{agree}/{informative} informative cells in the simulated direction " \
                                         f"(noise {noise:.1%}): " + "; ".join(notes), informative


def compare_summaries(sim: dict[str, Any], measured: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim: the simulated and the measured statistic and verdict, and the
    measured study's verdict on the claim."""
    sim_claims, meas_claims = sim.get("claims", {}), measured.get("claims", {})
    rows = []
    for key in list(sim_claims) + [k for k in meas_claims if k not in sim_claims]:
        s, m = sim_claims.get(key), meas_claims.get(key)
        ref = s or m
        row = {"claim": key, "statement": ref["claim"], "statistic": ref["statistic"],
               "simulated": s["summary"] if s else "not in the simulated study",
               "simulated_value": s["value"] if s else None, "simulated_verdict": s["verdict"] if s else "",
               "measured": m["summary"] if m else "not in the measured study",
               "measured_value": m["value"] if m else None}
        if s and m and key == "schedule_pattern":
            value, verdict, text, _ = _schedule_pattern(s, m)
            row.update(measured=f"{text}", measured_value=value)
        elif s and m and key == "schedule_final":
            value, verdict, text, _ = _schedule_final(s, m)
            row.update(measured=text, measured_value=value)
        else:
            verdict = m["verdict"] if m else UNCLEAR
        row["verdict"] = verdict
        row["p_value"] = m.get("p_value") if m else None
        rows.append(row)
    return rows


def verdict_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {v: sum(r["verdict"] == v for r in rows) for v in (HOLDS, FAILS, UNCLEAR)}


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """One small table per claim (what the issue calls 'one table per claim')."""
    out = []
    for r in rows:
        out.append(f"### {r['claim']}: {r['verdict']}\n\n{r['statement']}\n\n"
                   f"| | statistic | value | verdict |\n|---|---|---|---|\n"
                   f"| simulated | {r['simulated']} | {_num(r['simulated_value'])} | {r['simulated_verdict']} |\n"
                   f"| measured | {r['measured']} | {_num(r['measured_value'])} | {r['verdict']} |\n\n"
                   f"Test: {r['statistic']}.\n")
    return "\n".join(out)


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)
