"""Task weighting methods, one file each, chosen by ``train.weighting``.

A new method is one file plus one entry in ``WEIGHTINGS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ranker.config import TaskSpec
from ranker.errors import RankerError
from ranker.training.weighting.base import LossWeighting, StepContext, Weighting
from ranker.training.weighting.static import Static
from ranker.training.weighting.uncertainty import Uncertainty

WEIGHTINGS: dict[str, type[Weighting]] = {
    "static": Static,
    "uncertainty": Uncertainty,
}


def build_weighting(name: str, tasks: Sequence[TaskSpec]) -> Weighting:
    if name not in WEIGHTINGS:
        raise RankerError(f"train.weighting: unknown weighting {name!r}; valid: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks)


__all__ = ["WEIGHTINGS", "LossWeighting", "StepContext", "Weighting", "build_weighting"]
