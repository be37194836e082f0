"""The weighting contract: per-task losses in, one backward pass over the model out.

Loss-weighting methods only choose scalars; gradient methods (which rewrite the shared
parameters' gradient) override ``backward`` whole. Both see the same ``StepContext``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ranker.config import TaskSpec


@dataclass
class StepContext:
    """What a weighting may look at during one optimisation step.

    shared: parameters every task's loss flows through (encoder and trunk);
    epoch/step: position in training, for methods with a schedule or history.
    """

    shared: list[nn.Parameter]
    epoch: int = 0
    step: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


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
