"""Embeddings of dense features: one number per feature in, a ``dim``-wide vector out.

Both follow Gorishniy et al. (NeurIPS 2022, "On Embeddings for Numerical Features in Tabular
Deep Learning"). The featurizer supplies each feature's fractional position q among its quantile
bins (``ranker.encodings``); NaN marks a missing value, which gets a learned vector of its own.

- ``PiecewiseLinearEmbedding`` (PLE, then linear + ReLU): q -> T components
  e_t = clamp(q - t, 0, 1), one linear map per feature. A feature with fewer bins than T simply
  has its last components always 0.
- ``PeriodicEmbedding`` (PLR): u = q / T in [0, 1] -> [cos(2 pi c u), sin(2 pi c u)] with k
  trainable frequencies c ~ N(0, sigma^2) per feature, then linear + ReLU.

Features are batched: every per-feature map is one (n, B, in) x (n, in, d) bmm, no loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _Embedding(nn.Module):
    """Per-feature linear + ReLU over an expansion of each number; NaN -> learned vector."""

    def __init__(self, n: int, width: int, dim: int) -> None:
        super().__init__()
        self.n, self.dim = n, dim
        bound = 1.0 / math.sqrt(width)
        self.weight = nn.Parameter(torch.empty(n, width, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, dim).uniform_(-bound, bound))
        self.missing = nn.Parameter(torch.randn(n, dim) * 0.05)

    def expand(self, x: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, n, width)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n) numbers, NaN where missing -> (B, n * dim)."""
        nan = torch.isnan(x)  # (B, n)
        e = self.expand(torch.nan_to_num(x, nan=0.0))  # (B, n, width)
        h = torch.baddbmm(self.bias.unsqueeze(1), e.transpose(0, 1), self.weight)  # (n, B, dim)
        h = torch.relu_(h).transpose(0, 1)  # (B, n, dim)
        h = torch.where(nan.unsqueeze(-1), self.missing, h)
        return h.flatten(1)  # (B, n * dim)


class PiecewiseLinearEmbedding(_Embedding):
    """Piecewise-linear encoding of bin positions, then a linear map and ReLU per feature.

    Args:
        n: features.
        bins: the most bins any of them has (T).
        dim: output width per feature.

    Example:
        >>> emb = PiecewiseLinearEmbedding(3, bins=4, dim=5)
        >>> emb(torch.tensor([[0.0, 2.5, float("nan")]])).shape
        torch.Size([1, 15])
        >>> emb.expand(torch.tensor([[2.5]]))
        tensor([[[1.0000, 1.0000, 0.5000, 0.0000]]])
    """

    def __init__(self, n: int, bins: int, dim: int) -> None:
        super().__init__(n, bins, dim)
        self.register_buffer("steps", torch.arange(bins, dtype=torch.float32), persistent=False)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-1) - self.steps).clamp_(0.0, 1.0)  # (B, n, T)


class PeriodicEmbedding(_Embedding):
    """Periodic features of trainable frequencies, then a linear map and ReLU per feature (PLR).

    Args:
        n: features.
        frequencies: k frequencies per feature.
        sigma: their initial scale, c ~ N(0, sigma^2).
        dim: output width per feature.

    Example:
        >>> emb = PeriodicEmbedding(2, frequencies=8, sigma=1.0, dim=4)
        >>> emb(torch.rand(6, 2)).shape
        torch.Size([6, 8])
    """

    def __init__(self, n: int, frequencies: int, sigma: float, dim: int) -> None:
        super().__init__(n, 2 * frequencies, dim)
        self.frequencies = nn.Parameter(torch.randn(n, frequencies) * sigma)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        v = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # (B, n, k)
        return torch.cat([torch.cos(v), torch.sin(v)], dim=-1)  # (B, n, 2k)
