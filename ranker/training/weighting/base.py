"""The weighting contract: per-task losses in, one backward pass over the model out.

Loss-weighting methods only choose scalars (``LossWeighting.combine``). Gradient methods
(PCGrad, MGDA, CAGrad) rewrite the shared parameters' gradient; every one of them returns a
linear combination d = sum_t c_t g_t of the task gradients whose coefficients depend only on
the Gram matrix G_ij = g_i . g_j, so a ``GradientWeighting`` implements one function,
``coefficients(G, losses) -> c``, and the base class does the autograd: it takes the task
gradients on the shared parameters (or on the shared representation, cheaper), writes d into
the shared parameters' ``.grad``, and gives every other parameter (the heads) its own task's
gradient only. All methods see the same ``StepContext``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ranker.config import GradientParams, TaskSpec
from ranker.training.distributed import Collective


@dataclass
class StepContext:
    """What a weighting may look at during one optimisation step.

    shared: parameters every task's loss flows through (encoder and trunk);
    epoch/step: position in training, for methods with a schedule or history;
    specific: every other trainable model parameter (heads); gradient methods give each of them
        only its own task's gradient;
    rep: the encoder output of this step (B, in), shared by all tasks; gradient methods with
        ``gradients: representation`` take task gradients here instead of on ``shared``;
    tables: the shared parameters with row-sparse gradients (``train.sparse_embeddings``):
        gradient methods on the parameters keep their task gradients as rows.
    """

    shared: list[nn.Parameter]
    epoch: int = 0
    step: int = 0
    specific: list[nn.Parameter] = field(default_factory=list)
    rep: torch.Tensor | None = None
    # data-parallel training (see ranker.training.distributed): each rank's ``losses`` are its
    # share of the global loss and its ``.grad`` must end up holding its share of the update;
    # ``values`` are the global loss values (the shares summed over ranks), None = one process
    ranks: Collective = field(default_factory=lambda: Collective.single(torch.device("cpu")))
    values: dict[str, float] | None = None
    loss_scale: float = 1.0  # fp16: what backpropagated losses are multiplied by (GradScaler)
    tables: list[nn.Parameter] = field(default_factory=list)

    def loss_values(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The global value of each task's loss (what one process would see)."""
        if self.values is not None:
            return {t: self.values[t] for t in losses}
        return {t: float(v.detach()) for t, v in losses.items()}

    def backprop(self, total: torch.Tensor, inputs: Sequence[torch.Tensor] | None = None, retain_graph: bool = False) -> None:
        """``total.backward`` with the fp16 loss scale applied."""
        scaled = total * self.loss_scale if self.loss_scale != 1.0 else total
        scaled.backward(inputs=list(inputs) if inputs is not None else None, retain_graph=retain_graph)


class Weighting(nn.Module):
    """Base class. ``losses`` holds only tasks with labelled rows in this batch (a masked task
    may be absent); implementations must cope with any non-empty subset."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.tasks = [t.name for t in tasks]

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        """Backpropagate; returns the weight applied to each task's loss (for logging)."""
        raise NotImplementedError

    def after_step(self, losses_after: Callable[[], dict[str, float]]) -> None:
        """Called once the optimiser has stepped. ``losses_after()`` gives the global loss of
        each task of this step on the same batch under the updated parameters: one more
        forward, paid only by a method that calls it. Nothing by default."""


