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

from collections.abc import Sequence
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
        ``gradients: representation`` take task gradients here instead of on ``shared``.
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


def task_gradients(losses: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor], loss_scale: float = 1.0) -> torch.Tensor:
    """Each task's gradient with respect to ``inputs``, flattened: (T, P) in ``losses`` order.

    The graph is retained so the caller can still backpropagate. An input a task does not
    reach contributes zeros. With an fp16 ``loss_scale`` the losses are scaled before and the
    gradients unscaled after, so small gradients survive the half-precision backward.
    """
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, list(inputs), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([_dense(g, x).reshape(-1).float() for g, x in zip(grads, inputs, strict=True)]))
    g = torch.stack(rows)  # (T, P)
    return g / loss_scale if loss_scale != 1.0 else g


def global_gram(grads: torch.Tensor, on_rep: bool, ranks: Collective) -> tuple[torch.Tensor, torch.Tensor]:
    """(global task gradients or None-equivalent, global Gram matrix) from this rank's (T, P).

    On the shared parameters the global gradient is the sum of the ranks' (T, P) matrices.
    On the representation each rank's P covers its own rows, so the global Gram is the sum of
    the ranks' Gram matrices and the gradients themselves stay local.
    """
    if on_rep:
        return grads, ranks.sum(grads @ grads.T)
    total = ranks.sum(grads)
    return total, total @ total.T


def gradient_inputs(method: Weighting, gradients: str, ctx: StepContext) -> list[torch.Tensor]:
    """What task gradients are taken with respect to: the shared parameters or ``ctx.rep``."""
    if gradients == "parameters":
        return list(ctx.shared)
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
        local = task_gradients(losses, gradient_inputs(self, self.gradients, ctx), ctx.loss_scale)  # (T, P)
        _, gram = global_gram(local, on_rep, ctx.ranks)  # every rank: the same (T, T)
        values = np.array(list(ctx.loss_values(losses).values()))
        c = self.coefficients(gram.double().numpy(), values)  # (T,), identical on every rank
        if on_rep:  # d on the shared parameters = backward of sum_t c_t L_t
            total = sum(float(ci) * loss for ci, loss in zip(c, losses.values(), strict=True))
            ctx.backprop(total, ctx.shared, retain_graph=bool(ctx.specific))  # type: ignore[arg-type]
        else:  # this rank's share c @ g_local; the shares add up to c @ g_global
            d = torch.from_numpy(c).to(local.device, local.dtype) @ local
            _accumulate(ctx.shared, d * ctx.loss_scale if ctx.loss_scale != 1.0 else d)  # .grad holds scaled gradients under fp16
        if ctx.specific:  # heads: each its own task's gradient, untouched by the method
            ctx.backprop(sum(losses.values()), ctx.specific)  # type: ignore[arg-type]
        return {t: float(ci) for t, ci in zip(losses, c, strict=True)}


def seeded_rng() -> np.random.Generator:
    """A private generator seeded from torch's seed (the trainer sets it from ``train.seed``),
    so random methods are reproducible without drawing from the global stream."""
    return np.random.default_rng(torch.initial_seed())
