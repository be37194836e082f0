"""MultiTaskRanker: encoder -> trunk -> one head per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import FeatureSpec, ModelConfig, TaskSpec
from ranker.errors import RankerError
from ranker.model.encoder import Encoder
from ranker.model.heads import build_head
from ranker.model.trunks import build_trunk


class MultiTaskRanker(nn.Module):
    """The whole multi-task model.

    ``forward(batch, tasks)`` returns ``{task: raw output (B,)}`` (logits for binary tasks) and
    runs only the requested tasks' gates and towers; the encoder and shared experts run once.
    ``predict`` returns scores instead (probabilities; regression in label units).

    Args:
        features: configured features (featurizer order).
        tasks: configured tasks.
        cfg: architecture and widths.

    Example:
        >>> from ranker.config import FeatureSpec as F, TaskSpec as T, ModelConfig as M
        >>> m = MultiTaskRanker([F(name="p", type="dense")], [T(name="ctr", type="binary", label="c")], M(experts=2, expert_dims=[8]))
        >>> m({"cat": torch.zeros(3, 0, dtype=torch.long), "dense": torch.randn(3, 1)})["ctr"].shape
        torch.Size([3])
    """

    def __init__(self, features: Sequence[FeatureSpec], tasks: Sequence[TaskSpec], cfg: ModelConfig) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.encoder = Encoder(features)
        self.trunk = build_trunk(cfg, self.encoder.out_dim, self.task_names)
        self.heads = nn.ModuleDict({t.name: build_head(t, self.trunk.out_dim, cfg.tower_dims, cfg.dropout) for t in tasks})

    def resolve_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            return list(self.task_names)
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise RankerError(f"unknown task {unknown[0]!r}; valid: {', '.join(self.task_names)}")
        return list(dict.fromkeys(tasks))

    def forward(self, batch: dict[str, torch.Tensor], tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = self.resolve_tasks(tasks)
        x = self.encoder(batch)  # (B, in)
        reps = self.trunk(x, names)  # {task: (B, D)}
        return {t: self.heads[t](reps[t]) for t in names}

    def scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map raw outputs to scores, head by head."""
        return {t: self.heads[t].score(r) for t, r in raw.items()}

    def predict(self, batch: dict[str, torch.Tensor], tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.scores(self.forward(batch, tasks))
