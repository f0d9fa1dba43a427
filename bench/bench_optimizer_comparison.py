"""A fixed-steps comparison of the optimizers on the built-in corpus, several seeds.

AdamW, SAM, Precond-SAM, Functional-SAM, Precond-Functional-SAM and Nexus each train the
'tiny' GPT on prose + code + arithmetic for the same number of steps and tokens (Nexus's
K inner micro-batches add up to one AdamW batch), then report validation loss per source,
arithmetic exact match, and λ_max / trace per parameter at the end. The published
ordering (language model on C4) is Precond-Functional-SAM < Precond-SAM < AdamW < SAM in
eval loss; this prints what we get here, mean ± standard deviation across seeds.

    python bench/bench_optimizer_comparison.py [--steps 300] [--seeds 0,1,2] [--out DIR]

Runs go to OUT/<optimizer>-s<seed> in the shared run format (``sharpscope analyze`` reads
them); finished runs are kept and skipped when the script is run again.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

OPTIMIZERS = {
    "adamw": ["optim.name=adamw"],
    "sam": ["optim.name=sam"],
    "precond-sam": ["optim.name=sam", "optim.precondition=true"],
    "functional-sam": ["optim.name=functional-sam"],
    "precond-functional-sam": ["optim.name=functional-sam", "optim.precondition=true"],
    "nexus": ["optim.name=nexus", "optim.inner_steps=4", "optim.inner_lr=0.01", "optim.source_order=cycle"],
}
SOURCES = ("arithmetic", "code", "prose")


def settings(steps: int, seed: int) -> list[str]:
    return [
        f"steps={steps}", f"seed={seed}", "progress=false", "model.preset=tiny", "model.block_size=64",
        'data.sources=["prose","code","arithmetic"]', "data.batch_size=16", "data.max_bytes=1000000",
        "optim.lr=3e-3", "optim.weight_decay=0.1", "optim.rho=0.05", "schedule.name=cosine",
        f"schedule.warmup_steps={max(1, steps // 10)}", "monitor.every=25", f"monitor.exact_every={steps}",
        "monitor.lanczos_iters=20", "monitor.trace_samples=16", f"eval.every={steps}", "eval.batches=4",
        "eval.arithmetic_problems=100", "checkpoint.every=0", "checkpoint.keep=1",
    ]


def run_one(out: Path, optimizer: str, steps: int, seed: int) -> dict:
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig
    from sharpscope.training.trainer import train

    run = out / f"{optimizer}-s{seed}"
    metrics = run / "metrics.jsonl"
    done = metrics.exists() and any(json.loads(line).get("step") == steps and "eval/loss" in json.loads(line)
                                    for line in metrics.read_text().splitlines())
    seconds = math.nan
    if not done:
        if run.exists():
            import shutil

            shutil.rmtree(run)  # an unfinished run from an interrupted comparison: start it again
        config = load_config(TrainConfig, None, settings(steps, seed) + OPTIMIZERS[optimizer] +
                             [f"name={optimizer}-s{seed}", "group=optimizers"])
        t0 = time.perf_counter()
        train(config, run)
        seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = [r for r in rows if r.get("step") == steps]
    final = {k: v for r in last for k, v in r.items()}
    final["seconds"] = seconds
    return final


def summary(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}" if abs(mean) < 100 else f"{mean:.1f} ± {sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench-output/optimizers")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    results = {name: [] for name in OPTIMIZERS}
    for seed in seeds:
        for name in OPTIMIZERS:
            results[name].append(run_one(out, name, args.steps, seed))
            r = results[name][-1]
            print(f"  {name} seed {seed}: eval/loss {r.get('eval/loss', math.nan):.4f}"
                  + (f" ({r['seconds']:.0f} s)" if math.isfinite(r["seconds"]) else " (kept)"), file=sys.stderr)
    columns = [("eval/loss", "val loss (mean of sources)")] + \
              [(f"eval/{s}/loss", f"val loss {s}") for s in SOURCES] + \
              [("eval/arithmetic/accuracy", "arithmetic exact match"), ("sharpness/lambda_max", "λ_max (end)"),
               ("sharpness/trace_per_param", "trace / parameter (end)"), ("train/loss", "train loss (last step)")]
    print(f"'tiny' GPT, {args.steps} steps of 16x64 byte tokens on prose+code+arithmetic, AdamW lr 3e-3 cosine, "
          f"ρ = 0.05, Nexus K=4 γ=0.01; mean ± sd over seeds {args.seeds}")
    print("| optimizer | " + " | ".join(title for _, title in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, runs in results.items():
        print(f"| {name} | " + " | ".join(summary([r.get(key, math.nan) for r in runs]) for key, _ in columns) + " |")
    ranking = sorted(results, key=lambda n: statistics.fmean(r["eval/loss"] for r in results[n]))
    print("order by mean validation loss (best first): " + " < ".join(ranking))
    base = {seed: r["eval/loss"] for seed, r in zip(seeds, results["adamw"])}
    for name, runs in results.items():
        if name == "adamw":
            continue
        diffs = [r["eval/loss"] - base[seed] for seed, r in zip(seeds, runs)]
        wins = sum(d < 0 for d in diffs)
        print(f"{name} - adamw, paired by seed: {summary(diffs)} (lower in {wins}/{len(diffs)} seeds)")


if __name__ == "__main__":
    main()
