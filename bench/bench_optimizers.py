"""Claims: a step of SAM costs ≤ 2.1× an AdamW step on the same model and batch;
Functional-SAM ≤ 1.05× SAM; preconditioning adds ≤ 5%; Nexus with K inner steps costs
≤ 1.1× K-step gradient accumulation (the same K micro-batches); the extra memory of the
two-pass optimizers is at most about one copy of the parameters.

A byte-level GPT (4 layers, width 128, batch 16×64) on the standard library's source.
Step times: every optimizer on its own copy of the model in one process, their steps
interleaved round-robin, so that a slow spell of the machine hits all of them alike
(median over REPEATS rounds after a warm-up). Memory: each optimizer again in its own
process; the growth of its peak resident set over the AdamW process is the optimizer's
extra memory on CPU.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPEATS = 15
BATCH, INNER = 16, 4
METHODS = ("adamw", "sam", "functional-sam", "precond-sam", "precond-functional-sam", "angle-sam",
           "accumulation", "nexus", "nexus-no-agreement")


def _setup():
    sys.path.insert(0, HERE)
    from _small_gpt import BLOCK, batch_at, stdlib_corpus

    from sharpscope.training.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=BLOCK, n_layer=4, n_head=4, d_model=128))
    tokens = stdlib_corpus(400_000)
    gen = torch.Generator().manual_seed(3)
    return model, tokens, gen, batch_at


def _make_step(method, model, tokens, gen, batch_at):
    from sharpscope import optim
    from sharpscope.training.trainer import lm_logits_and_loss, lm_loss

    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if method in ("adamw", "accumulation"):
        opt = torch.optim.AdamW(model.parameters(), **kwargs)
    elif method.startswith("nexus"):
        opt = optim.Nexus(model.parameters(), torch.optim.AdamW, inner_steps=INNER, inner_lr=0.01, model=model,
                          track_agreement=method == "nexus", **kwargs)
    else:
        cls = {"sam": optim.SAM, "precond-sam": optim.SAM, "functional-sam": optim.FunctionalSAM,
               "precond-functional-sam": optim.FunctionalSAM, "angle-sam": optim.AngleSAM}[method]
        opt = cls(model.parameters(), torch.optim.AdamW, rho=0.05, precondition=method.startswith("precond"),
                  model=model, **kwargs)

    def step():
        if method == "adamw":
            batch = batch_at(tokens, gen, BATCH)
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batch).backward()
            opt.step()
        elif method == "accumulation":
            opt.zero_grad(set_to_none=True)
            for _ in range(INNER):
                (lm_loss(model, batch_at(tokens, gen, BATCH // INNER)) / INNER).backward()
            opt.step()
        elif method.startswith("nexus"):
            opt.step(lambda: lm_logits_and_loss(model, batch_at(tokens, gen, BATCH // INNER)))
        else:
            batch = batch_at(tokens, gen, BATCH)
            opt.step(lambda: lm_logits_and_loss(model, batch))

    def held_mb() -> float:
        origin = getattr(opt, "_origin", None) or []
        return (sum(t.numel() * t.element_size() for t in origin) + getattr(opt, "logit_grad_bytes", 0)) / 2**20

    step.held_mb = held_mb
    return step


def worker(method: str) -> dict:
    """In a child process: a few steps of one optimizer, then the peak resident set."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tokens, gen, batch_at = _setup()
    step = _make_step(method, model, tokens, gen, batch_at)
    for _ in range(4):
        step()
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    # What the optimizer itself holds beyond AdamW: θ's copy and (functional variants) ∂L/∂z.
    held = getattr(step, "held_mb", lambda: 0.0)()
    return {"held_mb": held, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "param_mb": param_mb, "n_params": sum(p.numel() for p in model.parameters())}


def interleaved_times() -> dict[str, float]:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    steps = {}
    for method in METHODS:
        model, tokens, gen, batch_at = _setup()
        steps[method] = _make_step(method, model, tokens, gen, batch_at)
    times = {method: [] for method in METHODS}
    for round_ in range(REPEATS + 2):
        for method in METHODS:
            t0 = time.perf_counter()
            steps[method]()
            if round_ >= 2:  # two warm-up rounds
                times[method].append(time.perf_counter() - t0)
    return {method: statistics.median(ts) for method, ts in times.items()}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
        return
    results = {}
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--worker", method], capture_output=True, text=True, check=True)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    for method, seconds in interleaved_times().items():
        results[method]["seconds"] = seconds
    base = results["adamw"]
    print(f"GPT 4 layers, width 128, {base['n_params']:,} parameters ({base['param_mb']:.1f} MB), batch {BATCH}x64; "
          f"median of {REPEATS} interleaved rounds; memory with each optimizer in its own process")
    for method in METHODS:
        r = results[method]
        print(f"{method:24s} {r['seconds'] * 1e3:7.1f} ms/step   x{r['seconds'] / base['seconds']:.2f} AdamW   "
              f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb'] - base['peak_rss_mb']:+.0f} MB vs AdamW), "
              f"held by the optimizer beyond its base {r['held_mb']:.1f} MB")
    t = {m: results[m]["seconds"] for m in METHODS}
    print(f"SAM / AdamW = {t['sam'] / t['adamw']:.2f} (claim ≤ 2.1)")
    print(f"Functional-SAM / SAM = {t['functional-sam'] / t['sam']:.3f} (claim ≤ 1.05)")
    print(f"preconditioning: Precond-SAM / SAM = {t['precond-sam'] / t['sam']:.3f}, "
          f"Precond-Functional-SAM / Functional-SAM = {t['precond-functional-sam'] / t['functional-sam']:.3f} "
          "(claim ≤ 1.05)")
    print(f"Angle-SAM (3 passes) / SAM = {t['angle-sam'] / t['sam']:.2f}")
    print(f"Nexus K={INNER} / {INNER}-step accumulation = {t['nexus'] / t['accumulation']:.3f} with the agreement "
          f"cosine, {t['nexus-no-agreement'] / t['accumulation']:.3f} without (claim ≤ 1.1)")
    extra = max(results[m]["peak_rss_mb"] for m in METHODS) - base["peak_rss_mb"]
    print(f"largest extra peak memory over AdamW = {extra:.0f} MB; one copy of the parameters = "
          f"{base['param_mb']:.1f} MB (RSS is page-granular and includes allocator slack)")


if __name__ == "__main__":
    main()
