"""Task heads: a tower MLP and a scalar output; the head knows how its output maps to a score.

Binary heads output logits; scores are probabilities. Regression heads predict the
standardised transformed target, (transform(y) - mean) / std; scores come back in label units.
The loss itself lives in training. A new head type is one class plus one ``HEADS`` entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import TaskSpec
from ranker.errors import RankerError
from ranker.model.layers import mlp


class BinaryHead(nn.Module):
    """Tower MLP -> one logit per row."""

    def __init__(self, task: TaskSpec, in_dim: int, tower_dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.tower = mlp(in_dim, tower_dims, dropout)
        self.out = nn.Linear(tower_dims[-1] if tower_dims else in_dim, 1)

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return self.out(self.tower(rep)).squeeze(-1)  # (B,)

    def score(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw)

    def target(self, label: torch.Tensor) -> torch.Tensor:
        return label


class RegressionHead(BinaryHead):
    """Tower MLP -> standardised transformed target; ``score`` undoes both."""

    def __init__(self, task: TaskSpec, in_dim: int, tower_dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__(task, in_dim, tower_dims, dropout)
        self.log1p = task.transform == "log1p"
        # set from training-label statistics; saved with the weights
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def target(self, label: torch.Tensor) -> torch.Tensor:
        y = torch.log1p(label.clamp_min(0)) if self.log1p else label
        return (y - self.target_mean) / self.target_std

    def score(self, raw: torch.Tensor) -> torch.Tensor:
        y = raw * self.target_std + self.target_mean
        return torch.expm1(y).clamp_min(0) if self.log1p else y


HEADS: dict[str, type[BinaryHead]] = {"binary": BinaryHead, "regression": RegressionHead}


def build_head(task: TaskSpec, in_dim: int, tower_dims: Sequence[int], dropout: float) -> BinaryHead:
    if task.type not in HEADS:
        raise RankerError(f"task {task.name!r}: unknown type {task.type!r}; valid: {', '.join(HEADS)}")
    return HEADS[task.type](task, in_dim, tower_dims, dropout)
