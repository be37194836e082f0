"""MultiTaskRanker: encoder -> trunk -> one head per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import FeatureSpec, ModelConfig, TaskSpec
from ranker.errors import RankerError
from ranker.model.bias import BiasTower
from ranker.model.encoder import Encoder
from ranker.model.esmm import ProductHead
from ranker.model.heads import build_head
from ranker.model.trunks import build_trunk


class MultiTaskRanker(nn.Module):
    """The whole multi-task model.

    ``forward(batch, tasks)`` returns ``{task: raw output (B,)}`` (logits for binary tasks) and
    runs only the requested tasks' gates and towers; the encoder and shared experts run once.
    A product task (ESMM's ctcvr) runs its factors' towers and returns only what was asked.
    ``predict`` returns scores instead (probabilities; regression in label units).
    ``last_encoding`` keeps the encoder output of the last call (B, in): the one representation
    every task shares, on which gradient weighting methods may act.
    Tasks with ``bias_features`` own a ``BiasTower`` whose logit is added to theirs in training
    mode only; in eval mode (evaluation, serving) the output is position-free and the batch
    needs no ``bias:*`` keys. Bias features are not encoder inputs.

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
        self.products = {t.name: list(t.product) for t in tasks if t.product}
        towers = [t for t in tasks if not t.product]
        by_name = {f.name: f for f in features}
        bias = {b for t in tasks for b in t.bias_features}
        self.encoder = Encoder([f for f in features if f.name not in bias], cfg)
        self.trunk = build_trunk(cfg, self.encoder.out_dim, [t.name for t in towers])
        self.heads = nn.ModuleDict(
            {t.name: ProductHead(t.product) if t.product else build_head(t, self.trunk.out_dim, cfg.tower_dims, cfg.dropout) for t in tasks}
        )
        self.bias_towers = nn.ModuleDict(
            {t.name: BiasTower([by_name[b] for b in t.bias_features], cfg) for t in towers if t.bias_features}
        )
        self.last_encoding: torch.Tensor | None = None

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters more than one task's loss reaches: the encoder and the trunk less
        what the trunk owns per task (``task_parameters``: MMoE's and PLE's last gates), which,
        like the heads, take only their own task's gradient under a gradient method."""
        own = {id(p) for p in self.trunk.task_parameters()}  # type: ignore[operator]
        return list(self.encoder.parameters()) + [p for p in self.trunk.parameters() if id(p) not in own]

    def resolve_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            return list(self.task_names)
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise RankerError(f"unknown task {unknown[0]!r}; valid: {', '.join(self.task_names)}")
        return list(dict.fromkeys(tasks))

    def forward(self, batch: dict[str, torch.Tensor], tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = self.resolve_tasks(tasks)
        towers = list(dict.fromkeys(f for t in names for f in self.products.get(t, [t])))
        x = self.encoder(batch)  # (B, in)
        if self.training:  # kept for gradient methods only; inference should not pin it
            self.last_encoding = x
        reps = self.trunk(x, towers)  # {task: (B, D)}
        raw = {t: self.heads[t](reps[t]) for t in towers}
        if self.training:  # the bias logit explains the logged context, never served
            for t in towers:
                if t in self.bias_towers:
                    raw[t] = raw[t] + self.bias_towers[t](batch)
        return {t: self.heads[t](raw) if t in self.products else raw[t] for t in names}

    def scores(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map raw outputs to scores, head by head."""
        return {t: self.heads[t].score(r) for t, r in raw.items()}

    def predict(self, batch: dict[str, torch.Tensor], tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.scores(self.forward(batch, tasks))


def _largest_size_key(features: Sequence[FeatureSpec], cfg: ModelConfig) -> str:
    """The sizing setting with the largest value (buckets x dim for a feature's table, a width
    for the model): where a typo that costs the memory most likely sits."""
    sizes: dict[str, int] = {}
    for i, f in enumerate(features):
        if f.buckets is not None or f.dim is not None:  # one table: name its larger side
            side = "buckets" if (f.buckets or 0) >= (f.dim or 0) else "dim"
            sizes[f"features[{i}].{side} ({f.name})"] = (f.buckets or 1) * (f.dim or 1)
    for key in ("expert_dims", "tower_dims", "bias_tower_dims"):
        for j, d in enumerate(getattr(cfg, key)):
            sizes[f"model.{key}[{j}]"] = d * d
    sizes["model.experts"] = cfg.experts * max(cfg.expert_dims)
    return max(sizes, key=sizes.__getitem__)


def build_ranker(features: Sequence[FeatureSpec], tasks: Sequence[TaskSpec], cfg: ModelConfig) -> MultiTaskRanker:
    """``MultiTaskRanker(features, tasks, cfg)``, or a one-line error naming the likeliest
    setting at fault when its parameters do not fit in memory (torch's allocator raises a
    RuntimeError, Python a MemoryError).

    Example:
        >>> from ranker.config import FeatureSpec as F, TaskSpec as T, ModelConfig as M
        >>> build_ranker([F(name="p", type="dense")], [T(name="ctr", type="binary", label="c")], M(tower_dims=[10**12]))
        Traceback (most recent call last):
        ...
        ranker.errors.RankerError: model: its parameters do not fit in memory (check model.tower_dims[0]); ...
    """
    try:
        return MultiTaskRanker(features, tasks, cfg)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "allocate" not in str(e):
            raise
        raise RankerError(f"model: its parameters do not fit in memory (check {_largest_size_key(features, cfg)}); "
                          f"{str(e).splitlines()[0][:200]}") from None
