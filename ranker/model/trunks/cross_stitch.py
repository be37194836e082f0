"""Cross-stitch networks (Misra et al., CVPR 2016): soft parameter sharing between task columns.

Every task owns a column, an MLP of widths ``expert_dims`` reading the shared encoder output.
After each layer a cross-stitch unit replaces column i's activation by a learned linear mix of
all columns' activations at that layer, h_i <- sum_j alpha_ij h_j, with one (T, T) matrix per
layer. alpha starts near the identity (``stitch_self`` on the diagonal, the rest spread evenly
over the other columns, rows summing to 1), so training begins close to separate networks and
learns how much to share; the task heads play the role of the paper's task-specific last layer.

What "only the requested tasks run" means here: the columns are coupled, because every stitch
reads every column. A column's layer k feeds all tasks' layer k + 1, so every column runs every
layer whatever is asked; only the rows of the last stitch (one (B, D) mix per task) and the
heads are limited to the requested tasks. A subset forward therefore costs about as much as the
full forward in this trunk, and its outputs equal the full forward's for those tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import ModelConfig
from ranker.model.layers import ExpertBank


def stitch_init(tasks: int, self_weight: float) -> torch.Tensor:
    """(T, T) initial mixing: ``self_weight`` on the diagonal, the rest shared evenly; rows sum to 1.

    Example:
        >>> stitch_init(3, 0.8)
        tensor([[0.8000, 0.1000, 0.1000],
                [0.1000, 0.8000, 0.1000],
                [0.1000, 0.1000, 0.8000]])
    """
    if tasks == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (tasks - 1)
    return torch.full((tasks, tasks), off) + torch.eye(tasks) * (self_weight - off)


class CrossStitch(nn.Module):
    """One MLP column per task (run as one batched op per layer), a cross-stitch unit after each layer.

    Args:
        cfg: ``expert_dims`` (column widths), ``stitch_self`` (initial diagonal of alpha),
            ``dropout``.
        in_dim: encoder output width.
        tasks: tasks with a tower, one column each, in config order.

    Example:
        >>> t = CrossStitch(ModelConfig(architecture="cross_stitch", expert_dims=[16, 8]), 10, ["ctr", "cvr"])
        >>> t(torch.randn(5, 10), ["cvr"])["cvr"].shape
        torch.Size([5, 8])
        >>> t.alpha[0].shape  # one (T, T) mixing matrix per layer
        torch.Size([2, 2])
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        n = len(tasks)
        widths = [in_dim, *cfg.expert_dims]
        # layer k of every column as one bank of n one-layer "experts": (B, in) or (n, B, in) -> (n, B, d)
        self.layers = nn.ModuleList(ExpertBank(n, a, [b], cfg.dropout) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.alpha = nn.ParameterList(nn.Parameter(stitch_init(n, cfg.stitch_self)) for _ in cfg.expert_dims)
        self.out_dim = cfg.expert_dims[-1]
        self.last_gates: dict[str, torch.Tensor] = {}  # no per-row gates; the mixing is ``alpha``

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters only one task's loss reaches: none, every stitch reads every column."""
        return []

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        h = x  # (B, in): the first layer of every column reads the shared encoding
        last = len(self.layers) - 1
        for k, (layer, alpha) in enumerate(zip(self.layers, self.alpha, strict=True)):
            h = layer(h)  # (T, B, d): every column, since the stitch below reads all of them
            if k < last:
                h = torch.einsum("ij,jbd->ibd", alpha, h)  # (T, B, d)
        rows = [self.tasks.index(t) for t in tasks]
        mixed = torch.einsum("ij,jbd->ibd", self.alpha[last][rows], h)  # (len(tasks), B, d): requested rows only
        return {t: mixed[i] for i, t in enumerate(tasks)}

    def mixing(self) -> list[list[list[float]]]:
        """The learned alpha per layer, as nested lists (for reports)."""
        return [a.detach().tolist() for a in self.alpha]