class LossWeighting(Weighting):
    """Methods that backpropagate sum_t w_t * L_t (+ a regulariser); subclasses give ``combine``."""

    def combine(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        total, weights = self.combine(losses, ctx)
        ctx.backprop(total)
        return weights


def _dense(grad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``grad`` as a dense tensor shaped like ``x``: zeros where the input was not reached, a
    row-sparse table gradient (``train.sparse_embeddings``) filled in."""
    if grad is None:
        return torch.zeros_like(x)
    return grad.to_dense() if grad.is_sparse else grad


def table_gradients(losses: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor], tables: Sequence[nn.Parameter] = (),
                    loss_scale: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each task's gradient on dense ``inputs``, flattened (T, P) in ``losses`` order, and on
    the row-sparse ``tables`` as rows: one sparse tensor per table of shape (T * rows, dim)
    whose row t * rows + r is task t's gradient on row r. So a gradient method's cost on a
    table is the rows the batch touched, not the table. One backward per task serves both.

    The graph is retained so the caller can still backpropagate. An input a task does not
    reach contributes zeros. With an fp16 ``loss_scale`` the losses are scaled before and the
    gradients unscaled after, so small gradients survive the half-precision backward.
    """
    both, n = [*inputs, *tables], len(inputs)
    dense_rows, parts = [], [[] for _ in tables]
    for loss in losses.values():
        grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, both, retain_graph=True, allow_unused=True)
        dense_rows.append(torch.cat([_dense(g, x).reshape(-1).float() for g, x in zip(grads[:n], inputs, strict=True)])
                          if inputs else torch.zeros(0))
        for k, g in enumerate(grads[n:]):
            parts[k].append(None if g is None else g.coalesce() if g.is_sparse else g.to_sparse(1))
    stacked = []
    for k, w in enumerate(tables):
        rows = w.shape[0]
        idx = [g.indices()[0] + t * rows for t, g in enumerate(parts[k]) if g is not None]
        val = [g.values().float() for g in parts[k] if g is not None]
        idx_t = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long, device=w.device)
        val_t = torch.cat(val) if val else torch.zeros((0, *w.shape[1:]), device=w.device)
        g = torch.sparse_coo_tensor(idx_t.unsqueeze(0), val_t, (len(losses) * rows, *w.shape[1:]), check_invariants=False).coalesce()
        stacked.append(g / loss_scale if loss_scale != 1.0 else g)
    dense = torch.stack(dense_rows)  # (T, P)
    return (dense / loss_scale if loss_scale != 1.0 else dense), stacked


