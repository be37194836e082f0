"""The optimiser: fused AdamW over the dense parameters, and with ``train.sparse_embeddings`` a
lazy, row-sparse Adam over the embedding tables.

A step of dense AdamW reads and writes every row of every table (weights, both moments, weight
decay), so its cost grows with the tables, not with the batch: two identifier tables of 2^20 x 32
take a 1,024-row step of the synthetic model from 17 ms to 118 ms on a 2-core CPU
(``bench/bench_sparse.py``). With ``sparse_embeddings`` the tables produce row-sparse gradients
(only the rows the batch looked up) and ``torch.optim.SparseAdam`` moves only those rows and
their moments: the step costs what the batch touches. This is the "lazy Adam" of large
recommendation tables: a row's moments age only when the row is used, and so does its weight
decay (AdamW's decoupled decay, applied to the rows a step touched). Everything else keeps
fused AdamW.

Gradient methods that combine task gradients on the shared parameters keep the tables' task
gradients as rows (``weighting.base.table_gradients``), so their update stays row-sparse too.
A gradient that still reaches a table densely is turned row-sparse before the step by
``row_sparse``, so every weighting method works with either setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def row_sparse(params: Sequence[nn.Parameter]) -> None:
    """Make each of ``params``' dense gradients sparse over its rows, in place: the rows with any
    nonzero entry, what a lookup would have produced. Sparse ones are left as they are (the
    cross-rank sum and SparseAdam coalesce them)."""
    for p in params:
        if p.grad is not None and not p.grad.is_sparse:
            p.grad = p.grad.to_sparse(sparse_dim=1)


class SplitOptimizer:
    """Fused AdamW over the dense parameters and SparseAdam over the tables, as one optimiser.

    ``param_groups`` lists both optimisers' groups (the trainer sets ``lr`` on each, and a
    GradScaler unscales through them); ``state_dict`` holds both states by name.
    """

    def __init__(self, dense: Sequence[nn.Parameter], tables: Sequence[nn.Parameter], lr: float, weight_decay: float) -> None:
        self.parts: dict[str, torch.optim.Optimizer] = {"sparse": torch.optim.SparseAdam(list(tables), lr=lr)}
        if dense:
            self.parts["dense"] = torch.optim.AdamW(list(dense), lr=lr, weight_decay=weight_decay, fused=True)
        self.weight_decay = weight_decay

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts.values() for g in o.param_groups]

    def step(self) -> None:
        if self.weight_decay:
            self._decay_rows()
        for o in self.parts.values():
            o.step()

    @torch.no_grad()
    def _decay_rows(self) -> None:
        """AdamW's decoupled weight decay, w <- w (1 - lr wd), on the rows this step touched
        (SparseAdam has none): a row decays when it is used, as its moments age. FBGEMM's
        table-batched embeddings decay the same way (its DECOUPLED weight-decay mode)."""
        for group in self.parts["sparse"].param_groups:
            keep = 1.0 - group["lr"] * self.weight_decay
            for w in group["params"]:
                if w.grad is not None and w.grad._nnz():
                    w.grad = w.grad.coalesce()  # SparseAdam's own coalesce is then free
                    w[w.grad.indices()[0]] *= keep

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, o in self.parts.items():
            o.load_state_dict(state[k])


def build_optimizer(params: Sequence[nn.Parameter], tables: Sequence[nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer | SplitOptimizer:
    """Fused AdamW over ``params``; with ``tables`` (the row-sparse embedding weights, all among
    ``params``) a ``SplitOptimizer`` that gives those to SparseAdam instead."""
    if not tables:
        # fused: one kernel over all parameters, ~8x faster than the per-tensor loop on CPU
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, fused=True)
    dense = [p for p in params if all(p is not t for t in tables)]
    return SplitOptimizer(dense, tables, lr, weight_decay)
