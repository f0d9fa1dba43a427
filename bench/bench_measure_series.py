"""What measuring a finished training run costs: `sharpscope measure` over the ten
checkpoints a real `transformers.Trainer` wrote (save_steps), per checkpoint and in all.

Set-up (offline, CPU): a tiny Llama (LlamaConfig: 2 layers, width 64, 4 heads, random
init) with a byte-level BPE tokenizer (512 tokens) trained on the built-in prose corpus,
trained for 100 steps by `transformers.Trainer` (AdamW, linear schedule, batch 8 x 64
tokens), checkpoint every 10 steps: checkpoint-10 ... checkpoint-100, each with
model.safetensors, optimizer.pt, scheduler.pt and trainer_state.json.

Measured, on one batch of 16 x 64 tokens of the prose validation split:
  * the full measurement (λ_c along the Trainer's next AdamW step, λ_max with 30 Lanczos
    iterations, the trace with 32 Hutchinson probes, preconditioned sharpness), then
  * λ_c alone (--lanczos-iters 0 --trace-samples 0), the cheap trajectory.
Each is timed per checkpoint (load, direction, λ_c, λ_max, trace, preconditioned) and in
all, and compared with two costs timed at the same moment in the same process: one
training step of the same model on the same batch shape (forward, backward, AdamW step,
timed between checkpoints) and loading the checkpoint. Medians per checkpoint are given
beside the totals, since a shared machine slows single checkpoints at random.
The one-time cost of a command (importing transformers and its Llama code, in a fresh
process) is printed apart.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

try:
    import tokenizers
    import transformers
except ImportError:
    sys.exit("bench_measure_series needs transformers and tokenizers: pip install 'sharpscope[hf]'")

from sharpscope.runs import read_run
from sharpscope.training import data as data_lib
from sharpscope.measure import hf
from sharpscope.measure.series import MeasureOptions, find_checkpoints, measure_path

VOCAB, BLOCK, STEPS, SAVE_EVERY, TRAIN_BATCH, MEASURE_BATCH = 512, 64, 100, 10, 8, 16
PARTS = ("load", "direction", "critical", "lambda_max", "trace", "preconditioned")


def make_tokenizer(text: str):
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def train_series(root: Path):
    """Ten real Trainer checkpoints of a tiny Llama; returns (output folder, s per Trainer step)."""
    text = data_lib.ByteTokenizer().decode(data_lib.load_source("prose", max_bytes=400_000).train)
    tokenizer = make_tokenizer(text)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    rows = torch.from_numpy(ids[: len(ids) // (BLOCK + 1) * (BLOCK + 1)].reshape(-1, BLOCK + 1))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    transformers.set_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=128)
    out = root / "trainer-out"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=TRAIN_BATCH,
        learning_rate=3e-3, weight_decay=0.1, warmup_steps=10, logging_steps=10, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, log_level="error")
    trainer = transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=args, train_dataset=Rows())
    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar at every save
    result = trainer.train()
    tokenizer.save_pretrained(out)
    return out, result.metrics["train_runtime"] / STEPS


class TrainingStep:
    """Forward + backward + AdamW step of the model at the measured batch shape: the unit
    the measurement is compared with. Timed between checkpoints (median of 5 after 2
    warm-ups), so each ratio compares two timings taken under the same machine load."""

    def __init__(self, checkpoint: Path):
        self.model = hf.load_model(checkpoint, torch.device("cpu")).train()
        self.optimizer, _ = hf.load_optimizer(checkpoint, self.model)
        self.ids = torch.randint(0, VOCAB, (MEASURE_BATCH, BLOCK + 1))

    def seconds(self, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            self.model(input_ids=self.ids, labels=self.ids).loss.backward()
            self.optimizer.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])


def fresh_process_load(checkpoint: Path) -> float:
    """Importing transformers and loading the first model in a new process: the fixed cost
    of one `sharpscope measure` command (this process has paid it while training)."""
    code = ("import time; t0 = time.perf_counter(); import torch; from sharpscope.measure import hf; "
            f"hf.load_model(__import__('pathlib').Path({str(checkpoint)!r}), torch.device('cpu')); "
            "print(time.perf_counter() - t0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure(folder: Path, out: Path, step: TrainingStep, **options):
    """The series measured as `sharpscope measure FOLDER --out OUT` does; after each
    checkpoint a training step is timed (outside the measured time)."""
    opts = MeasureOptions(batch_size=MEASURE_BATCH, block_size=BLOCK, device="cpu", **options)
    step_times: list[float] = []
    aside = 0.0

    def between(_result):
        nonlocal aside
        t0 = time.perf_counter()
        step_times.append(step.seconds())
        aside += time.perf_counter() - t0

    t0 = time.perf_counter()
    result = measure_path(folder, "prose", opts, out=out, progress=False, on_result=between)
    return result, time.perf_counter() - t0 - aside, step_times


def report(label: str, result, total: float, step_times: list[float]) -> None:
    per = [sum(r["seconds"].values()) for r in result.results]
    in_steps = [p / s for p, s in zip(per, step_times)]
    in_loads = [p / r["seconds"]["load"] for p, r in zip(per, result.results)]
    print(f"{label}: {total:.2f} s for {len(per)} checkpoints (data and batches once: "
          f"{total - sum(per):.2f} s); per checkpoint median {statistics.median(per):.3f} s "
          f"(min {min(per):.3f}, max {max(per):.3f}) = {statistics.median(in_steps):.1f} training steps "
          f"= {statistics.median(in_loads):.0f}x loading it")


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        folder, trainer_step = train_series(root)
        train_seconds = time.perf_counter() - t0
        series = find_checkpoints(folder)
        assert [c.step for c in series.checkpoints] == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
        first_load = fresh_process_load(series.checkpoints[0].path)
        step = TrainingStep(series.checkpoints[-1].path)

        full, full_total, full_steps = measure(folder, root / "full", step)
        cheap, cheap_total, cheap_steps = measure(folder, root / "cheap", step, lanczos_iters=0, trace_samples=0)
        n_params = read_run(root / "full").n_params

        print(f"tiny Llama, {n_params:,.0f} parameters; {len(series.checkpoints)} Trainer checkpoints "
              f"(steps {SAVE_EVERY}..{STEPS}); made in {train_seconds:.1f} s; torch threads {torch.get_num_threads()}")
        print(f"measured batch {MEASURE_BATCH} x {BLOCK} tokens of prose (validation split)")
        print(f"one training step at that shape: median {statistics.median(full_steps + cheap_steps) * 1e3:.1f} ms "
              f"over the run (the Trainer's own, batch {TRAIN_BATCH}, with its saves: {trainer_step * 1e3:.1f} ms)")
        print(f"importing transformers and loading the first checkpoint in a fresh process: {first_load:.2f} s, "
              f"paid once per command\n")
        print(f"{'step':>5s} {'total s':>8s} " + " ".join(f"{p:>14s}" for p in PARTS) + f" {'lambda_c':>9s}"
              f" {'lambda_c only s':>16s} {'train step ms':>14s}")
        for r, c, t in zip(full.results, cheap.results, full_steps):
            s = r["seconds"]
            print(f"{r['step']:5d} {sum(s.values()):8.3f} " + " ".join(f"{s.get(p, 0.0):14.3f}" for p in PARTS)
                  + f" {r['sharpness/critical']:9.4g} {sum(c['seconds'].values()):16.3f} {t * 1e3:14.1f}")
        print()
        report("full measurement", full, full_total, full_steps)
        report("lambda_c only   ", cheap, cheap_total, cheap_steps)
        shares = {p: sum(r["seconds"].get(p, 0.0) for r in full.results) for p in PARTS}
        whole = sum(shares.values())
        print("share of the full measurement: " + ", ".join(f"{p} {v / whole:.0%}" for p, v in shares.items()))
        evals = [r["sharpness/evals"] for r in cheap.results]
        print(f"lambda_c loss evaluations per checkpoint: median {statistics.median(evals):.0f}, max {max(evals)}")


if __name__ == "__main__":
    main()