def global_gram(grads: torch.Tensor, on_rep: bool, ranks: Collective, tables: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The global Gram matrix (T, T), the same on every rank, from this rank's (T, P).

    On the shared parameters the global gradient is the sum of the ranks' (T, P) matrices,
    and on each table (``table_gradients``' (T * rows, dim) rows) the sum of the ranks' rows;
    a table adds the Gram of the rows some task touched. On the representation each rank's P
    covers its own rows, so the global Gram is the sum of the ranks' Gram matrices.
    """
    if on_rep:
        return ranks.sum(grads @ grads.T)
    total = ranks.sum(grads)
    gram = total @ total.T
    for g in ranks.sum_sparse(tables):
        gram = gram + rows_gram(g, len(grads)).to(gram.device)
    return gram


def rows_gram(g: torch.Tensor, tasks: int) -> torch.Tensor:
    """The (T, T) Gram of ``table_gradients``' (T * rows, dim) rows of one table: task
    gradients compacted to the rows some task touched, then one small matrix product."""
    rows = g.shape[0] // tasks
    task, row = g.indices()[0] // rows, g.indices()[0] % rows
    touched, at = torch.unique(row, return_inverse=True)
    m = torch.zeros((tasks, len(touched), *g.shape[1:]), dtype=g.dtype, device=g.device)
    m[task, at] = g.values()
    m = m.reshape(tasks, -1)  # (T, touched rows x dim)
    return m @ m.T


def task_rows(g: torch.Tensor, t: int, table: nn.Parameter) -> torch.Tensor:
    """Task ``t``'s gradient on ``table`` (row-sparse, the table's shape) out of
    ``table_gradients``' (T * rows, dim) rows."""
    n = table.shape[0]
    idx = g.indices()[0]
    keep = idx // n == t
    return torch.sparse_coo_tensor((idx[keep] % n).unsqueeze(0), g.values()[keep], table.shape, check_invariants=False).coalesce()


def table_direction(c: torch.Tensor, rows: torch.Tensor, table: nn.Parameter) -> torch.Tensor:
    """sum_t c_t g_t on one table, row-sparse, from ``table_gradients``' (T * rows, dim) rows."""
    n = table.shape[0]
    idx = rows.indices()[0]
    values = rows.values() * c.to(rows.values())[idx // n].view(-1, *([1] * (rows.dim() - 1)))
    return torch.sparse_coo_tensor((idx % n).unsqueeze(0), values.to(table.dtype), table.shape, check_invariants=False).coalesce()


def gradient_inputs(method: Weighting, gradients: str, ctx: StepContext) -> list[torch.Tensor]:
    """What task gradients are taken with respect to: the shared parameters (the row-sparse
    ``ctx.tables`` apart: ``table_gradients`` keeps them as rows) or ``ctx.rep``."""
    if gradients == "parameters":
        return [p for p in ctx.shared if all(p is not q for q in ctx.tables)]
    if ctx.rep is None:
        raise ValueError(f"{type(method).__name__}: gradients='representation' needs StepContext.rep")
    return [ctx.rep]


def _accumulate(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    """Add a flat gradient (P,) into ``params``' ``.grad``, parameter by parameter."""
    i = 0
    for p in params:
        g = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad += g


class GradientWeighting(Weighting):
    """A gradient method: shared-parameter gradient d = sum_t c_t g_t, c = ``coefficients(G)``.

    Args:
        tasks: configured tasks (the ones with a loss).
        params: where the task gradients are taken (``gradients``).
    """

    def __init__(self, tasks: Sequence[TaskSpec], params: GradientParams) -> None:
        super().__init__(tasks)
        self.gradients = params.gradients

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """gram (T, T) float64, losses (T,) -> coefficients c (T,) of the task gradients."""
        raise NotImplementedError

    def direction(self, grads: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """The combined direction for task gradients given as rows of ``grads`` (T, P) -> (P,)."""
        g = grads.double()
        values = np.ones(len(grads)) if losses is None else losses.detach().double().numpy()
        c = torch.from_numpy(self.coefficients((g @ g.T).numpy(), values))
        return (c @ g).to(grads.dtype)

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        on_rep = self.gradients == "representation"
        inputs = gradient_inputs(self, self.gradients, ctx)
        tables = [] if on_rep else ctx.tables
        local, rows = table_gradients(losses, inputs, tables, ctx.loss_scale)  # (T, P) and the tables' rows
        gram = global_gram(local, on_rep, ctx.ranks, rows)  # every rank: the same (T, T)
        values = np.array(list(ctx.loss_values(losses).values()))
        c = self.coefficients(gram.double().numpy(), values)  # (T,), identical on every rank
        if on_rep:  # d on the shared parameters = backward of sum_t c_t L_t
            total = sum(float(ci) * loss for ci, loss in zip(c, losses.values(), strict=True))
            ctx.backprop(total, ctx.shared, retain_graph=bool(ctx.specific))  # type: ignore[arg-type]
        else:  # this rank's share c @ g_local; the shares add up to c @ g_global
            scale = ctx.loss_scale  # .grad holds scaled gradients under fp16
            cs = torch.from_numpy(c).to(local.device, local.dtype)
            d = cs @ local
            _accumulate(inputs, d * scale if scale != 1.0 else d)  # type: ignore[arg-type]
            for w, r in zip(tables, rows, strict=True):
                dw = table_direction(cs * scale, r, w)
                w.grad = dw if w.grad is None else w.grad + dw
        if ctx.specific:  # heads: each its own task's gradient, untouched by the method
            ctx.backprop(sum(losses.values()), ctx.specific)  # type: ignore[arg-type]
        return {t: float(ci) for t, ci in zip(losses, c, strict=True)}


def seeded_rng() -> np.random.Generator:
    """A private generator seeded from torch's seed (the trainer sets it from ``train.seed``),
    so random methods are reproducible without drawing from the global stream."""
    return np.random.default_rng(torch.initial_seed())
