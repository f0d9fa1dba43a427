"""Reading Hugging Face checkpoints for ``sharpscope measure``: a ``save_pretrained``
folder, or a ``transformers.Trainer`` ``checkpoint-N`` folder.

What is read, and how:

* the model, through ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
  use_safetensors=True)``, in float32. Weights must be safetensors: a folder holding only
  ``pytorch_model.bin`` (a pickle) is refused, since unpickling runs code.
* the optimizer state, ``optimizer.pt``, with ``torch.load(weights_only=True)`` (tensors
  and plain containers only). The Trainer writes it as ``optimizer.state_dict()`` of an
  AdamW over two parameter groups, the parameters with weight decay and those without,
  each in ``named_parameters()`` order; the state numbers the parameters through the
  groups in that order. :func:`load_optimizer` rebuilds the same groups over the loaded
  model, checks every saved moment's shape against its parameter, and loads the state.
* the learning rate the schedule would use for the next step: ``scheduler.pt``'s
  ``_last_lr`` (also loaded with ``weights_only=True``), else the lr in the optimizer's
  param groups (the scheduler writes it there), else the last ``learning_rate`` in
  ``trainer_state.json``'s log (the lr of the step just taken).
* ``trainer_state.json`` (JSON): ``global_step``, ``max_steps`` and the logged losses.
* the tokenizer saved beside the model, ``AutoTokenizer.from_pretrained(folder,
  local_files_only=True)``.

``training_args.bin`` and ``rng_state.pth`` are pickles and are never opened. Nothing
reaches the network: the Hub is put in offline mode before transformers is imported, and
every load is ``local_files_only``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ..errors import UserError
from ..metrics import TRAIN_LOSS

HF_CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Parameter names the Trainer keeps out of weight decay. Recent transformers: biases and
# anything named like a norm (get_decay_parameter_names); older releases: biases only.
# Both also exclude every parameter inside an nn.LayerNorm. A checkpoint may come from
# either, so both are tried and the saved group sizes and moment shapes decide.
_NO_DECAY_RULES = (
    ("bias and norm names", (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")),
    ("bias names", (r"bias",)),
)


def _safetensors_files(folder: Path) -> list[Path]:
    named = [folder / name for name in SAFETENSORS if (folder / name).is_file()]
    return named or sorted(folder.glob("model-*.safetensors"))


def _pickled_files(folder: Path) -> list[Path]:
    named = [folder / name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    return named or sorted(folder.glob("pytorch_model-*.bin"))


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds model weights in either format (safetensors or pickle)."""
    return bool(_safetensors_files(folder) or _pickled_files(folder))


def is_model_folder(folder: Path) -> bool:
    """A Hugging Face model folder: ``config.json`` and weights beside it."""
    return (folder / HF_CONFIG).is_file() and has_weights(folder)


def check_weights(folder: Path) -> None:
    """Refuse a folder whose weights are not safetensors (we never unpickle)."""
    if _safetensors_files(folder):
        return
    pickled = _pickled_files(folder)
    if pickled:
        raise UserError(f"{pickled[0]} is a pickle, and sharpscope never unpickles weights; save the model as "
                        f"safetensors (model.save_pretrained(folder, safe_serialization=True)) and measure that")
    raise UserError(f"'{folder}' has {HF_CONFIG} but no model.safetensors; the checkpoint is incomplete")


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object; the checkpoint is damaged")
    return value


def model_config(folder: Path) -> dict[str, Any]:
    """The model's config.json as a dict."""
    return read_json(folder / HF_CONFIG)


def trainer_state(folder: Path) -> dict[str, Any] | None:
    """``trainer_state.json`` of a Trainer checkpoint (None when absent)."""
    path = folder / TRAINER_STATE
    return read_json(path) if path.is_file() else None


