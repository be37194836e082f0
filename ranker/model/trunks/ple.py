"""PLE (Tang et al., RecSys 2020): stacked CGC levels of shared and task-owned experts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import ModelConfig
from ranker.model.layers import ExpertBank, mix


class _CGC(nn.Module):
    """One Customized Gate Control level.

    Task t mixes its own ``specific`` experts with the ``shared`` ones through its gate. On every
    level but the last, a shared gate also mixes *all* experts into the next level's shared input.
    Task-owned experts of all tasks live in one bank (task-major) so they run as one batched op.
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, tasks: list[str], last: bool) -> None:
        super().__init__()
        self.tasks, self.ks, self.kt = tasks, cfg.shared_experts, cfg.specific_experts
        self.shared = ExpertBank(self.ks, in_dim, cfg.expert_dims, cfg.dropout)
        self.specific = ExpertBank(len(tasks) * self.kt, in_dim, cfg.expert_dims, cfg.dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, self.kt + self.ks) for t in tasks})
        self.shared_gate = None if last else nn.Linear(in_dim, len(tasks) * self.kt + self.ks)

    def forward(
        self, shared_in: torch.Tensor, task_in: dict[str, torch.Tensor], tasks: Sequence[str]
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # the shared gate needs every task's experts; the last level needs only the requested ones
        run = list(self.tasks) if self.shared_gate is not None else list(tasks)
        pos = {t: self.tasks.index(t) for t in run}
        idx = torch.tensor([pos[t] * self.kt + j for t in run for j in range(self.kt)], device=shared_in.device)
        if all(task_in[t] is shared_in for t in run):  # first level: one input for every expert
            inputs = shared_in  # (B, in)
        else:
            inputs = torch.stack([task_in[t] for t in run]).repeat_interleave(self.kt, dim=0)  # (T*kt, B, in)
        spec = self.specific(inputs, idx)  # (len(run)*kt, B, D)
        shared = self.shared(shared_in)  # (ks, B, D)
        out, gates = {}, {}
        for t in tasks:
            i = run.index(t)
            experts = torch.cat([spec[i * self.kt : (i + 1) * self.kt], shared])  # (kt+ks, B, D)
            g = torch.softmax(self.gates[t](task_in[t]), dim=-1)  # (B, kt+ks)
            gates[t] = g
            out[t] = mix(g, experts)
        nxt = None
        if self.shared_gate is not None:
            g = torch.softmax(self.shared_gate(shared_in), dim=-1)  # (B, T*kt+ks)
            nxt = mix(g, torch.cat([spec, shared]))
        return nxt, out, gates


class PLE(nn.Module):
    """``levels`` CGC levels; task-owned experts per task ``specific_experts``, shared ``shared_experts``.

    Example:
        >>> t = PLE(ModelConfig(architecture="ple", levels=2, expert_dims=[16]), 10, ["a", "b"])
        >>> t(torch.randn(5, 10), ["b"])["b"].shape
        torch.Size([5, 16])
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = tasks
        dims = [in_dim] + [cfg.expert_dims[-1]] * (cfg.levels - 1)
        self.levels = nn.ModuleList(_CGC(cfg, d, tasks, last=i == cfg.levels - 1) for i, d in enumerate(dims))
        self.out_dim = cfg.expert_dims[-1]
        self.last_gates: dict[str, torch.Tensor] = {}

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters only one task's loss reaches: the task gates of the last level and of the
        level below it (whose outputs feed only that task's gate and experts on the last level,
        where no shared gate mixes them for the others). Task experts share one tensor with the
        other tasks' experts, so they are not among them; inner levels' task experts and gates
        reach every task through the shared gate."""
        return [p for level in self.levels[-2:] for p in level.gates.parameters()]

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        shared: torch.Tensor | None = x
        task_in = {t: x for t in self.tasks}
        out: dict[str, torch.Tensor] = {}
        for i, level in enumerate(self.levels):
            last = i == len(self.levels) - 1
            want = tasks if last else self.tasks  # inner levels feed every task's next level
            assert shared is not None
            shared, out, gates = level(shared, task_in, want)
            task_in = out
        self.last_gates = gates
        return out
