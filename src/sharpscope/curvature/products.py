"""Curvature-vector products: Hessian (H·v) and generalised Gauss–Newton (G·v).

Three ways to form H·v on the mean loss over a list of batches:

* ``"reuse"``: build the first-order graph once per batch (``create_graph=True``) and
  answer each product with one backward through it, no new forward. Cheapest per product
  when many products are taken on the same batches (Lanczos, Hutchinson); holds the
  graphs of all batches in memory while the operator is open.
* ``"double"``: a fresh forward and double backward for every product (memory of one
  batch at a time).
* ``"jvp"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``, per product
  and batch; falls back to ``"double"`` if an operator has no forward-mode rule.

``"auto"`` takes ``"reuse"`` for up to 8 batches and ``"double"`` beyond. Attention runs
on the math kernel in every mode (the fused kernels have no double backward).

The GGN for a loss ℓ(z) on model outputs z = f(θ) (logits) is G = Jᵀ·∇²_z ℓ·J, the PSD
part of H = G + Σ_k (∂ℓ/∂z_k)·∇²_θ z_k. G·v = Jᵀ(∇²_z ℓ·(J·v)) is formed from the kept
output graph: J·v by differentiating a vector-Jacobian product with respect to its
cotangent, ∇²_z ℓ by double backward through the loss, Jᵀ· by one more backward.

Operators are context managers: on entry they take the state guard (eval mode by
default) and build graphs; on exit they free the graphs and restore the model exactly.
A model sharded with fully_shard (FSDP2) is held unsharded while an operator is open:
graphs are built on the full parameters, vectors go in and come out sharded like the
parameters (see ``fsdp``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..tensors import fsdp
from ..tensors import vectors as vec
from ..tensors.objective import LossFn, Objective, full_precision
from ..tensors.state import StateGuard, trainable_parameters, unwrap_model

__all__ = [
    "HessianOperator",
    "GGNOperator",
    "hessian_vector_product",
    "ggn_vector_product",
    "cross_entropy_on_outputs",
]

MAX_REUSE_BATCHES = 8


def cross_entropy_on_outputs(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of logits ``outputs`` (…×V) against the batch's targets.

    The targets are ``batch[1]`` for a tuple or list batch, else ``batch["labels"]`` or
    ``batch["targets"]`` for a dict; positions with target -100 are ignored.
    """
    if isinstance(batch, (tuple, list)):
        targets = batch[1]
    elif isinstance(batch, dict):
        targets = batch.get("labels", batch.get("targets"))
    else:
        targets = None
    if targets is None:
        raise ValueError(
            "cannot find targets in the batch: use (inputs, targets), a dict with 'labels' "
            "or 'targets', or pass output_loss_fn"
        )
    logits = full_precision(outputs.reshape(-1, outputs.shape[-1]))  # softmax statistics in float32
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100)