def _step_of(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def checkpoint_step(folder: Path, name_step: int | None) -> int | None:
    """The optimizer steps behind a checkpoint: trainer_state's global_step, else the N of
    ``checkpoint-N``, else None (a plain save_pretrained folder)."""
    state = trainer_state(folder)
    step = _step_of(state.get("global_step")) if state else None
    return step if step is not None else name_step


def max_steps(folder: Path) -> int | None:
    state = trainer_state(folder)
    steps = _step_of(state.get("max_steps")) if state else None
    return steps or None


def logged(folder: Path, step: int) -> dict[str, float]:
    """What the Trainer logged at ``step`` (its training loss, tokens seen), from trainer_state.json."""
    state = trainer_state(folder) or {}
    out: dict[str, float] = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and entry.get("step") == step and _finite(entry.get("loss")):
            out[TRAIN_LOSS] = float(entry["loss"])
    tokens = state.get("num_input_tokens_seen")
    if _finite(tokens) and tokens > 0:
        out["tokens"] = int(tokens)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- transformers


def import_transformers():
    # Offline before the first import: huggingface_hub reads the switch when it loads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UserError("measuring a Hugging Face model needs transformers: pip install 'sharpscope[hf]'") from None
    return transformers


@contextmanager
def quiet(transformers=None):
    """transformers' own progress bars and warnings off while loading (our bar is the one
    over checkpoints); its settings are put back afterwards."""
    transformers = transformers or import_transformers()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_model(folder: Path, device: torch.device) -> torch.nn.Module:
    """The causal LM in ``folder``, in float32 on ``device``, in eval mode."""
    check_weights(folder)
    config = model_config(folder)
    kind = config.get("model_type")
    transformers = import_transformers()
    with quiet(transformers):
        try:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False,
                output_loading_info=True)
        except (ValueError, KeyError) as exc:
            known = getattr(transformers, "CONFIG_MAPPING", {})
            if kind and kind not in known:
                raise UserError(f"{folder / HF_CONFIG} names model type '{kind}', which transformers "
                                f"{transformers.__version__} does not know; upgrade transformers") from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"'{folder}' does not load as a causal language model ({first})") from None
        except (OSError, RuntimeError, SafetensorError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"'{folder}' cannot be loaded ({first}); the checkpoint is damaged") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        # transformers would initialise these at random: measuring that model would be meaningless.
        raise UserError(f"'{folder}' lacks weights for {len(missing)} parameter(s) of the model (e.g. {missing[0]}); "
                        f"the weights do not match {HF_CONFIG}")
    return model.float().to(device).eval()


def find_tokenizer(folders: list[Path]):
    """(tokenizer, folder) for the first folder that holds a tokenizer, else (None, None)."""
    transformers = import_transformers()
    for folder in folders:
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            continue
        with quiet(transformers):
            try:
                return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                  trust_remote_code=False), folder
            except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"the tokenizer in '{folder}' cannot be loaded ({first}); save it again with "
                                f"tokenizer.save_pretrained") from None
    return None, None


def encode(tokenizer, documents: list[str]) -> np.ndarray:
    """The documents' tokens, concatenated, without special tokens (documents are separated
    by text, as for sharpscope's own tokenizers), as int64 (vocabularies beyond 65536 fit)."""
    transformers = import_transformers()
    if not documents:
        return np.zeros(0, np.int64)
    with quiet(transformers):  # "sequence longer than the model's maximum" is expected: we cut windows
        ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    pieces = [np.asarray(piece, dtype=np.int64) for piece in ids]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def positions(folder: Path) -> int | None:
    """The longest sequence the model takes (None when its config does not say)."""
    config = model_config(folder)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def causal_lm_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """The model's own causal-LM loss with labels = input_ids (mean over predicted tokens).

    The sampler's (x, y) windows are rejoined into one row of block_size + 1 tokens, so the
    model predicts block_size tokens per row, as sharpscope's own loss does.
    """
    x_BxT, y_BxT = batch
    ids = torch.cat([x_BxT, y_BxT[:, -1:]], dim=1)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def causal_lm_sequence_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    """The same loss per row (1-D; every row predicts block_size tokens, so the mean over
    rows is :func:`causal_lm_loss`): rows let the critical-sharpness search report its
    standard error over the probe's sequences."""
    x_BxT, y_BxT = batch
    logits = model(input_ids=x_BxT, use_cache=False).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_BxT.reshape(-1),
                                                  reduction="none")
    return per_token.view(y_BxT.shape).mean(dim=1)


# --------------------------------------------------------------------------- optimizer


def _no_decay(model: torch.nn.Module, patterns: tuple[str, ...]) -> set[str]:
    compiled = [re.compile(p) for p in patterns]
    norm_modules = [name for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)]
    out = set()
    for name, _ in model.named_parameters():
        inside_norm = any(name.startswith(prefix + ".") for prefix in norm_modules if prefix)
        if inside_norm or any(p.search(name.lower()) for p in compiled):
            out.add(name)
    return out


