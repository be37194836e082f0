"""The production feedback figures computed offline: what the Prometheus recording rules would
show if every labelled row of a data set came back through ``POST /feedback``.

``ranker evaluate`` reports these beside the exact metrics (``FeedbackFigures`` observing the
metrics pass of ``trainer.evaluate``, so the data is read once), so a dashboard figure can be held
against the bundle's own: calibration (sum of scores / sum of labels), NE, the AUC over the
bundle's reference bins (ties inside a bin) and RMSE, all from ``ranker.quality``'s sums, one
batch at a time (memory does not grow with the data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ranker.config import TaskSpec
from ranker.quality import QualitySums


class FeedbackFigures:
    """The feedback rules' sums of every task, fed one batch of labels and scores at a time.

    Args:
        tasks: the bundle's task specs.
        reference: the bundle's reference histograms (``{task: {"edges": [...], ...}}``).
    """

    def __init__(self, tasks: Sequence[TaskSpec], reference: Mapping[str, Mapping[str, list[float]]]) -> None:
        self.sums = {t.name: QualitySums(t.type, reference[t.name]["edges"] if t.type == "binary" else []) for t in tasks}

    def add(self, labels: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]) -> None:
        """One batch: per task its (B,) labels (NaN where a row has none) and (B,) scores."""
        for name, s in self.sums.items():
            y = labels[name]
            valid = ~np.isnan(y)
            s.add(y[valid], scores[name][valid])

    def figures(self) -> dict[str, dict[str, float]]:
        return {t: s.figures() for t, s in self.sums.items()}