class _Operator:
    """Shared plumbing: guard, parameters, product counter and rank averaging."""

    def __init__(self, model, objective: Objective, mode):
        self.model = unwrap_model(model)
        self.objective = objective
        self.mode = mode
        self.params = trainable_parameters(self.model)
        if not self.params:
            raise ValueError("the model has no parameters with requires_grad")
        self.matvecs = 0
        self._guard: StateGuard | None = None
        self._stack: contextlib.ExitStack | None = None
        self._view: fsdp.FullParameters | None = None
        # The tensors autograd differentiates with respect to: the parameters, or for a
        # sharded model their full (all-gathered) stand-ins; set while the operator is open.
        self.graph_params: list[torch.Tensor] | None = None

    @property
    def dim(self) -> int:
        return vec.numel(self.params)

    @property
    def n_batches(self) -> int:
        return len(self.objective.batches)

    def __enter__(self):
        stack = contextlib.ExitStack()
        self._guard = stack.enter_context(StateGuard(self.model, mode=self.mode))
        self._stack = stack
        try:
            torch.set_grad_enabled(True)
            # A sharded (FSDP2) model is held unsharded while the operator is open: its
            # graphs are built on the full parameters (see fsdp).
            self._view = stack.enter_context(fsdp.full_parameters(self.model, self.params))
            self.graph_params = self._view.full
            stack.callback(self._release)
            self._build()
        except BaseException as err:
            self._close(type(err), err, err.__traceback__)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close(*exc)

    def _close(self, *exc) -> None:
        stack, self._stack = self._stack, None
        self._guard = self._view = None
        self.graph_params = None
        if stack is not None:
            stack.__exit__(*exc)

    def _build(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def _check_open(self) -> None:
        if self._guard is None:
            raise RuntimeError("use the operator inside a `with` block")

    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._check_open()
        v = self._view.gather(vec.check_aligned(v, self.params, "vector"))
        out = vec.zeros_like(self.graph_params)
        with torch.enable_grad():
            for i in range(self.n_batches):
                self._accumulate(i, v, out)
        self.matvecs += 1
        return self._view.shard(self.objective.batch_mean_(out))

    def gradient(self) -> list[torch.Tensor]:
        """∇L at the current θ (the mean over batches and ranks)."""
        self._check_open()
        return self.objective.gradient(self.params, second_order=True)


def _grads(output, inputs, *, create_graph, grad_outputs=None, retain_graph=None):
    return torch.autograd.grad(
        output, inputs, grad_outputs=grad_outputs, create_graph=create_graph,
        retain_graph=retain_graph, allow_unused=True,
    )


def _backward_through(grads: Sequence[torch.Tensor | None], params, v, out) -> None:
    """out += ∂⟨grads, v⟩/∂θ, i.e. one Hessian-vector product through a kept graph."""
    pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
    if not pairs:
        return
    outputs, cotangents = zip(*pairs)
    hv = torch.autograd.grad(
        outputs, params, grad_outputs=cotangents, retain_graph=True, allow_unused=True
    )
    for acc, h in zip(out, hv):
        if h is not None:
            acc.add_(h.detach())


class HessianOperator(_Operator):
    """v ↦ H·v for the mean loss of ``loss_fn`` over ``batches`` (see the module doc)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batches: Any,
        *,
        method: str = "auto",
        mode: str | None = "eval",
        autocast: torch.dtype | None = None,
        distributed: bool | str = "auto",
        process_group=None,
        seed: int = 0,
    ):
        if method not in ("auto", "reuse", "double", "jvp"):
            raise ValueError(f"method must be 'auto', 'reuse', 'double' or 'jvp', not {method!r}")
        objective = Objective(
            unwrap_model(model), loss_fn, batches, autocast=autocast, seed=seed,
            distributed=distributed, process_group=process_group,
        )
        super().__init__(model, objective, mode)
        if method == "auto":
            method = "reuse" if self.n_batches <= MAX_REUSE_BATCHES else "double"
        self.method = method
        self._graphs: list | None = None

    def _build(self) -> None:
        if self.method == "reuse":
            self._graphs = []
            for i in range(self.n_batches):
                loss = self.objective.loss(i, second_order=True)
                self._graphs.append(_grads(loss, self.graph_params, create_graph=True))

    def _release(self) -> None:
        self._graphs = None

    def _accumulate(self, i: int, v, out) -> None:
        if self.method == "reuse":
            _backward_through(self._graphs[i], self.graph_params, v, out)
        elif self.method == "jvp":
            try:
                hv = self._jvp_product(i, v)
            except (NotImplementedError, RuntimeError) as err:
                if not _unsupported_by_transforms(err):
                    raise
                # Some operators have no forward-mode rule, and torch.func refuses models
                # that update buffers in place (BatchNorm in train mode): use double
                # backward from now on.
                self.method = "double"
                self._accumulate(i, v, out)
                return
            for acc, h in zip(out, hv):
                acc.add_(h)
        else:
            loss = self.objective.loss(i, second_order=True)
            grads = _grads(loss, self.graph_params, create_graph=True)
            _backward_through(grads, self.graph_params, v, out)

    def _jvp_product(self, i: int, v) -> list[torch.Tensor]:
        names = ["model." + n for n, p in self.model.named_parameters() if p.requires_grad]
        caller = _Caller(self.model, lambda: self.objective.loss(i, second_order=True))

        def loss_at(flat):
            return torch.func.functional_call(caller, dict(zip(names, flat)), (), strict=False)

        primals = tuple(p.detach() for p in self.graph_params)
        with warnings.catch_warnings():
            # torch scripts its forward-AD decompositions on first use and warns that
            # torch.jit.script is deprecated: nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            _, hv = torch.func.jvp(torch.func.grad(loss_at), (primals,), (tuple(v),))
        return [h.detach() for h in hv]


def _unsupported_by_transforms(err: Exception) -> bool:
    """Whether an error is torch.func declining the model (no forward-mode rule for an
    operator, or an in-place update of a captured buffer), not an error of the user's."""
    text = str(err).lower()
    return any(
        key in text
        for key in ("forward ad", "forward-mode", "forward mode", "mutate a captured tensor")
    )


class _Caller(torch.nn.Module):
    """Holds the model as a submodule so torch.func.functional_call can swap its
    parameters while ``loss_fn(model, batch)`` runs unchanged."""

    def __init__(self, model: torch.nn.Module, call):
        super().__init__()
        self.model = model
        self._call = call

    def forward(self):
        return self._call()

def _outputs_and_loss(objective: Objective, i: int, forward_fn, output_loss_fn):
    with objective._context(i, second_order=True):
        outputs = forward_fn(objective.model, objective.batches[i])
        if not isinstance(outputs, torch.Tensor):
            raise TypeError("forward_fn must return the output tensor (the logits)")
        loss = output_loss_fn(outputs, objective.batches[i])
    return outputs, full_precision(loss)


class GGNOperator(_Operator):
    """v ↦ G·v, the generalised Gauss–Newton of ``output_loss_fn`` on ``forward_fn``'s
    outputs; ``forward_fn(model, batch)`` returns the logits and
    ``output_loss_fn(outputs, batch)`` the mean loss (cross-entropy by default).

    ``functional_matvec`` gives H_F·v = H·v − G·v on the same kept graphs, and ``hessian_matvec``
    the full H·v, so the decomposition needs one forward per batch in all.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forward_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        batches: Any,
        *,
        output_loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        mode: str | None = "eval",
        autocast: torch.dtype | None = None,
        distributed: bool | str = "auto",
        process_group=None,
        seed: int = 0,
    ):
        output_loss_fn = output_loss_fn or cross_entropy_on_outputs
        self.forward_fn = forward_fn
        self.output_loss_fn = output_loss_fn

        def loss_fn(model, batch):
            return output_loss_fn(forward_fn(model, batch), batch)

        objective = Objective(
            unwrap_model(model), loss_fn, batches, autocast=autocast, seed=seed,
            distributed=distributed, process_group=process_group,
        )
        super().__init__(model, objective, mode)
        self._kept: list | None = None
        self.hessian_matvecs = 0

    def _build(self) -> None:
        self._kept = []
        for i in range(self.n_batches):
            outputs, loss = _outputs_and_loss(self.objective, i, self.forward_fn, self.output_loss_fn)
            # dℓ/dz with its graph (for ∇²_z ℓ), Jᵀu with its graph (for J·v via ∂/∂u),
            # and ∇_θ ℓ with its graph (for the full H·v).
            dloss_dz = torch.autograd.grad(loss, outputs, create_graph=True)[0]
            u = torch.zeros_like(outputs, requires_grad=True)
            jt_u = _grads(outputs, self.graph_params, grad_outputs=u, create_graph=True)
            grads = _grads(loss, self.graph_params, create_graph=True)
            self._kept.append((outputs, dloss_dz, u, jt_u, grads))

    def _release(self) -> None:
        self._kept = None

    def _accumulate(self, i: int, v, out) -> None:
        outputs, dloss_dz, u, jt_u, _ = self._kept[i]
        pairs = [(g, vi) for g, vi in zip(jt_u, v) if g is not None]
        if not pairs:
            return
        jv = torch.autograd.grad(
            [g for g, _ in pairs], u, grad_outputs=[vi for _, vi in pairs],
            retain_graph=True, allow_unused=True,
        )[0]
        if jv is None:
            return
        hz_jv = torch.autograd.grad(dloss_dz, outputs, grad_outputs=jv, retain_graph=True)[0]
        gv = _grads(outputs, self.graph_params, grad_outputs=hz_jv.detach(), create_graph=False, retain_graph=True)
        for acc, h in zip(out, gv):
            if h is not None:
                acc.add_(h.detach())

    def gradient(self) -> list[torch.Tensor]:
        """∇L from the kept graphs (no new forward)."""
        self._check_open()
        out = vec.zeros_like(self.graph_params)
        for kept in self._kept:
            for acc, g in zip(out, kept[4]):
                if g is not None:
                    acc.add_(g.detach())
        return self._view.shard(self.objective.batch_mean_(out))

    def hessian_matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H·v through the same kept graphs (one backward per batch)."""
        self._check_open()
        v = self._view.gather(vec.check_aligned(v, self.params, "vector"))
        out = vec.zeros_like(self.graph_params)
        with torch.enable_grad():
            for i in range(self.n_batches):
                _backward_through(self._kept[i][4], self.graph_params, v, out)
        self.hessian_matvecs += 1
        return self._view.shard(self.objective.batch_mean_(out))

    def functional_matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_F·v = H·v − G·v, the functional-Hessian part."""
        return vec.sub(self.hessian_matvec(v), self.matvec(v))


def hessian_vector_product(
    model: torch.nn.Module, loss_fn: LossFn, batches: Any, vector: Sequence[torch.Tensor],
    *, method: str = "double", **options,
) -> list[torch.Tensor]:
    """One H·v (``method`` "double" or "jvp" suit a single product; see HessianOperator)."""
    with HessianOperator(model, loss_fn, batches, method=method, **options) as op:
        return op.matvec(vector)


def ggn_vector_product(
    model: torch.nn.Module, forward_fn, batches: Any, vector: Sequence[torch.Tensor], **options,
) -> list[torch.Tensor]:
    """One G·v (see GGNOperator)."""
    with GGNOperator(model, forward_fn, batches, **options) as op:
        return op.matvec(vector)