def _trainer_groups(model: torch.nn.Module, saved_groups: list[dict]) -> tuple[list[list[torch.nn.Parameter]], str]:
    """The model's parameters split as the Trainer split them when it built the optimizer
    that saved ``saved_groups``; refuses (UserError) when no known split fits."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [len(g.get("params", [])) for g in saved_groups]
    if len(saved_groups) == 1 and sizes[0] == len(named):
        return [[p for _, p in named]], "one group"
    if len(saved_groups) == 2:
        for rule, patterns in _NO_DECAY_RULES:
            excluded = _no_decay(model, patterns)
            decay = [p for n, p in named if n not in excluded]
            rest = [p for n, p in named if n in excluded]
            if [len(decay), len(rest)] == sizes:
                return [decay, rest], f"decay / no decay ({rule})"
    raise UserError(f"the optimizer state has parameter groups of sizes {sizes}, which do not match this model's "
                    f"{len(named)} parameters split as the Trainer splits them; the optimizer.pt is not this "
                    f"model's (use --direction gradient to measure without it)")


def _is_adam_state(saved: dict) -> bool:
    groups = saved.get("param_groups")
    state = saved.get("state")
    if not isinstance(groups, list) or not groups or not isinstance(state, dict):
        return False
    if not all(isinstance(g, dict) and {"betas", "eps", "weight_decay", "lr", "params"} <= set(g) for g in groups):
        return False
    return all(isinstance(s, dict) and {"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in state.values())


def read_optimizer_state(folder: Path) -> tuple[dict | None, str]:
    """(the optimizer state dict, a note) — or (None, why not) when it cannot be used."""
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        return None, f"no {OPTIMIZER_FILE} in the checkpoint"
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: the outcome below says enough
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not loadable safely"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{OPTIMIZER_FILE} does not load with torch.load(weights_only=True) ({first[:160]})"
    if not isinstance(saved, dict) or not _is_adam_state(saved):
        keys = sorted({k for s in (saved.get("state") or {}).values() if isinstance(s, dict) for k in s}) \
            if isinstance(saved, dict) and isinstance(saved.get("state"), dict) else []
        return None, f"{OPTIMIZER_FILE} holds no Adam/AdamW state (state keys {keys[:4]}); only AdamW is rebuilt"
    return saved, f"{OPTIMIZER_FILE}"


def load_optimizer(folder: Path, model: torch.nn.Module) -> tuple[torch.optim.Optimizer | None, str]:
    """The Trainer's Adam/AdamW rebuilt over ``model`` with the state of ``folder/optimizer.pt``,
    and a note saying what was loaded; (None, why not) when there is no usable state.

    A state that loads but does not fit the model (group sizes or moment shapes) is a
    UserError, not a fallback: it means the files do not belong together.
    """
    saved, note = read_optimizer_state(folder)
    if saved is None:
        return None, note
    groups, split = _trainer_groups(model, saved["param_groups"])
    if not saved["state"]:
        return None, f"{OPTIMIZER_FILE} holds no moments yet (no optimizer step taken)"
    flat = [p for group in groups for p in group]
    for index, state in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(flat):
            raise UserError(f"{folder / OPTIMIZER_FILE} has state for parameter {index!r}, but the model has "
                            f"{len(flat)}; the optimizer.pt is not this model's")
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state[key]
            if not isinstance(moment, torch.Tensor) or moment.shape != flat[index].shape:
                shape = tuple(moment.shape) if isinstance(moment, torch.Tensor) else type(moment).__name__
                raise UserError(f"{folder / OPTIMIZER_FILE}: the {key} of parameter {index} has shape {shape}, "
                                f"the parameter {tuple(flat[index].shape)}; the optimizer.pt is not this model's")
    decoupled = saved["param_groups"][0].get("decoupled_weight_decay", True)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    optimizer = cls([{"params": group} for group in groups], lr=1e-3)
    try:
        optimizer.load_state_dict(saved)  # the saved hyperparameters (lr, betas, eps, weight decay) come with it
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise UserError(f"{folder / OPTIMIZER_FILE} does not load into an {cls.__name__} over this model "
                        f"({exc}); the optimizer.pt is not this model's") from None
    hyper = saved["param_groups"][0]
    # the same words for every checkpoint of a run, so a series prints its note once
    return optimizer, (f"{cls.__name__} state from {OPTIMIZER_FILE} (betas {tuple(hyper['betas'])}, eps "
                       f"{hyper['eps']:g}, weight decay {[g['weight_decay'] for g in saved['param_groups']]}, "
                       f"groups: {split})")


def scheduled_lr(folder: Path, optimizer: torch.optim.Optimizer | None) -> tuple[float | None, str]:
    """The lr the checkpoint's schedule gives its next step, and where it was read."""
    path = folder / SCHEDULER_FILE
    if path.is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
            last = state.get("_last_lr") if isinstance(state, dict) else None
            if isinstance(last, (list, tuple)) and last and _finite(float(last[0])):
                return float(last[0]), f"{SCHEDULER_FILE} (the schedule's lr for the next step)"
        except Exception:  # an unreadable scheduler.pt only costs this source of the lr
            pass
    if optimizer is not None:
        lr = optimizer.param_groups[0]["lr"]
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        return lr, f"{OPTIMIZER_FILE}'s param groups (set by the schedule for the next step)"
    state = trainer_state(folder) or {}
    entries = [e for e in state.get("log_history") or [] if isinstance(e, dict) and _finite(e.get("learning_rate"))]
    if entries:
        last = entries[-1]
        return float(last["learning_rate"]), (f"{TRAINER_STATE} (the lr logged at step {last.get('step')}, "
                                              f"the step before; no {SCHEDULER_FILE})")
    return None, "unknown (no scheduler.pt, optimizer.pt or logged lr; pass --lr)"
