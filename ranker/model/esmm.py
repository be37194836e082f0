"""ESMM (Ma et al., SIGIR 2018): a task whose probability is the product of other tasks'.

pCTCVR = pCTR x pCVR is learned with the click-and-conversion label over every impression, so
the CVR tower is trained over the entire impression space, not only on clicked rows (which is
where it is served from, but not where it is used). A product task has no tower and no
parameters; its raw output is the logit of the product, so the trainer's binary loss
(BCE with logits), the metrics and the serving score (sigmoid) need no special case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LOG_HALF = -math.log(2.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def product_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    """logit(prod_i sigmoid(a_i)) computed in log space; each (B,) -> (B,).

    Example:
        >>> a, b = torch.tensor([0.3]), torch.tensor([-1.2])
        >>> bool(torch.allclose(torch.sigmoid(product_logit([a, b])), torch.sigmoid(a) * torch.sigmoid(b)))
        True
    """
    n = len(logits)
    a = torch.stack(logits)  # (n, B)
    if n <= _EXACT_FACTORS:
        # prod sigmoid(a_i) = e^(sum a) / prod(1 + e^(a_i)), and expanding the product over the
        # subsets S of the factors gives 1 - p = sum over S != all of e^(sum_S a) / prod(1 + e^(a_i)),
        # so logit(p) = sum a - logsumexp over the proper subsets of sum_S a: exact, and smooth
        # where p is near 1 (a clamp there gave saturated rows no gradient at all)
        subsets = _proper_subsets(n, a.dtype, a.device)  # (2^n - 1, n)
        return a.sum(0) - torch.logsumexp(subsets @ a, dim=0)
    log_p = F.logsigmoid(a).sum(0)  # (B,) log of the product
    log_p = log_p.clamp(max=-1e-6)  # p = 1 exactly would be an infinite logit
    return log_p - _log1mexp(log_p)


_EXACT_FACTORS = 8  # 2^n - 1 subset sums per row; beyond, the log-space form with a clamp


def _proper_subsets(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0/1 rows of every subset of n factors but the full one (the empty one included)."""
    bits = torch.arange(2**n - 1, device=device).unsqueeze(1) >> torch.arange(n, device=device)
    return (bits & 1).to(dtype)


class ProductHead(nn.Module):
    """The head of a product task: combines its factor tasks' raw outputs (logits).

    Args:
        factors: the factor task names, in config order.

    Example:
        >>> h = ProductHead(["ctr", "cvr"])
        >>> h({"ctr": torch.zeros(2), "cvr": torch.zeros(2)}).sigmoid()
        tensor([0.2500, 0.2500])
    """

    def __init__(self, factors: list[str]) -> None:
        super().__init__()
        self.factors = list(factors)

    def forward(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        return product_logit([raw[f] for f in self.factors])  # (B,)

    def score(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw)

    def target(self, label: torch.Tensor) -> torch.Tensor:
        return label
