"""Position-bias towers (YouTube's shallow tower, Zhao et al. RecSys 2019; PAL, Guo et al.
RecSys 2019).

Logged clicks depend on where an item was shown as well as on how relevant it is. A shallow
tower over the display context (position, and whatever else a task names in
``bias_features``) learns that part of the logit; its output adds to the task's logit while
training, so the main model is not asked to explain position by the features that put an item
high in the old ranking. In evaluation and serving the tower does not run: the served score is
the position-free one, and requests never carry the bias features.

The additive split leaves one constant free between the tower and the task's logit, so the
level of the served probability is that of a reference context; its ranking is what the tower
corrects. The output layer starts at zero: training starts from the plain model.

The tower's logit is its output layer's times ``model.bias_tower_gain`` (default 10). Under
Adam each parameter moves about lr per step whatever its gradient's size, so a few tower
parameters race the main model's many for the part of the position effect that features
correlated with position (those the old ranking promoted) can also explain, and at gain 1 they
lose: on 400k synthetic rows, 3 epochs, the tower had learnt a third of the generator's
-log(position) curve (slot 9: -0.69 against -2.20); at gain 10 it learnt it (slot 9: -2.32).
The gain is the same as a 10x learning rate for the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import FeatureSpec, ModelConfig
from ranker.model.encoder import numeric_embedding
from ranker.model.layers import mlp


class BiasTower(nn.Module):
    """Bias features of one task -> one logit per row.

    Reads ``batch["bias:<name>"]`` (B,): a bucket for a categorical feature (embedded ``dim``
    wide), an encoded number for a dense one (embedded if its encoding is piecewise_linear or
    periodic, else taken as it is).

    Args:
        features: the task's bias features.
        cfg: model settings (``bias_tower_dims``, periodic frequencies).

    Example:
        >>> from ranker.config import FeatureSpec as F
        >>> tower = BiasTower([F(name="position", type="categorical", buckets=20, dim=4)], ModelConfig())
        >>> tower({"bias:position": torch.tensor([1, 2, 3])}).shape
        torch.Size([3])
    """

    def __init__(self, features: Sequence[FeatureSpec], cfg: ModelConfig) -> None:
        super().__init__()
        self.names = [f.name for f in features]
        self.embed = nn.ModuleDict()
        width = 0
        for f in features:
            if f.type == "categorical":
                table = nn.Embedding(f.buckets + 1, f.dim)  # type: ignore[operator]
                nn.init.normal_(table.weight, std=0.05)
                self.embed[f.name] = table
                width += f.dim  # type: ignore[operator]
            elif f.embedded:
                self.embed[f.name] = numeric_embedding(f.encoding, 1, f.dim, f.bins, cfg)  # type: ignore[arg-type]
                width += f.dim  # type: ignore[operator]
            else:
                width += 1
        self.tower = mlp(width, cfg.bias_tower_dims)
        self.out = nn.Linear(cfg.bias_tower_dims[-1] if cfg.bias_tower_dims else width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gain = cfg.bias_tower_gain

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name in self.names:
            x = batch[f"bias:{name}"]  # (B,)
            if name in self.embed:
                mod = self.embed[name]
                parts.append(mod(x) if isinstance(mod, nn.Embedding) else mod(x.unsqueeze(1)))  # (B, dim)
            else:
                parts.append(x.unsqueeze(1))  # (B, 1)
        return self.gain * self.out(self.tower(torch.cat(parts, dim=1))).squeeze(-1)  # (B,)
