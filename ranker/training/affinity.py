"""Inter-task affinity by lookahead (Fifty et al., NeurIPS 2021, "TAG"), measured during training.

On a sampled step, for each task i the shared parameters (encoder and trunk) take one plain
gradient step on task i's loss alone, theta' = theta - lr * grad_theta L_i, and every task j's
loss is re-evaluated on the same batch:

    Z_ij = 1 - L_j(theta') / L_j(theta)

Z_ij > 0: a step for i lowers j's loss too (i helps j); < 0: it raises it (i hurts j). The
diagonal is each task's own gain. Z is averaged over every sampled step of the run; the
standard error over those steps is kept so a report can tell an affinity from noise.

The probe is a trainer step hook: it runs its forwards in eval mode (no dropout noise, and the
model's training-only state such as ``last_encoding`` is left alone), evaluates the stepped
model functionally (``torch.func.functional_call``) so no parameter is ever written, and takes
its gradients with ``torch.autograd.grad`` so no ``.grad`` is touched: the run trains exactly as
it would without it. Cost per sampled step: one forward with graph, T backward passes and T
forwards without graph.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch.func import functional_call

from ranker.model import MultiTaskRanker

LossFn = Callable[[MultiTaskRanker, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class AffinityProbe:
    """Trainer step hook measuring Z_ij every ``every`` steps (the first one included).

    Args:
        losses: ``(model, raw outputs, batch) -> {task: loss}`` over the labelled rows, the
            trainer's own loss function (tasks absent from a batch are skipped that step).
        lr: lookahead step size (TAG uses the training learning rate).
        every: probe one step in this many.

    Example:
        >>> from ranker.config import FeatureSpec as F, TaskSpec as T, ModelConfig as M
        >>> tasks = [T(name="a", type="regression", label="a"), T(name="b", type="regression", label="b")]
        >>> m = MultiTaskRanker([F(name="p", type="dense")], tasks, M(architecture="shared_bottom", expert_dims=[4]))
        >>> mse = lambda m, raw, b: {t: ((raw[t] - b[f"label:{t}"]) ** 2).mean() for t in ("a", "b")}
        >>> probe = AffinityProbe(mse, lr=0.1, every=1)
        >>> x = torch.randn(64, 1)
        >>> probe(m, {"cat": torch.zeros(64, 0, dtype=torch.long), "dense": x, "label:a": 2 * x[:, 0], "label:b": 2 * x[:, 0]}, {}, 0)
        >>> s = probe.summary()
        >>> s["steps"], s["matrix"]["a"]["a"] > 0   # a small step on a's own gradient lowers a's loss
        (1, True)
    """

    def __init__(self, losses: LossFn, lr: float, every: int = 10) -> None:
        if every < 1:
            raise ValueError("every: must be at least 1")
        self.loss_fn, self.lr, self.every = losses, lr, every
        self.sum: dict[tuple[str, str], float] = {}
        self.sq: dict[tuple[str, str], float] = {}
        self.n: dict[tuple[str, str], int] = {}
        self.tasks: list[str] = []
        self.steps = 0

    def __call__(self, model: MultiTaskRanker, batch: dict, losses: dict, step: int) -> None:
        if step % self.every:
            return
        was_training = model.training
        model.eval()
        try:
            self._measure(model, batch)
        finally:
            model.train(was_training)

    def _measure(self, model: MultiTaskRanker, batch: dict[str, torch.Tensor]) -> None:
        shared = dict(model.encoder.named_parameters(prefix="encoder"))
        shared.update(model.trunk.named_parameters(prefix="trunk"))
        names, params = list(shared), list(shared.values())
        with torch.enable_grad():
            base = self.loss_fn(model, model(batch), batch)  # {task: scalar}, eval mode
            grads = {t: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for t, loss in base.items()}
        before = {t: float(v.detach()) for t, v in base.items()}
        self.tasks = list(dict.fromkeys([*self.tasks, *before]))
        with torch.no_grad():
            for i, g in grads.items():
                stepped = {n: p if gi is None else p - self.lr * gi for n, p, gi in zip(names, params, g, strict=True)}
                after = self.loss_fn(model, functional_call(model, stepped, (batch,)), batch)
                for j, lj in after.items():
                    if before[j] <= 0:
                        continue  # a perfectly fitted batch: no relative change to speak of
                    z = 1.0 - float(lj) / before[j]
                    key = (i, j)
                    self.sum[key] = self.sum.get(key, 0.0) + z
                    self.sq[key] = self.sq.get(key, 0.0) + z * z
                    self.n[key] = self.n.get(key, 0) + 1
        self.steps += 1

    def summary(self) -> dict:
        """{"steps", "lr", "every", "tasks", "matrix": {i: {j: mean Z_ij}}, "se": {i: {j: SE}}, "count"}."""
        mean: dict[str, dict[str, float]] = {}
        se: dict[str, dict[str, float]] = {}
        count: dict[str, dict[str, int]] = {}
        for i in self.tasks:
            mean[i], se[i], count[i] = {}, {}, {}
            for j in self.tasks:
                n = self.n.get((i, j), 0)
                if not n:
                    mean[i][j], se[i][j] = float("nan"), float("nan")
                    count[i][j] = 0
                    continue
                m = self.sum[(i, j)] / n
                var = max(self.sq[(i, j)] / n - m * m, 0.0) * n / (n - 1) if n > 1 else float("nan")
                mean[i][j], se[i][j], count[i][j] = m, math.sqrt(var / n), n
        return {"steps": self.steps, "lr": self.lr, "every": self.every, "tasks": list(self.tasks),
                "matrix": mean, "se": se, "count": count}


def pool(summaries: list[dict]) -> dict:
    """Pool several runs' summaries (e.g. one per seed): the mean over all their sampled
    steps, and as its standard error the larger of the steps' (as if one run) and the runs'
    (std of the per-run means / sqrt(runs)): steps within a run are not independent draws of
    what a retrain would give, and seeds can disagree far more than steps do."""
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"]))
    mean: dict[str, dict[str, float]] = {}
    se: dict[str, dict[str, float]] = {}
    count: dict[str, dict[str, int]] = {}
    for i in tasks:
        mean[i], se[i], count[i] = {}, {}, {}
        for j in tasks:
            parts = [(s["matrix"][i][j], s["se"][i][j], s["count"][i][j]) for s in summaries
                     if i in s["count"] and j in s["count"][i] and s["count"][i][j]]
            n = sum(c for _, _, c in parts)
            if not n:
                mean[i][j], se[i][j], count[i][j] = float("nan"), float("nan"), 0
                continue
            total = sum(m * c for m, _, c in parts)
            # each part's sum of squares from its mean and SE (SE^2 n = sample variance)
            sq = sum((e * e * c * (c - 1) if c > 1 and math.isfinite(e) else 0.0) + c * m * m for m, e, c in parts)
            m = total / n
            var = max(sq - n * m * m, 0.0) / (n - 1) if n > 1 else float("nan")
            step_se = math.sqrt(var / n)
            if len(parts) > 1:  # the runs' own spread, the unit a retrain replicates
                run_se = statistics.stdev(p[0] for p in parts) / math.sqrt(len(parts))
                step_se = max(step_se, run_se) if math.isfinite(step_se) else run_se
            mean[i][j], se[i][j], count[i][j] = m, step_se, n
    return {"steps": sum(s["steps"] for s in summaries), "runs": len(summaries), "tasks": tasks,
            "matrix": mean, "se": se, "count": count}
