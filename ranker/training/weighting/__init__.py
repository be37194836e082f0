"""Task weighting methods, one file each, chosen by ``train.weighting``.

A new method is one file plus one entry in ``WEIGHTINGS``. A method with hyperparameters takes
them as its second argument, typed in ``ranker.config.WeightingParams`` under the method's name
(``train.weighting_params.<name>``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ranker.config import TaskSpec, WeightingParams
from ranker.errors import RankerError
from ranker.training.weighting.base import GradientWeighting, LossWeighting, StepContext, Weighting
from ranker.training.weighting.cagrad import CAGrad
from ranker.training.weighting.dwa import DWA
from ranker.training.weighting.famo import FAMO
from ranker.training.weighting.gradnorm import GradNorm
from ranker.training.weighting.mgda import MGDA
from ranker.training.weighting.pcgrad import PCGrad
from ranker.training.weighting.rlw import RLW
from ranker.training.weighting.static import Static
from ranker.training.weighting.uncertainty import Uncertainty

WEIGHTINGS: dict[str, type[Weighting]] = {
    "static": Static,
    "uncertainty": Uncertainty,
    "gradnorm": GradNorm,
    "dwa": DWA,
    "rlw": RLW,
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "cagrad": CAGrad,
    "famo": FAMO,
}


def check_weighting(name: str, key: str = "train.weighting") -> None:
    """Raises: RankerError naming ``key`` (the config key, or the CLI flag that gave ``name``)."""
    if name not in WEIGHTINGS:
        raise RankerError(f"{key}: unknown weighting {name!r}; valid: {', '.join(WEIGHTINGS)}")


def build_weighting(name: str, tasks: Sequence[TaskSpec], params: WeightingParams | None = None) -> Weighting:
    """The method ``name`` over ``tasks`` (those with a loss), with its typed hyperparameters."""
    check_weighting(name)
    section = getattr(params or WeightingParams(), name, None)
    return WEIGHTINGS[name](tasks) if section is None else WEIGHTINGS[name](tasks, section)  # type: ignore[call-arg]


__all__ = ["WEIGHTINGS", "GradientWeighting", "LossWeighting", "StepContext", "Weighting", "build_weighting", "check_weighting"]
