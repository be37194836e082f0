"""MMoE (Ma et al., KDD 2018): a pool of experts shared by all tasks, one softmax gate per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import ModelConfig
from ranker.model.layers import ExpertBank, mix


class MMoE(nn.Module):
    """``experts`` MLP experts (widths ``expert_dims``) run as one batched op; task t's
    representation is its gate's softmax mixture of them. Only requested tasks' gates run.

    Example:
        >>> t = MMoE(ModelConfig(experts=4, expert_dims=[16, 8]), 10, ["ctr", "cvr"])
        >>> t(torch.randn(5, 10), ["cvr"])["cvr"].shape
        torch.Size([5, 8])
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, tasks: list[str]) -> None:
        super().__init__()
        self.experts = ExpertBank(cfg.experts, in_dim, cfg.expert_dims, cfg.dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, cfg.experts) for t in tasks})
        self.out_dim = cfg.expert_dims[-1]
        self.last_gates: dict[str, torch.Tensor] = {}

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters only one task's loss reaches: every task's gate."""
        return list(self.gates.parameters())

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        e = self.experts(x)  # (E, B, D)
        out = {}
        for t in tasks:
            g = torch.softmax(self.gates[t](x), dim=-1)  # (B, E)
            self.last_gates[t] = g
            out[t] = mix(g, e)  # (B, D)
        return out
