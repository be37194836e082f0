"""Encoder: featurized batch -> one dense vector per row (embeddings, bags, dense features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import FeatureSpec


class Encoder(nn.Module):
    """Embeds categorical features, pools multi-hot bags, appends standardised dense features.

    Categorical features of equal width share one concatenated table (per-feature offsets), so
    the lookup is one op per distinct width, not one per feature. Bag padding (``buckets + 1``)
    is ``padding_idx``: it adds nothing to the mean.

    Args:
        features: configured features in config order (the featurizer's column order).

    Example:
        >>> from ranker.config import FeatureSpec as F
        >>> enc = Encoder([F(name="u", type="categorical", buckets=9, dim=4), F(name="p", type="dense")])
        >>> enc({"cat": torch.zeros(2, 1, dtype=torch.long), "dense": torch.zeros(2, 1)}).shape
        torch.Size([2, 5])
    """

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        super().__init__()
        cats = [f for f in features if f.type == "categorical"]
        self.groups: list[int] = sorted({f.dim for f in cats})  # type: ignore[misc]
        self.tables = nn.ModuleList()
        for g, dim in enumerate(self.groups):
            cols = [j for j, f in enumerate(cats) if f.dim == dim]
            sizes = [cats[j].buckets + 1 for j in cols]  # type: ignore[operator]
            offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
            self.register_buffer(f"cols{g}", torch.tensor(cols, dtype=torch.long), persistent=False)
            self.register_buffer(f"offsets{g}", offsets, persistent=False)
            table = nn.Embedding(sum(sizes), dim)
            nn.init.normal_(table.weight, std=0.05)
            self.tables.append(table)
        self.bags = nn.ModuleDict()
        for f in features:
            if f.type == "multi_hot":
                bag = nn.EmbeddingBag(f.buckets + 2, f.dim, mode="mean", padding_idx=f.buckets + 1)  # type: ignore[operator]
                nn.init.normal_(bag.weight, std=0.05)
                with torch.no_grad():
                    bag.weight[f.buckets + 1].zero_()  # type: ignore[operator]
                self.bags[f.name] = bag
        self.n_dense = sum(1 for f in features if f.type == "dense")
        self.out_dim = sum(f.dim for f in cats) + sum(f.dim for f in features if f.type == "multi_hot") + self.n_dense  # type: ignore[misc]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        cat = batch["cat"]  # (B, n_cat)
        for g, table in enumerate(self.tables):
            ids = cat[:, getattr(self, f"cols{g}")] + getattr(self, f"offsets{g}")  # (B, n_g)
            parts.append(table(ids).flatten(1))  # (B, n_g * dim)
        for name, bag in self.bags.items():
            parts.append(bag(batch[f"bag:{name}"]))  # (B, dim)
        if self.n_dense:
            parts.append(batch["dense"])  # (B, n_dense)
        return torch.cat(parts, dim=1)  # (B, out_dim)
