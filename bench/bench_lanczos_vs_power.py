"""Claim: to reach λ_max within 1e-3 relative, Lanczos needs at least 3x fewer
Hessian-vector products than power iteration, on the same model and batch.

The model is the small byte-level GPT, snapshotted every 50 steps of one 600-step AdamW
run (warmup + cosine) on the standard library's source; every snapshot is measured on the
same 16x64 batch. How many products power iteration needs depends on the spectral gap
λ₂/λ₁ at that point of training (its error shrinks like (λ₂/λ₁)^2k), so the table prints
the gap beside each count, and the claim is judged on the cost of tracking λ_max along
the run: the total products over all snapshots.

Two counts per method and snapshot:

* "to 1e-3": products until the running estimate stays within 1e-3 of the reference
  (Lanczos to a 1e-10 residual), an oracle count;
* "own stop": products used when each method stops by its own rule at tol 1e-3 (Lanczos:
  its bound on the eigenvalue error, min-gap based, ≤ tol·|θ| and the top Ritz value
  settled; power iteration: the Rayleigh quotient changed by ≤ tol), with whether that
  answer is really within 1e-3.

Wall time is measured for the oracle counts (the same operator, graph kept once).
"""

import statistics
import time

import torch

from _small_gpt import batch_at, describe, loss_fn, small_gpt, stdlib_corpus, train
from sharpscope.curvature import HessianOperator, lanczos, power_iteration

TOL = 1e-3
STEPS, EVERY = 600, 50
POWER_CAP = 1000


def products_to_reach(history, reference):
    """First index after which every estimate is within TOL of the reference (1-based)."""
    count = None
    for i, value in enumerate(history, start=1):
        if abs(value - reference) <= TOL * abs(reference):
            count = count or i
        else:
            count = None
    return count


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model, batch):
    with HessianOperator(model, loss_fn, [batch]) as op:
        ref = lanczos(op.matvec, op.params, 2, tol=1e-10, max_iter=300)
        reference, second = ref.values
        # Run each well past 1e-3 (to a 1e-8 change or error bound), so that the count of
        # products after which the estimate stays within 1e-3 is read off its history.
        lz = lanczos(op.matvec, op.params, 1, tol=1e-8, max_iter=150)
        pw = power_iteration(op.matvec, op.params, tol=1e-8, max_iter=POWER_CAP)
        n_lz = products_to_reach(lz.history, reference)
        n_pw = products_to_reach(pw.history, reference) or POWER_CAP
        t_lz = timed(lambda: lanczos(op.matvec, op.params, 1, tol=0.0, max_iter=n_lz))
        t_pw = timed(lambda: power_iteration(op.matvec, op.params, tol=0.0, max_iter=n_pw))
        own_lz = lanczos(op.matvec, op.params, 1, tol=TOL, max_iter=300)
        own_pw = power_iteration(op.matvec, op.params, tol=TOL, max_iter=POWER_CAP)
    ok = lambda r: abs(r.values[0] - reference) <= TOL * abs(reference)  # noqa: E731
    return {
        "lambda": reference, "gap": second / reference, "n_lz": n_lz, "n_pw": n_pw,
        "t_lz": t_lz, "t_pw": t_pw, "own_lz": own_lz.matvecs, "own_pw": own_pw.matvecs,
        "own_lz_ok": ok(own_lz), "own_pw_ok": ok(own_pw),
    }


def main() -> None:
    tokens = stdlib_corpus()
    model = small_gpt()
    batch = batch_at(tokens, torch.Generator().manual_seed(7), batch=16)
    snapshots = {0: {k: v.clone() for k, v in model.state_dict().items()}}

    def on_step(step, opt, do_step):
        do_step()
        if (step + 1) % EVERY == 0:
            snapshots[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}

    train(model, tokens, STEPS, on_step=on_step)
    print(describe(model) + f"; {STEPS} AdamW steps, λ_max every {EVERY} steps on one fixed batch")
    print(" step   λ_max    λ₂/λ₁ | to 1e-3: Lanczos power ratio | own stop at 1e-3: Lanczos power (answer within 1e-3)")
    rows = []
    for step, state in snapshots.items():
        model.load_state_dict(state)
        r = measure(model, batch)
        rows.append(r)
        capped = "≥" if r["n_pw"] == POWER_CAP else " "
        print(f"{step:5d} {r['lambda']:8.3f}  {r['gap']:6.3f} | {r['n_lz']:14d} {capped}{r['n_pw']:5d} {r['n_pw'] / r['n_lz']:5.1f} |"
              f" {r['own_lz']:24d} ({'yes' if r['own_lz_ok'] else 'NO '}) {r['own_pw']:5d} ({'yes' if r['own_pw_ok'] else 'NO'})")
    ratios = [r["n_pw"] / r["n_lz"] for r in rows]
    total_lz, total_pw = sum(r["n_lz"] for r in rows), sum(r["n_pw"] for r in rows)
    t_lz, t_pw = sum(r["t_lz"] for r in rows), sum(r["t_pw"] for r in rows)
    wrong_pw = sum(not r["own_pw_ok"] for r in rows)
    wrong_lz = sum(not r["own_lz_ok"] for r in rows)
    print(f"per snapshot: median ratio {statistics.median(ratios):.1f}, range {min(ratios):.1f}–{max(ratios):.1f}; "
          f"ratio ≥ 3 at {sum(x >= 3 for x in ratios)}/{len(ratios)} snapshots")
    print(f"own stopping rules: Lanczos {sum(r['own_lz'] for r in rows)} products ({wrong_lz} answers off by > 1e-3), "
          f"power {sum(r['own_pw'] for r in rows)} ({wrong_pw} answers off by > 1e-3)")
    print(f"tracking λ_max over the run to 1e-3: power / Lanczos = {total_pw} / {total_lz} products "
          f"= ratio {total_pw / total_lz:.1f} (claim ≥ 3); wall time {t_pw:.1f} s / {t_lz:.1f} s = ratio {t_pw / t_lz:.1f}")


if __name__ == "__main__":
    main()
