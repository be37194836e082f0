"""TensorBoard scalars of a training run (``train.log_dir``), written by rank 0 only.

Tags: ``train/loss/<task>`` (smoothed, every ``EVERY`` steps), ``val/<task>/<metric>`` and
``weight/<task>`` per epoch, ``diagnostics/grad_cosine/<a>/<b>``, ``diagnostics/grad_norm/<task>``
and ``diagnostics/gate_entropy/<task>`` per epoch, ``throughput/rows_per_second``. The x axis
is the global optimiser step.
"""

from __future__ import annotations

from typing import Any

EVERY = 50  # steps between training-loss points


class Tracker:
    """No-op unless ``log_dir`` is given.

    Args:
        log_dir: the TensorBoard run folder, or None.

    Example:
        >>> t = Tracker(None)
        >>> t.step(10, {"ctr": 0.5})  # nothing written
        >>> t.close()
    """

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(log_dir=log_dir)

    def step(self, step: int, losses: dict[str, float]) -> None:
        if self.writer is None or step % EVERY:
            return
        for t, v in losses.items():
            self.writer.add_scalar(f"train/loss/{t}", v, step)

    def epoch(self, step: int, record: dict[str, Any], rows_per_second: float) -> None:
        """One epoch's history record (as the trainer keeps it)."""
        w = self.writer
        if w is None:
            return
        for t, metrics in record["val"].items():
            for k, v in metrics.items():
                if k != "count":
                    w.add_scalar(f"val/{t}/{k}", v, step)
        for t, v in record["weights"].items():
            w.add_scalar(f"weight/{t}", v, step)
        w.add_scalar("val/monitor", record["monitor"], step)
        diag = record.get("diagnostics") or {}
        for pair, v in (diag.get("grad_cosine") or {}).items():
            w.add_scalar(f"diagnostics/grad_cosine/{pair}", v, step)
        for t, v in (diag.get("grad_norm") or {}).items():
            w.add_scalar(f"diagnostics/grad_norm/{t}", v, step)
        for t, g in (diag.get("gates") or {}).items():
            w.add_scalar(f"diagnostics/gate_entropy/{t}", g["entropy"], step)
        w.add_scalar("throughput/rows_per_second", rows_per_second, step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
