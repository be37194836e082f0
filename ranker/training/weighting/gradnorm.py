"""GradNorm (Chen et al., ICML 2018): balance training rates through gradient norms.

Task weights w_t = T softmax(logits)_t (so they stay positive and sum to T). Each step, with
G_t = w_t |grad L_t| on the shared parameters (or the shared representation, the analogue of
the paper's last shared layer) and r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)) the relative
inverse training rate, the logits descend
    L_grad = sum_t | G_t - mean_j(G_j) * r_t ** alpha |     (the target is a constant)
through the trainer's optimizer, while the model trains on sum_t w_t L_t. A task that learns
slowly (large r_t) is pushed toward a larger gradient, i.e. a larger weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import GradNormParams, TaskSpec
from ranker.training.weighting.base import (
    StepContext,
    Weighting,
    global_gram,
    gradient_inputs,
    table_gradients,
)


class GradNorm(Weighting):
    def __init__(self, tasks: Sequence[TaskSpec], params: GradNormParams | None = None) -> None:
        super().__init__(tasks)
        params = params or GradNormParams()
        self.alpha, self.gradients = params.alpha, params.gradients
        self.logits = nn.Parameter(torch.zeros(len(self.tasks)))
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.register_buffer("initial", torch.full((len(self.tasks),), float("nan")))  # L_t(0)

    def weights(self) -> torch.Tensor:
        return len(self.tasks) * torch.softmax(self.logits, 0)  # (T_all,)

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        idx = torch.tensor([self.index[t] for t in losses], device=self.initial.device)
        values = torch.tensor(list(ctx.loss_values(losses).values()), device=self.initial.device)  # (T,) global loss values
        first = torch.isnan(self.initial[idx])
        self.initial[idx[first]] = values[first]  # a task's first loss, whenever it first appears
        w = self.weights()[idx]  # (T,)

        on_rep = self.gradients == "representation"
        local, rows = table_gradients(losses, gradient_inputs(self, self.gradients, ctx), [] if on_rep else ctx.tables, ctx.loss_scale)
        gram = global_gram(local, on_rep, ctx.ranks, rows)
        norms = gram.diagonal().clamp_min(0).sqrt()  # (T,) global |grad L_t|
        # a task with no gradient (a dead tower) cannot be balanced: leave it out of L_grad
        live = norms > 1e-8 * norms.max().clamp_min(1e-12)
        g = (w * norms)[live]  # G_t, differentiable in the logits only
        ratio = (values / self.initial[idx].clamp_min(1e-12))[live]
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        (grad,) = torch.autograd.grad((g - target).abs().sum(), self.logits, allow_unused=True)
        # a global quantity, the same on every rank: each rank adds its 1/world share
        # (scaled like every other .grad under fp16, which the optimiser step unscales)
        grad = torch.zeros_like(self.logits) if grad is None else grad * (ctx.loss_scale / ctx.ranks.world)
        self.logits.grad = grad if self.logits.grad is None else self.logits.grad + grad

        w = w.detach()
        ctx.backprop(sum(wi * loss for wi, loss in zip(w, losses.values(), strict=True)))  # type: ignore[arg-type]
        return {t: float(wi) for t, wi in zip(losses, w, strict=True)}
