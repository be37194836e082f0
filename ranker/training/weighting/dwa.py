"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

w_t(e) = T exp(r_t(e-1) / temperature) / sum_j exp(r_j(e-1) / temperature), with
r_t(e-1) = L_t(e-1) / L_t(e-2) the ratio of the task's mean training loss over the last two
epochs: a task whose loss falls slowly gets more weight. Weights are 1 for the first two
epochs (and for a task without two epochs of history yet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ranker.config import DWAParams, TaskSpec
from ranker.training.weighting.base import LossWeighting, StepContext


class DWA(LossWeighting):
    def __init__(self, tasks: Sequence[TaskSpec], params: DWAParams | None = None) -> None:
        super().__init__(tasks)
        self.temperature = (params or DWAParams()).temperature
        self.epoch = 0
        self.sums: dict[str, list[float]] = {t: [0.0, 0.0] for t in self.tasks}  # loss sum, count
        self.history: dict[str, list[float]] = {t: [] for t in self.tasks}  # mean loss per epoch
        self.w = {t: 1.0 for t in self.tasks}

    def _close_epochs(self, epoch: int) -> None:
        while self.epoch < epoch:
            for t, (s, n) in self.sums.items():
                if n:
                    self.history[t].append(s / n)
            self.sums = {t: [0.0, 0.0] for t in self.tasks}
            self.epoch += 1
        ratios = {t: h[-1] / max(h[-2], 1e-12) for t, h in self.history.items() if len(h) >= 2}
        if len(ratios) == len(self.tasks):
            z = sum(math.exp(r / self.temperature) for r in ratios.values())
            self.w = {t: len(self.tasks) * math.exp(r / self.temperature) / z for t, r in ratios.items()}

    def combine(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        if ctx.epoch > self.epoch:
            self._close_epochs(ctx.epoch)
        for t, v in ctx.loss_values(losses).items():
            self.sums[t][0] += v
            self.sums[t][1] += 1
        total = sum(self.w[t] * loss for t, loss in losses.items())
        return total, {t: self.w[t] for t in losses}  # type: ignore[return-value]

    def get_extra_state(self) -> dict:
        """Loss history and current weights, so a resumed run weighs exactly as before."""
        return {"epoch": self.epoch, "sums": self.sums, "history": self.history, "w": self.w}

    def set_extra_state(self, state: dict) -> None:
        self.epoch, self.sums, self.history, self.w = state["epoch"], state["sums"], state["history"], state["w"]
