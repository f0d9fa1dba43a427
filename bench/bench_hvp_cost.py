"""Claim: one Hessian-vector product costs at most 3x one gradient (forward + backward).

On the small byte-level GPT (batch 16x64), times a gradient and one H·v with each
method: "reuse" (first-order graph kept, one backward per product; the cost per product
once the graph exists, plus the one-off graph build), "double" (fresh forward + double
backward) and "jvp" (forward-over-reverse). Peak memory is printed per method: on CUDA
from torch.cuda.max_memory_allocated, on CPU as the growth of the process's peak resident
set over a process that only ran a gradient (each method in its own process). It runs on
CUDA when a GPU is present.
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
REPEATS = 20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _setup():
    sys.path.insert(0, HERE)
    from _small_gpt import batch_at, loss_fn, small_gpt, stdlib_corpus

    model = small_gpt().eval().to(DEVICE)
    batch = batch_at(stdlib_corpus(200_000), torch.Generator().manual_seed(3), batch=16)
    return model, tuple(t.to(DEVICE) for t in batch), loss_fn


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeats=REPEATS):
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(method: str) -> dict:
    """Runs in a child process: time and peak memory of one kind of product."""
    from sharpscope.curvature import HessianOperator

    model, batch, loss_fn = _setup()
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    out = {}
    if method == "gradient":
        out["seconds"] = _median_time(lambda: torch.autograd.grad(loss_fn(model, batch), params))
    elif method == "gradient-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            out["seconds"] = _median_time(lambda: torch.autograd.grad(loss_fn(model, batch), params))
    elif method == "reuse":
        op = HessianOperator(model, loss_fn, [batch], method="reuse").__enter__()
        out["seconds"] = _median_time(lambda: op.matvec(v))
        op.__exit__(None, None, None)

        def build():
            with HessianOperator(model, loss_fn, [batch], method="reuse"):
                pass

        out["build_seconds"] = _median_time(build, repeats=5)
    else:
        with HessianOperator(model, loss_fn, [batch], method=method) as op:
            out["seconds"] = _median_time(lambda: op.matvec(v))
    if DEVICE == "cuda":
        out["peak_rss_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
        return
    sys.path.insert(0, HERE)
    from _small_gpt import describe, small_gpt

    memory = "peak CUDA memory" if DEVICE == "cuda" else "peak RSS"
    print(describe(small_gpt()) + f"; {DEVICE}; median of {REPEATS} runs, each method in its own process")
    results = {}
    for method in ("gradient", "gradient-math", "reuse", "double", "jvp"):
        proc = subprocess.run([sys.executable, __file__, "--worker", method], capture_output=True, text=True, check=True)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["gradient"]
    print(f"gradient             {base['seconds'] * 1e3:7.1f} ms   {memory} {base['peak_rss_mb']:.0f} MB")
    for method in ("reuse", "double", "jvp"):
        r = results[method]
        extra = f" (+{r['build_seconds'] * 1e3:.1f} ms once to build the graph)" if "build_seconds" in r else ""
        print(f"H·v {method:7s}          {r['seconds'] * 1e3:7.1f} ms   ratio to gradient {r['seconds'] / base['seconds']:.2f}"
              f"   {memory} +{r['peak_rss_mb'] - base['peak_rss_mb']:.0f} MB{extra}")
    math_grad = results["gradient-math"]["seconds"]
    print(f"gradient, math attention kernel (the kernel products must use) {math_grad * 1e3:.1f} ms")
    best = min(results[m]["seconds"] for m in ("reuse", "double", "jvp"))
    print(f"cheapest H·v / math-kernel gradient = {best / math_grad:.2f}")
    reuse = results["reuse"]
    print(f"one H·v alone, graph built for it: reuse {(reuse['seconds'] + reuse['build_seconds']) / base['seconds']:.2f}x, "
          f"double {results['double']['seconds'] / base['seconds']:.2f}x the gradient (many products on one batch, as in "
          f"Lanczos or Hutchinson, pay the build once)")
    print(f"cheapest H·v / gradient = {best / base['seconds']:.2f} (claim ≤ 3)")


if __name__ == "__main__":
    main()
