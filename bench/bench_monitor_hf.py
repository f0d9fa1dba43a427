"""What the Hugging Face callback costs and how many loss evaluations a measurement takes,
in a real ``transformers.Trainer`` run: a tiny Llama (byte vocabulary) trained with AdamW,
warmup from lr 0 and a cosine schedule on the Python standard library's source bytes.

1. Overhead: the same run without the callback and with it at ``every`` = 10, 50 and the
   default (250), interleaved round by round in one process so drifts in machine speed hit
   every variant alike; the median wall time of each against the run without it.
2. Evaluations per measurement at every=10 (fast search, the default) against the paper's
   reference search run on the same directions (training is bit-identical with and without
   the monitor, so the runs take the same steps), and both against a tight reference
   (paper search at rtol 1e-3) for accuracy.

    python bench/bench_monitor_hf.py [--steps 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _small_gpt import BLOCK, stdlib_corpus  # noqa: E402

import transformers  # noqa: E402

from sharpscope.integrations.hf import SharpnessCallback  # noqa: E402

BATCH = 16


class Windows(torch.utils.data.Dataset):
    """Fixed, seeded windows of the corpus (the same for every variant)."""

    def __init__(self, tokens: torch.Tensor, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, tokens.numel() - BLOCK - 1, (n,), generator=gen)
        self.tokens = tokens

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        ids = self.tokens[self.starts[i]: self.starts[i] + BLOCK]
        return {"input_ids": ids, "labels": ids}


def model():
    transformers.set_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=BLOCK)
    return transformers.LlamaForCausalLM(config)


def run(out: Path, dataset, steps: int, callback=None) -> float:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=3e-3,
        warmup_steps=steps // 20, lr_scheduler_type="cosine", logging_steps=50, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model(), args=args, train_dataset=dataset,
                                   callbacks=[callback] if callback else [])
    trainer.remove_callback(transformers.PrinterCallback)  # no log lines in the bench output
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="/tmp/sharpscope-bench-monitor-hf")
    a = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # one thread: timings are not at the mercy of the other core
    tokens = stdlib_corpus()
    dataset = Windows(tokens, a.steps * BATCH, seed=0)
    probe = Windows(tokens, BATCH, seed=1)
    probe_batch = {k: torch.stack([probe[i][k] for i in range(BATCH)]) for k in ("input_ids", "labels")}
    out = Path(a.out)
    n_params = sum(p.numel() for p in model().parameters())
    print(f"tiny Llama, {n_params:,} parameters, {a.steps} steps of {BATCH}×{BLOCK} tokens, AdamW lr 3e-3, "
          f"warmup {a.steps // 20} from 0, cosine; probe {BATCH}×{BLOCK}; {a.rounds} interleaved rounds")

    variants = {"no callback": None, "every=10": 10, "every=50": 50, "every=250 (default)": 250}
    times: dict[str, list[float]] = {k: [] for k in variants}
    counts: dict[str, int] = {}
    for r in range(a.rounds):
        for name, every in variants.items():
            callback = SharpnessCallback(probe_batch, every=every) if every else None
            times[name].append(run(out / f"r{r}-{every}", dataset, a.steps, callback))
            if callback is not None:
                counts[name] = len(callback.history)
    base = statistics.median(times["no callback"])
    print("\n| variant | measurements | median wall time | vs no callback |\n|---|---|---|---|")
    for name in variants:
        t = statistics.median(times[name])
        n = counts.get(name, 0)
        print(f"| {name} | {n} | {t:.2f} s | {t / base:.3f}× ({100 * (t / base - 1):+.1f}%) |")

    # Evaluations per measurement, fast vs the paper's search, on the same directions.
    searches = {"fast": {}, "paper": {"method": "paper"}, "reference (paper, rtol 1e-3)":
                {"method": "paper", "rtol": 1e-3, "max_evals": 200}}
    results = {}
    for name, options in searches.items():
        callback = SharpnessCallback(probe_batch, every=10, **options)
        run(out / f"evals-{name.split()[0]}", dataset, a.steps, callback)
        results[name] = {step: m for step, m in callback.history}
    ref = results["reference (paper, rtol 1e-3)"]
    print("\n| search | measurements | evals median | mean | max | η_c error vs reference: median | max |"
          "\n|---|---|---|---|---|---|---|")
    for name in ("fast", "paper"):
        evals = np.array([m["sharpness/evals"] for m in results[name].values()])
        errs = np.array([abs(m["sharpness/eta_c"] / ref[s]["sharpness/eta_c"] - 1)
                         for s, m in results[name].items()
                         if s in ref and np.isfinite(m["sharpness/eta_c"]) and np.isfinite(ref[s]["sharpness/eta_c"])
                         and ref[s]["sharpness/eta_c"] > 0])
        failed = sum(1 for m in results[name].values() if not np.isfinite(m["sharpness/critical"]))
        print(f"| {name} | {len(evals)} ({failed} failed) | {np.median(evals):.0f} | {evals.mean():.1f} | "
              f"{evals.max():.0f} | {100 * np.median(errs):.2f}% | {100 * errs.max():.2f}% |")
    fast = np.array([m["sharpness/evals"] for m in results["fast"].values()])
    paper = np.array([m["sharpness/evals"] for m in results["paper"].values()])
    print(f"\nfast / paper evaluations: {fast.sum() / paper.sum():.2f}× (baseline forward included in both)")


if __name__ == "__main__":
    main()
