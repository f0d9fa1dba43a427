"""Optional metric sinks beside metrics.jsonl (which stays the record): TensorBoard and
Weights & Biases in offline mode. Both can be on together; each needs its package."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import UserError


class MetricSinks:
    def __init__(self, run_dir: Path, config: dict[str, Any], *, tensorboard: bool, wandb: bool,
                 wandb_project: str, name: str):
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs the tensorboard package: "
                                "pip install 'sharpscope[tensorboard]'") from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise UserError("logging.wandb=true needs the wandb package: pip install 'sharpscope[wandb]'") from None
            # Offline: nothing leaves the machine; `wandb sync` uploads later if wanted.
            self._wandb = wandb_lib.init(project=wandb_project, name=name, dir=str(run_dir), mode="offline",
                                         config=config, reinit=True)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        scalars = {k: float(v) for k, v in row.items()
                   if k not in ("step",) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(float(v))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
