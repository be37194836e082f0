"""Shared-Bottom (Caruana 1997): one MLP shared by all tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import ModelConfig
from ranker.model.layers import mlp


class SharedBottom(nn.Module):
    """One bottom MLP of widths ``expert_dims``; every task reads the same representation.

    Example:
        >>> t = SharedBottom(ModelConfig(architecture="shared_bottom", expert_dims=[16]), 8, ["a", "b"])
        >>> t(torch.randn(4, 8), ["a"])["a"].shape
        torch.Size([4, 16])
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, tasks: list[str]) -> None:
        super().__init__()
        self.bottom = mlp(in_dim, cfg.expert_dims, cfg.dropout)
        self.out_dim = cfg.expert_dims[-1]
        self.last_gates: dict[str, torch.Tensor] = {}

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters only one task's loss reaches: none, every task reads the one MLP."""
        return []

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        h = self.bottom(x)  # (B, D)
        return {t: h for t in tasks}
