"""Encoder: featurized batch -> one dense vector per row (embeddings, bags, dense features),
optionally through DCN-v2 cross layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import FeatureSpec, ModelConfig
from ranker.model.crosses import CrossNet
from ranker.model.numeric import PeriodicEmbedding, PiecewiseLinearEmbedding


def numeric_embedding(encoding: str, n: int, dim: int, bins: int, cfg: ModelConfig) -> nn.Module:
    """The embedding module of ``n`` dense features sharing one embedded encoding and width."""
    if encoding == "piecewise_linear":
        return PiecewiseLinearEmbedding(n, bins, dim)
    return PeriodicEmbedding(n, cfg.periodic_frequencies, cfg.periodic_sigma, dim)


class Encoder(nn.Module):
    """Embeds categorical features, pools multi-hot bags, encodes dense features, and crosses.

    Categorical features of equal width share one concatenated table (per-feature offsets), so
    the lookup is one op per distinct width, not one per feature. Bag padding (``buckets + 1``)
    is ``padding_idx``: it adds nothing to the mean. Dense features with a standard/log1p
    encoding are appended as they are; piecewise_linear/periodic ones are embedded ``dim`` wide,
    one batched module per (encoding, dim) group (``ranker.model.numeric``). With
    ``cfg.cross_layers`` the concatenation goes through DCN-v2 cross layers, width unchanged.

    With ``cfg.feature_dropout`` p > 0, training drops whole features: each row zeroes each
    feature's part of the output (all ``dim`` values of an embedding or bag, or one plain dense
    value) with probability p and scales the kept ones by 1 / (1 - p); evaluation and serving
    see every feature, unscaled. Unlike dropout on single units, a dropped feature is gone for
    that row, so the model must also learn what the other, weaker columns say.

    Args:
        features: the encoder's features in config order (the featurizer's column order;
            bias features are not among them).
        cfg: model settings (cross layers, periodic frequencies); defaults when None.

    Example:
        >>> from ranker.config import FeatureSpec as F
        >>> enc = Encoder([F(name="u", type="categorical", buckets=9, dim=4), F(name="p", type="dense", encoding="standard")])
        >>> enc({"cat": torch.zeros(2, 1, dtype=torch.long), "dense": torch.zeros(2, 1)}).shape
        torch.Size([2, 5])
        >>> enc = Encoder([F(name="p", type="dense", dim=3)])  # piecewise_linear by default
        >>> enc({"cat": torch.zeros(2, 0, dtype=torch.long), "dense": torch.tensor([[0.5], [float("nan")]])}).shape
        torch.Size([2, 3])
    """

    def __init__(self, features: Sequence[FeatureSpec], cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
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
        dense = [f for f in features if f.type == "dense"]
        self.n_dense = len(dense)
        plain = [j for j, f in enumerate(dense) if not f.embedded]
        # all dense features plain (the old layout): the tensor goes in as it is, no gather
        self.all_plain = len(plain) == len(dense)
        self.register_buffer("plain_cols", torch.tensor(plain, dtype=torch.long), persistent=False)
        self.numeric = nn.ModuleList()
        self.numeric_keys: list[tuple[str, int]] = sorted({(f.encoding, f.dim) for f in dense if f.embedded})  # type: ignore[misc]
        for g, (encoding, dim) in enumerate(self.numeric_keys):
            cols = [j for j, f in enumerate(dense) if f.embedded and (f.encoding, f.dim) == (encoding, dim)]
            self.register_buffer(f"numeric_cols{g}", torch.tensor(cols, dtype=torch.long), persistent=False)
            bins = max(dense[j].bins for j in cols)  # type: ignore[type-var]
            self.numeric.append(numeric_embedding(encoding, len(cols), dim, bins, cfg))  # type: ignore[arg-type]
        width = sum(f.dim for f in cats) + sum(f.dim for f in features if f.type == "multi_hot")  # type: ignore[misc]
        width += len(plain) + sum(f.dim for f in dense if f.embedded)  # type: ignore[misc]
        self.out_dim = width
        self.feature_dropout = cfg.feature_dropout
        self.cross = CrossNet(width, cfg.cross_layers, cfg.cross_rank) if cfg.cross_layers else None

    def _drop(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x (B, n features * width, feature-major) with each (row, feature) kept with
        probability 1 - p and scaled by 1 / (1 - p), or zeroed (``feature_dropout``, training
        only): one mask value per feature, not per unit."""
        if not (self.training and self.feature_dropout > 0):
            return x
        keep = torch.nn.functional.dropout(x.new_ones(x.shape[0], n, 1), self.feature_dropout, training=True)
        return (x.reshape(x.shape[0], n, -1) * keep).reshape(x.shape)

    def sparse_tables(self) -> list[nn.Parameter]:
        """Switch the categorical tables and bags to row-sparse gradients (only the rows a batch
        looks up) and return their weights, for an optimiser that updates rows. Outputs and the
        saved weights are unchanged; only the gradients' layout is."""
        mods: list[nn.Embedding | nn.EmbeddingBag] = [*self.tables, *self.bags.values()]
        for m in mods:
            m.sparse = True
        return [m.weight for m in mods]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []  # (B, n features * their width) each; _drop needs n
        cat = batch["cat"]  # (B, n_cat)
        for g, table in enumerate(self.tables):
            ids = cat[:, getattr(self, f"cols{g}")] + getattr(self, f"offsets{g}")  # (B, n_g)
            parts.append(self._drop(table(ids).flatten(1), ids.shape[1]))  # (B, n_g * dim)
        for name, bag in self.bags.items():
            parts.append(self._drop(bag(batch[f"bag:{name}"]), 1))  # (B, dim)
        if self.n_dense:
            dense = batch["dense"]  # (B, n_dense)
            if self.all_plain:
                parts.append(self._drop(dense, self.n_dense))
            else:
                if len(self.plain_cols):
                    parts.append(self._drop(dense[:, self.plain_cols], len(self.plain_cols)))  # (B, n_plain)
                for g, emb in enumerate(self.numeric):
                    cols = getattr(self, f"numeric_cols{g}")
                    parts.append(self._drop(emb(dense[:, cols]), len(cols)))  # (B, n_g * dim)
        x = torch.cat(parts, dim=1)  # (B, out_dim)
        return self.cross(x) if self.cross is not None else x
