"""Per-epoch training diagnostics from a few sampled steps: do the tasks fight, who dominates,
and how the gates use the experts.

- ``grad_cosine`` {"a/b": cos}: cosine of tasks a and b's loss gradients on the shared
  parameters (negative = conflict), each task's gradient summed over the sampled steps first:
  a single minibatch gradient is mostly sampling noise, and its cosines sit near 0 whatever
  the tasks are;
- ``grad_cosine_batch``: the mean per-step cosine instead (what PCGrad, MGDA and CAGrad see);
- ``grad_norm`` {task: mean per-step |g|} and ``dominance`` = max/min of those (1 = balanced);
- ``gates`` {task: {"entropy": nats, "share": [per expert]}} for gated trunks (MMoE, PLE):
  mean per-row gate entropy (log E = uniform, 0 = one expert) and the mean gate per expert.

Sampling keeps the cost at T extra backward passes on ``batches`` steps per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch
from torch import nn

from ranker.training.distributed import Collective
from ranker.training.weighting.base import rows_gram, table_gradients, task_rows


class EpochProbe:
    """Collects gradient and gate statistics on ``batches`` steps spread evenly over an epoch.

    Args:
        shared: the parameters every task flows through.
        steps: steps expected in the epoch (the sampled ones are spread over them).
        batches: steps to sample; 0 disables the probe.
        ranks: task gradients are summed over them.
        tables: the shared parameters with row-sparse gradients (``train.sparse_embeddings``):
            their task gradients are kept, summed and checkpointed as the rows touched, so a
            large table costs the probe what the sampled batches looked up.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> probe = EpochProbe([w], steps=1, batches=1)
        >>> probe.due(0)
        True
        >>> probe.record({"a": w[0] * 2, "b": -w[1] - w[0]}, {})
        >>> round(probe.summary()["grad_cosine"]["a/b"], 4)  # g_a = (2, 0), g_b = (-1, -1)
        -0.7071
    """

    def __init__(self, shared: Sequence[nn.Parameter], steps: int, batches: int, ranks: Collective | None = None,
                 tables: Sequence[nn.Parameter] = ()) -> None:
        self.tables = list(tables)
        self.shared = [p for p in shared if all(p is not q for q in self.tables)]
        self.ranks = ranks or Collective.single(torch.device("cpu"))  # task gradients are summed over ranks
        k = min(batches, steps)
        self.sampled = {int((i + 0.5) * steps / k) for i in range(k)} if k else set()
        self.cos: dict[str, list[float]] = {}
        self.norm: dict[str, list[float]] = {}
        self.sums: dict[str, torch.Tensor] = {}  # task -> gradient summed over sampled steps (P,)
        self.table_sums: dict[str, list[torch.Tensor]] = {}  # task -> the same on each table, row-sparse
        self.gate_share: dict[str, list[torch.Tensor]] = {}  # per step (E,)
        self.gate_entropy: dict[str, list[float]] = {}

    def due(self, step_in_epoch: int) -> bool:
        return step_in_epoch in self.sampled

    @torch.no_grad()
    def _gates(self, gates: dict[str, torch.Tensor]) -> None:
        for t, g in gates.items():
            g = g.detach().float()  # (B, E)
            ent = -(g * g.clamp_min(1e-12).log()).sum(1).mean()
            self.gate_share.setdefault(t, []).append(g.mean(0))
            self.gate_entropy.setdefault(t, []).append(float(ent))

    def record(self, losses: dict[str, torch.Tensor], gates: dict[str, torch.Tensor]) -> None:
        """Task gradients of this step's losses (graph kept for the real backward) and gates."""
        self._gates(gates)
        names = list(losses)
        local, rows = table_gradients(losses, self.shared, self.tables)
        grads = self.ranks.sum(local)  # (T, P), global
        rows = self.ranks.sum_sparse(rows)  # each table's (T * rows, dim), global
        gram = (grads @ grads.T).double()
        for r in rows:
            gram = gram + rows_gram(r, len(names)).double()
        norms = gram.diagonal().clamp_min(0).sqrt()
        for i, t in enumerate(names):
            self.norm.setdefault(t, []).append(float(norms[i]))
            self.sums[t] = self.sums[t] + grads[i] if t in self.sums else grads[i].clone()
            parts = [task_rows(r, i, w) for r, w in zip(rows, self.tables, strict=True)]
            self.table_sums[t] = [(a + b).coalesce() for a, b in zip(self.table_sums[t], parts, strict=True)] if t in self.table_sums else parts
        for i, j in combinations(range(len(names)), 2):
            cos = float(gram[i, j] / (norms[i] * norms[j]).clamp_min(1e-20))
            self.cos.setdefault(f"{names[i]}/{names[j]}", []).append(cos)

    _STATE = ("cos", "norm", "sums", "table_sums", "gate_share", "gate_entropy")

    def state(self) -> dict:
        """What was collected so far (for a checkpoint inside an epoch)."""
        return {k: getattr(self, k) for k in self._STATE}

    def set_state(self, state: dict) -> None:
        for k in self._STATE:
            setattr(self, k, state.get(k, {}))  # table_sums: absent from checkpoints written before it

    def summary(self) -> dict:
        """Means over the sampled steps; empty sections when nothing was sampled."""
        norm = {t: sum(v) / len(v) for t, v in self.norm.items()}
        nonzero = [v for v in norm.values() if v > 0]
        cos = {}
        for a, b in combinations(list(self.sums), 2):
            ga, gb = self.sums[a].double(), self.sums[b].double()
            dot, na, nb = float(ga @ gb), float(ga @ ga), float(gb @ gb)
            for sa, sb in zip(self.table_sums.get(a, []), self.table_sums.get(b, []), strict=True):
                dot += float(torch.sparse.sum(sa * sb)) if sa._nnz() and sb._nnz() else 0.0
                na, nb = na + float(sa.values().double().square().sum()), nb + float(sb.values().double().square().sum())
            cos[f"{a}/{b}"] = dot / max(math.sqrt(na * nb), 1e-20)
        return {
            "batches": len(self.sampled),
            "grad_cosine": cos,
            "grad_cosine_batch": {k: sum(v) / len(v) for k, v in self.cos.items()},
            "grad_norm": norm,
            "dominance": max(nonzero) / min(nonzero) if len(nonzero) >= 2 else 1.0,
            "gates": {
                t: {
                    "entropy": sum(self.gate_entropy[t]) / len(self.gate_entropy[t]),
                    "max_entropy": math.log(len(s[0])),
                    "share": torch.stack(s).mean(0).tolist(),
                }
                for t, s in self.gate_share.items()
            },
        }


def format_diagnostics(d: dict) -> str:
    """One log line: gradient cosines, norms and dominance, gate entropies."""
    parts = []
    if d["grad_cosine"]:
        parts.append("grad cos " + " ".join(f"{k}={v:+.3f}" for k, v in d["grad_cosine"].items()))
    if d["grad_norm"]:
        parts.append("|g| " + " ".join(f"{k}={v:.3g}" for k, v in d["grad_norm"].items()) + f" (dominance {d['dominance']:.2f}x)")
    if d["gates"]:
        parts.append("gate entropy " + " ".join(f"{k}={v['entropy']:.2f}/{v['max_entropy']:.2f}" for k, v in d["gates"].items()))
    return " | ".join(parts)
