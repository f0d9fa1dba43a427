"""The optimizers a run can name: ``optim.name`` is a key of ``OPTIMIZER_REGISTRY``.

The registry is the one list of names: ``build_optimizer``, the trainer's settings check
and the CLI's ``--optimizer`` choices all read it, so a new optimizer is one entry here
(its hyper-parameters, if new, are fields of the flat ``OptimConfig``, whose keys every
run records). It lives in training, not optim/, because its builders read the training
settings; the classes they build come from ``sharpscope.optim``.

torch is imported inside the builders only: the CLI reads the names while it builds its
parser, and commands that never train must not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from .config import OptimConfig, TrainConfig


def _adamw(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    import torch

    if len(cfg.betas) != 2:
        raise UserError(f"optim.betas needs two numbers, got {cfg.betas}")
    return torch.optim.AdamW, {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}


def _sgd(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    import torch

    return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum}


BASE_OPTIMIZERS: dict[str, Callable[[OptimConfig], tuple[type[torch.optim.Optimizer], dict[str, Any]]]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}
"""``optim.base`` (and the plain optimizers of the same names): the class and its
keyword arguments from the settings."""


def _base(name: str, cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if name not in BASE_OPTIMIZERS:
        raise UserError(f"unknown base optimizer '{name}'; choose {' or '.join(BASE_OPTIMIZERS)}")
    return BASE_OPTIMIZERS[name](cfg)


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry."""

    build: Callable[[list[dict[str, Any]], OptimConfig, torch.nn.Module], torch.optim.Optimizer]
    """(parameter groups, settings, model) -> the optimizer. The model is the one it will
    train; the trainer replaces it with the DDP wrapper where there is one."""
    fields: tuple[str, ...]
    """The ``OptimConfig`` fields it reads besides ``name``, ``lr``, ``weight_decay`` and
    ``grad_clip`` (which every optimizer takes); a wrapper reads its base's fields too."""
    check: Callable[[TrainConfig], None] | None = None
    """Checks of the run's settings beyond its own (Nexus: its micro-batches split the batch)."""
    micro_batches: bool = False
    """Each pass reads a micro-batch of its own (Nexus), which the trainer draws in place
    of the step's batch."""


def _plain(name: str, fields: tuple[str, ...]) -> OptimizerSpec:
    def build(groups, cfg, model):
        base, kwargs = _base(name, cfg)
        return base(groups, **kwargs)

    return OptimizerSpec(build, fields)


def _wrapping(class_name: str, keywords: tuple[str, ...], *, reads: tuple[str, ...] = (),
              **spec: Any) -> OptimizerSpec:
    """A ``sharpscope.optim`` class around ``optim.base``, handed the settings ``keywords``
    by name (so the class's arguments and the config's keys are the same words)."""

    def build(groups, cfg, model):
        from .. import optim

        base, kwargs = _base(cfg.base, cfg)
        try:
            return getattr(optim, class_name)(groups, base, **{key: getattr(cfg, key) for key in keywords},
                                              model=model, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"optim settings for {cfg.name}: {exc}") from None

    return OptimizerSpec(build, ("base", *keywords, *reads), **spec)


NEXUS_SOURCE_ORDERS = ("cycle", "random", "mixed")


def _check_nexus(config: TrainConfig) -> None:
    k = config.optim.inner_steps
    if not isinstance(k, int) or k < 1 or config.data.batch_size % k:
        raise UserError(f"optim.inner_steps ({k}) must be a whole number >= 1 that divides data.batch_size "
                        f"({config.data.batch_size}): each inner step reads batch_size/inner_steps sequences")
    if config.optim.source_order not in NEXUS_SOURCE_ORDERS:
        raise UserError(f"optim.source_order must be one of {', '.join(NEXUS_SOURCE_ORDERS)}, "
                        f"got '{config.optim.source_order}'")


_SAM = ("rho", "precondition", "rho_warmup_steps")

OPTIMIZER_REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": _plain("adamw", ("betas", "eps")),
    "sgd": _plain("sgd", ("momentum",)),
    "sam": _wrapping("SAM", _SAM),
    "functional-sam": _wrapping("FunctionalSAM", _SAM),
    "angle-sam": _wrapping("AngleSAM", (*_SAM, "phi")),
    "nexus": _wrapping("Nexus", ("inner_steps", "inner_lr", "pseudo_grad", "inner_lr_follows_schedule"),
                       reads=("source_order",), check=_check_nexus, micro_batches=True),
}
"""``optim.name`` -> how to build it; the order is the order the CLI lists them in."""


def optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry of ``name``; an unknown name is a user mistake."""
    if name not in OPTIMIZER_REGISTRY:
        raise UserError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZER_REGISTRY)}")
    return OPTIMIZER_REGISTRY[name]


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters. The SAM family and Nexus get the
    model as trained later (``optimizer.model = ...``) when it is wrapped for DDP."""
    # No weight decay on biases, norms and embeddings' 1-D parameters (standard practice).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return optimizer_spec(cfg.name).build(groups, cfg, model)


def plain_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that takes the update: the base of a SAM-family or Nexus wrapper
    (whose state holds Adam's moments), else the optimizer itself."""
    return getattr(optimizer, "base", optimizer)
