"""DCN-v2 cross layers (Wang et al., "DCN V2: Improved Deep & Cross Network", WWW 2021).

Each layer makes explicit feature interactions one degree higher while keeping the input:

    x_{l+1} = x_0 * (W_l x_l + b_l) + x_l          (* elementwise; W_l is (d, d))

The low-rank form replaces W_l by U_l V_l^T with U_l, V_l (d, r), which is how the paper serves
it in production at r << d: the cost per layer falls from d^2 to 2 d r multiply-adds. The layers
run on the encoder output and keep its width, so any trunk takes their output unchanged (the
paper's "stacked" structure: cross network, then the deep part).
"""

from __future__ import annotations

import torch
from torch import nn


class CrossNet(nn.Module):
    """A stack of DCN-v2 cross layers, full or low rank.

    Args:
        dim: input (and output) width d.
        layers: number of cross layers (0 is the identity).
        rank: None for full-rank W_l, else the rank r of W_l = U_l V_l^T.

    Example:
        >>> net = CrossNet(12, layers=2, rank=4)
        >>> net(torch.randn(5, 12)).shape
        torch.Size([5, 12])
    """

    def __init__(self, dim: int, layers: int, rank: int | None = None) -> None:
        super().__init__()
        self.dim, self.layers, self.rank = dim, layers, rank
        if rank is None:
            self.w = nn.ParameterList(nn.Parameter(torch.empty(dim, dim)) for _ in range(layers))
        else:
            self.u = nn.ParameterList(nn.Parameter(torch.empty(dim, rank)) for _ in range(layers))
            self.v = nn.ParameterList(nn.Parameter(torch.empty(dim, rank)) for _ in range(layers))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # small weights: every layer starts close to x_{l+1} = x_0 * b_l + x_l, i.e. near the
        # identity, so adding cross layers does not disturb what the trunk sees at the start
        for params in (getattr(self, "w", []), getattr(self, "u", []), getattr(self, "v", [])):
            for p in params:
                nn.init.xavier_uniform_(p, gain=0.5 if self.rank is None else 0.7)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0  # (B, d)
        for i in range(self.layers):
            if self.rank is None:
                h = torch.addmm(self.b[i], x, self.w[i].t())  # (B, d) = W x + b
            else:
                h = torch.addmm(self.b[i], x @ self.v[i], self.u[i].t())  # (B, r) -> (B, d)
            x = torch.addcmul(x, x0, h)  # x0 * h + x
        return x
