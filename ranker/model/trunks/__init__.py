"""Trunks: shared computation between the encoder and the task towers.

Every trunk takes ``(x, tasks)`` with x (B, in) and returns ``{task: (B, out_dim)}`` for the
requested tasks only, computing only the gates (and task-owned experts) those tasks need.
Gate weights of the last call are kept in ``last_gates`` ({task: (B, E)}) for diagnostics.
``task_parameters()`` lists the parameters only one task's loss reaches (gradient methods give
them that task's own gradient, as they do the towers).
A new trunk is one file plus one entry in ``ARCHITECTURES``. ``model.film`` wraps any of them
in ``ranker.model.film.FiLM`` (same contract).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ranker.config import ARCHITECTURE_NAMES, ModelConfig
from ranker.errors import RankerError
from ranker.model.film import FiLM
from ranker.model.trunks.cross_stitch import CrossStitch
from ranker.model.trunks.mmoe import MMoE
from ranker.model.trunks.ple import PLE
from ranker.model.trunks.shared_bottom import SharedBottom

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "cross_stitch": CrossStitch,
}
# the config validates names before any model exists (and cannot import the model): one list
if tuple(ARCHITECTURES) != ARCHITECTURE_NAMES:
    raise ImportError(f"trunk registry {tuple(ARCHITECTURES)} differs from config.ARCHITECTURE_NAMES {ARCHITECTURE_NAMES}")


def build_trunk(cfg: ModelConfig, in_dim: int, tasks: Sequence[str]) -> nn.Module:
    try:
        cls = ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise RankerError(
            f"model.architecture: unknown architecture {cfg.architecture!r}; valid: {', '.join(ARCHITECTURES)}"
        ) from None
    trunk = cls(cfg, in_dim, list(tasks))
    # model.film: task-conditioned scale and shift on whichever trunk was built
    return FiLM(trunk, cfg, in_dim, list(tasks)) if cfg.film else trunk
