"""FiLM task modulation (Perez et al., AAAI 2018) on any trunk's output.

Each task t owns a learned embedding e_t; a small generator maps it (and, with ``film_input``,
the row's encoder output x) to a per-feature scale and shift of the trunk's representation:

    rep_t = gamma_t * h_t + beta_t,   [gamma_t - 1, beta_t] = Z relu(A e_t (+ C x))

Z starts at zero, so a FiLM model starts as its plain trunk and learns to modulate. Without
the input, gamma_t and beta_t are one vector per task (computed on one row, broadcast over
the batch); with it they vary per row, and C x is computed once for all tasks. Only the
requested tasks' modulation runs, after the wrapped trunk ran only their parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import ModelConfig


class FiLM(nn.Module):
    """Wraps a trunk: same ``forward(x, tasks)`` contract, outputs modulated per task.

    Args:
        trunk: any trunk (has ``out_dim`` and ``last_gates``).
        cfg: ``film_dim`` (task embedding and generator width), ``film_input``.
        in_dim: encoder output width (read by the generator when ``film_input``).
        tasks: the trunk's tasks, in config order.

    Example:
        >>> from ranker.model.trunks.shared_bottom import SharedBottom
        >>> cfg = ModelConfig(architecture="shared_bottom", expert_dims=[8], film=True, film_input=True)
        >>> f = FiLM(SharedBottom(cfg, 6, ["a", "b"]), cfg, 6, ["a", "b"])
        >>> f(torch.randn(4, 6), ["b"])["b"].shape
        torch.Size([4, 8])
    """

    def __init__(self, trunk: nn.Module, cfg: ModelConfig, in_dim: int, tasks: list[str]) -> None:
        super().__init__()
        self.inner = trunk
        self.tasks = list(tasks)
        self.out_dim: int = trunk.out_dim  # type: ignore[assignment]
        k = cfg.film_dim
        self.task_embedding = nn.Embedding(len(tasks), k)
        nn.init.normal_(self.task_embedding.weight, std=1.0)
        self.from_task = nn.Linear(k, k)  # A
        self.from_input = nn.Linear(in_dim, k, bias=False) if cfg.film_input else None  # C
        self.to_film = nn.Linear(k, 2 * self.out_dim)  # Z: zero at start = identity modulation
        nn.init.zeros_(self.to_film.weight)
        nn.init.zeros_(self.to_film.bias)

    def task_parameters(self) -> list[nn.Parameter]:
        """The wrapped trunk's (the task embedding's rows are one tensor for all tasks)."""
        return self.inner.task_parameters()  # type: ignore[no-any-return,operator]

    @property
    def last_gates(self) -> dict[str, torch.Tensor]:
        return self.inner.last_gates  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        reps = self.inner(x, tasks)  # {task: (B, D)}
        ids = torch.tensor([self.tasks.index(t) for t in tasks], device=x.device)
        a = self.from_task(self.task_embedding(ids))  # (T', k)
        if self.from_input is not None:
            hidden = torch.relu(a.unsqueeze(1) + self.from_input(x))  # (T', B, k)
        else:
            hidden = torch.relu(a).unsqueeze(1)  # (T', 1, k): one modulation per task
        gamma, beta = self.to_film(hidden).chunk(2, dim=-1)  # (T', B or 1, D) each
        return {t: (1.0 + gamma[i]) * reps[t] + beta[i] for i, t in enumerate(tasks)}
