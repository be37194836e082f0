"""Random Loss Weighting (Lin et al., TMLR 2022).

Every step draws fresh weights w = T softmax(z), z ~ N(0, I), over the tasks present in the
batch: they sum to the number of tasks, and no task is favoured in expectation. Draws come from
a private generator seeded from torch's seed, so a run is reproducible from ``train.seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ranker.config import TaskSpec
from ranker.training.weighting.base import LossWeighting, StepContext, seeded_rng


class RLW(LossWeighting):
    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.rng = seeded_rng()

    def combine(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        z = self.rng.standard_normal(len(losses))
        w = len(losses) * np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        total = sum(float(wi) * loss for wi, loss in zip(w, losses.values(), strict=True))
        return total, {t: float(wi) for t, wi in zip(losses, w, strict=True)}  # type: ignore[return-value]

    def get_extra_state(self) -> dict:
        """The private generator's state, so a resumed run draws the same numbers."""
        return {"rng": self.rng.bit_generator.state}

    def set_extra_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
