"""The run format that every producer writes and every consumer reads.

A run is a directory holding

* ``config.json`` - the resolved settings; always ``name``, ``n_params`` (a positive
  number) and ``source`` ("simulated" or "measured"); optional grouping keys that the
  analysis uses (``group``: "scales", "schedules", "ablations", "extrapolation" or
  "training", and optionally ``groups``, a list of further groups the run belongs to;
  ``model``, ``schedule``, ``seed``, ``ablation``);
* ``metrics.jsonl`` - one JSON object per logged step with ``step``, ``t`` (fraction of
  training in [0, 1]), ``tokens``, ``lr`` and slash-named metrics (``train/loss``,
  ``sharpness/critical``, ``eval/acc/<task>`` ...). A non-finite value is written as
  ``null``;
* ``checkpoints/`` for trained runs.

A study is any directory tree of runs. Writes are atomic (temp file, then rename) so an
interrupted writer never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by None so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating,)):
        return json_safe(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def metrics_line(row: dict[str, Any]) -> str:
    return json.dumps(json_safe(row), separators=(",", ":"), allow_nan=False)


def write_run(path: str | Path, config: dict[str, Any], rows: Iterable[dict[str, Any]]) -> Path:
    """Write a complete run (config and all metrics rows) atomically, file by file."""
    path = Path(path)
    _check_config(config, path / CONFIG_FILE)
    atomic_write_text(path / METRICS_FILE, "".join(metrics_line(r) + "\n" for r in rows))
    _write_config(path, config)
    return path


class RunWriter:
    """Streams metrics rows of a run that is still being produced (a training loop).

    The config is written at once; each :meth:`log` appends one line and flushes, so a
    killed process loses at most the line it was writing. :meth:`truncate_after` drops
    rows beyond a step (used when resuming from a checkpoint older than the log).
    """

    def __init__(self, path: str | Path, config: dict[str, Any]):
        self.path = Path(path)
        _check_config(config, self.path / CONFIG_FILE)
        self.path.mkdir(parents=True, exist_ok=True)
        _write_config(self.path, config)
        self._fh = open(self.path / METRICS_FILE, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        if "step" not in row:
            raise ValueError("a metrics row needs a 'step'")
        self._fh.write(metrics_line(row) + "\n")
        self._fh.flush()

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step``. A last line without its newline was cut off by a
        killed writer (rows are written whole, newline included) and is dropped."""
        self._fh.close()
        path = self.path / METRICS_FILE
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):
            atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])
        rows = [r for r in _read_metrics(path) if r["step"] <= step]
        atomic_write_text(self.path / METRICS_FILE, "".join(metrics_line(r) + "\n" for r in rows))
        self._fh = open(self.path / METRICS_FILE, "a", encoding="utf-8")

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_config(run_dir: Path, config: dict[str, Any]) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(json_safe(config), indent=2, allow_nan=False) + "\n")


def _check_config(config: dict[str, Any], where: Path) -> None:
    n_params = config.get("n_params")
    if n_params is None:
        raise UserError(f"{where}: 'n_params' is missing; every run records its parameter count")
    if isinstance(n_params, bool) or not isinstance(n_params, (int, float)) or not math.isfinite(n_params) or n_params <= 0:
        raise UserError(f"{where}: 'n_params' must be a positive number, got {n_params!r}")
    if config.get("source") not in ("simulated", "measured"):
        raise UserError(f"{where}: 'source' must be \"simulated\" or \"measured\", got {config.get('source')!r}")


def _read_metrics(path: Path, line_numbers: list[int] | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics file; their line numbers are appended to ``line_numbers`` if given."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8", errors="strict") as fh:
        lines = _lines_of(fh, path)
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed metrics line ({exc.msg}); "
                                "fix or delete that line") from None
            if not isinstance(row, dict) or "step" not in row:
                raise UserError(f"{path}:{lineno}: a metrics line must be a JSON object with a 'step'; "
                                "fix or delete that line")
            for key in ("step", "t"):
                value = row.get(key)
                if (key == "step" or value is not None) and not _is_number(value):
                    raise UserError(f"{path}:{lineno}: '{key}' must be a number, got {value!r}; "
                                    "fix or delete that line")
            rows.append(row)
            if line_numbers is not None:
                line_numbers.append(lineno)
    return rows


def _lines_of(fh, path: Path) -> list[str]:
    try:
        return fh.readlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); the run format is UTF-8 JSON") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Run:
    """One run read back from disk."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(repr=False)
    line_numbers: list[int] | None = field(default=None, repr=False)
    """Line of each metrics row in metrics.jsonl (for error messages)."""

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name))

    @property
    def n_params(self) -> float:
        return float(self.config["n_params"])

    @property
    def group(self) -> str:
        return str(self.config.get("group", "scales"))

    @property
    def groups(self) -> list[str]:
        """Every group the run belongs to: ``group`` plus any listed under ``groups`` (a
        trained cosine run at a schedule scale serves both 'scales' and 'schedules')."""
        extra = self.config.get("groups") or []
        if not isinstance(extra, list):
            extra = [extra]
        return [self.group] + [str(g) for g in extra if str(g) != self.group]

    @property
    def model(self) -> str:
        """The model-size label (runs of the same model, other seeds, share it)."""
        return str(self.config.get("model", self.name))

    def keys(self) -> set[str]:
        out: set[str] = set()
        for row in self.metrics:
            out.update(row)
        return out

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(t, values)`` over the rows that log ``key``; null becomes NaN.

        Rows without ``t`` get it from their step relative to the last logged step.
        """
        last_step = max((r["step"] for r in self.metrics), default=0) or 1
        ts, vs = [], []
        for index, row in enumerate(self.metrics):
            if key in row:
                t = row.get("t")
                ts.append(float(t) if t is not None else row["step"] / last_step)
                v = row[key]
                if v is not None and not _is_number(v):
                    raise UserError(f"{self.path / METRICS_FILE}:{self.line_numbers[index] if self.line_numbers else '?'}: '{key}' must be a number "
                                    f"or null, got {v!r}; fix or delete that line")
                vs.append(np.nan if v is None else float(v))
        return np.asarray(ts, dtype=float), np.asarray(vs, dtype=float)

    def last(self, key: str) -> float:
        """The last logged value of ``key`` (NaN when never logged)."""
        _, values = self.series(key)
        return float(values[-1]) if values.size else float("nan")


def read_run(path: str | Path) -> Run:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"'{path}' is not a run: it has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{config_path}: not UTF-8 text; the run format is UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: must hold a JSON object")
    _check_config(config, config_path)
    line_numbers: list[int] = []
    metrics = _read_metrics(path / METRICS_FILE, line_numbers)
    return Run(path=path, config=config, metrics=metrics, line_numbers=line_numbers)


def find_runs(study: str | Path) -> list[Path]:
    """Every run directory under ``study`` (the study itself may be a single run)."""
    study = Path(study)
    if not study.is_dir():
        raise UserError(f"study directory '{study}' not found; pass a directory of runs")
    found = sorted({p.parent for p in study.rglob(CONFIG_FILE)})
    return [p for p in found if "checkpoints" not in p.relative_to(study).parts]


def read_study(study: str | Path) -> list[Run]:
    paths = find_runs(study)
    if not paths:
        raise UserError(f"no runs under '{study}': a run is a directory with {CONFIG_FILE} and {METRICS_FILE}")
    return [read_run(p) for p in paths]
