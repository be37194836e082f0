"""FAMO (Liu et al., NeurIPS 2023): fast adaptive multitask optimisation.

The model descends sum_t z_t log L_t / c with z = softmax(xi) and c = sum_t z_t / L_t, i.e.
loss weights z_t / (c L_t). The task logits xi are then updated so that the next step
decreases every log-loss at the same rate: with delta_t = log L_t(before) - log L_t(after),
xi receives the gradient J_softmax(xi)^T delta and takes an Adam step with weight decay
``gamma``. The paper measures "after" with a second forward pass on the same batch
(``after_loss: same_batch``, through ``Weighting.after_step``); by default it is the next
batch's loss (``next_batch``: no extra forward, one step of lag, a noisier estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ranker.config import FAMOParams, TaskSpec
from ranker.training.weighting.base import LossWeighting, StepContext

_EPS = 1e-8


class FAMO(LossWeighting):
    def __init__(self, tasks: Sequence[TaskSpec], params: FAMOParams | None = None) -> None:
        super().__init__(tasks)
        params = params or FAMOParams()
        self.index = {t: i for i, t in enumerate(self.tasks)}
        # the task logits: a plain tensor with its own optimiser, not a Parameter, so the
        # trainer's optimiser never touches it
        self.xi = torch.zeros(len(self.tasks), requires_grad=True)
        self.opt = torch.optim.Adam([self.xi], lr=params.lr, weight_decay=params.gamma)
        self.prev: dict[str, float] = {}
        self.same_batch = params.after_loss == "same_batch"

    def update(self, losses: dict[str, float]) -> None:
        """One step of the task logits from the loss change since ``prev``; ``losses`` become
        the next ``prev``."""
        common = [t for t in losses if t in self.prev]
        if len(common) >= 2:
            idx = torch.tensor([self.index[t] for t in common])
            delta = torch.tensor([math.log(self.prev[t] + _EPS) - math.log(losses[t] + _EPS) for t in common])
            with torch.enable_grad():
                (d,) = torch.autograd.grad(torch.softmax(self.xi[idx], 0), self.xi, grad_outputs=delta)
            self.opt.zero_grad()
            self.xi.grad = d
            self.opt.step()
        self.prev = dict(losses)

    def combine(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        values = ctx.loss_values(losses)  # global loss values
        if self.same_batch:
            self.prev = dict(values)  # "before"; after_step brings "after" on this batch
        else:
            self.update(values)  # this batch's losses are "after" of the previous step
        idx = torch.tensor([self.index[t] for t in losses])
        z = torch.softmax(self.xi.detach()[idx], 0)  # (T,)
        loss = torch.stack(list(losses.values()))  # (T,)
        inv = 1.0 / (torch.tensor(list(values.values()), dtype=torch.float32) + _EPS)  # (T,) 1 / (L_t + eps)
        w = z * inv / (z * inv).sum()  # z_t / (c L_t): the weight the log objective puts on L_t
        # the gradient of the log objective sum_t z_t / c * log(L_t + eps) is sum_t w_t grad L_t;
        # written as w . L it is linear in the losses, so ranks' shares of L add up exactly
        total = (w.to(loss.device) * loss).sum()
        return total, {t: float(wi) for t, wi in zip(losses, w, strict=True)}

    def after_step(self, losses_after: Callable[[], dict[str, float]]) -> None:
        if self.same_batch:
            self.update(losses_after())

    def get_extra_state(self) -> dict:
        """Task logits, their optimiser and the previous losses, for an exact resume."""
        return {"xi": self.xi.detach().clone(), "opt": self.opt.state_dict(), "prev": dict(self.prev)}

    def set_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.xi.copy_(state["xi"])
        self.opt.load_state_dict(state["opt"])
        self.prev = dict(state["prev"])
