"""Learning-rate schedules, chosen by ``train.lr_schedule.type``.

The trainer asks a schedule for the factor on ``train.lr`` before every optimiser step and tells
it at the end of every epoch whether the val monitor improved; it knows no schedule by name. A
schedule's own state goes into checkpoints (``state_dict``), so a resumed run continues with the
same learning rate as an uninterrupted one.
"""

from __future__ import annotations

import math

from ranker.config import LrSchedule


class Schedule:
    """Constant: the factor is 1 throughout."""

    def __init__(self, cfg: LrSchedule, epochs: int) -> None:
        self.cfg = cfg
        self.epochs = epochs

    def factor(self, epoch: int, batch: int, steps: int) -> float:
        """The factor on ``train.lr`` for batch ``batch`` of ``steps`` in epoch ``epoch`` (0-based)."""
        return 1.0

    def end_of_epoch(self, improved: bool) -> str | None:
        """After an epoch's validation; returns a line to log when the schedule changed course."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Plateau(Schedule):
    """Cut the factor by ``factor`` after ``patience`` epochs without a gain of the monitor."""

    def __init__(self, cfg: LrSchedule, epochs: int) -> None:
        super().__init__(cfg, epochs)
        self.scale = 1.0
        self.bad = 0

    def factor(self, epoch: int, batch: int, steps: int) -> float:
        return self.scale

    def end_of_epoch(self, improved: bool) -> str | None:
        if improved:
            self.bad = 0
            return None
        self.bad += 1
        if self.bad < self.cfg.patience or self.scale <= self.cfg.min_factor:
            return None
        self.bad = 0
        self.scale = max(self.scale * self.cfg.factor, self.cfg.min_factor)
        return f"lr schedule: no gain for {self.cfg.patience} epoch(s); learning rate now {self.scale:g} x train.lr"

    def state_dict(self) -> dict:
        return {"scale": self.scale, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.bad = float(state["scale"]), int(state["bad"])


class Cosine(Schedule):
    """Half a cosine from 1 down to ``min_factor`` over ``train.epochs``, step by step."""

    def factor(self, epoch: int, batch: int, steps: int) -> float:
        t = min((epoch + batch / max(steps, 1)) / self.epochs, 1.0)
        lo = self.cfg.min_factor
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES: dict[str, type[Schedule]] = {"constant": Schedule, "plateau": Plateau, "cosine": Cosine}


def build_schedule(cfg: LrSchedule, epochs: int) -> Schedule:
    return SCHEDULES[cfg.type](cfg, epochs)
