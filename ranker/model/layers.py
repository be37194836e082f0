"""Small building blocks shared by trunks and heads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_dim: int, dims: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each width in ``dims``; empty ``dims`` is the identity."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = d
    return nn.Sequential(*layers)


class ExpertBank(nn.Module):
    """``n`` independent MLP experts run as batched matmuls instead of a loop of small MLPs.

    Args:
        n: number of experts.
        in_dim: input width.
        dims: hidden widths of every expert (ReLU after each layer).
        dropout: dropout after each layer.

    Example:
        >>> bank = ExpertBank(4, 10, [16, 8])
        >>> bank(torch.randn(32, 10)).shape   # (n, B, dims[-1])
        torch.Size([4, 32, 8])
    """

    def __init__(self, n: int, in_dim: int, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.n, self.in_dim, self.out_dim = n, in_dim, dims[-1]
        widths = [in_dim, *dims]
        # first layer stored (in, n, d): with a shared input it is one (B, in) @ (in, n*d) GEMM
        self.w0 = nn.Parameter(torch.empty(in_dim, n, dims[0]))
        self.b0 = nn.Parameter(torch.zeros(n, dims[0]))
        self.ws = nn.ParameterList(nn.Parameter(torch.empty(n, a, b)) for a, b in zip(widths[1:-1], widths[2:], strict=True))
        self.bs = nn.ParameterList(nn.Parameter(torch.zeros(n, b)) for b in widths[2:])
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # same scheme as nn.Linear (Kaiming-uniform, a=sqrt(5)) per expert
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.w0, -bound, bound)
        nn.init.uniform_(self.b0, -bound, bound)
        for w, b in zip(self.ws, self.bs, strict=True):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in) shared by all experts, or (k, B, in), one input per selected expert.
        idx: which experts to run (k,), default all. Returns (k, B, out)."""
        w0 = self.w0 if idx is None else self.w0[:, idx]  # (in, k, d)
        b0 = self.b0 if idx is None else self.b0[idx]  # (k, d)
        k, d = w0.shape[1], w0.shape[2]
        if x.dim() == 2:
            # bias fused into the GEMM; ReLU in place (neither addmm nor baddbmm needs its output
            # for backward), which saves two passes over the largest activation
            h = torch.addmm(b0.reshape(k * d), x, w0.reshape(self.in_dim, k * d))  # (B, k*d)
            h = torch.relu_(h).view(-1, k, d).transpose(0, 1)  # (k, B, d)
        else:
            h = torch.relu_(torch.baddbmm(b0.unsqueeze(1), x, w0.transpose(0, 1)))  # (k, B, d)
        h = self.dropout(h)
        for w, b in zip(self.ws, self.bs, strict=True):
            w = w if idx is None else w[idx]
            b = b if idx is None else b[idx]
            h = self.dropout(torch.relu_(torch.baddbmm(b.unsqueeze(1), h, w)))  # (k, B, d_next)
        return h


def mix(gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs. gates (B, E), experts (E, B, D) -> (B, D)."""
    return torch.einsum("be,ebd->bd", gates, experts)
