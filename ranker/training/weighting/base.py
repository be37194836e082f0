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
        total.backward()
        return weights


def task_gradients(losses: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each task's gradient with respect to ``inputs``, flattened: (T, P) in ``losses`` order.

    The graph is retained so the caller can still backpropagate. An input a task does not
    reach contributes zeros.
    """
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(-1) for g, x in zip(grads, inputs, strict=True)]))
    return torch.stack(rows)  # (T, P)


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
        grads = task_gradients(losses, gradient_inputs(self, self.gradients, ctx))  # (T, P)
        values = np.array([float(v.detach()) for v in losses.values()])
        c = self.coefficients((grads @ grads.T).double().numpy(), values)  # (T,)
        if on_rep:  # d on the shared parameters = backward of sum_t c_t L_t
            total = sum(float(ci) * loss for ci, loss in zip(c, losses.values(), strict=True))
            total.backward(inputs=list(ctx.shared), retain_graph=bool(ctx.specific))  # type: ignore[union-attr]
        else:
            _accumulate(ctx.shared, torch.from_numpy(c).to(grads.dtype) @ grads)
        if ctx.specific:  # heads: each its own task's gradient, untouched by the method
            sum(losses.values()).backward(inputs=list(ctx.specific))  # type: ignore[union-attr]
        return {t: float(ci) for t, ci in zip(losses, c, strict=True)}


def seeded_rng() -> np.random.Generator:
    """A private generator seeded from torch's seed (the trainer sets it from ``train.seed``),
    so random methods are reproducible without drawing from the global stream."""
    return np.random.default_rng(torch.initial_seed())
