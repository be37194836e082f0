"""The production feedback figures computed offline: what the Prometheus recording rules would
show if every labelled row of a data set came back through ``POST /feedback``.

``ranker evaluate`` reports these beside the exact metrics, so a dashboard figure can be held
against the bundle's own: calibration (sum of scores / sum of labels), NE, the AUC over the
bundle's reference bins (ties inside a bin) and RMSE, all from ``ranker.quality``'s sums, one
batch at a time (memory does not grow with the data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ranker.config import TaskSpec
from ranker.model import MultiTaskRanker
from ranker.quality import QualitySums
from ranker.training.data import Loader


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


def monitoring_figures(
    model: MultiTaskRanker, loader: Loader, tasks: Sequence[TaskSpec], reference: Mapping[str, Mapping[str, list[float]]]
) -> dict[str, dict[str, float]]:
    """Per task, the feedback rules' figures over every labelled row of ``loader``.

    Args:
        model: the bundle's model.
        loader: labelled batches (``label:<task>``, NaN where a row has no label for the task).
        tasks: the bundle's task specs.
        reference: the bundle's reference histograms (``{task: {"edges": [...], ...}}``).

    ``ranker evaluate`` gets the same figures in its metrics pass instead (``FeedbackFigures``
    as ``evaluate``'s observer), reading the data once.

    Example:
        >>> from ranker.bundle import load_bundle  # doctest: +SKIP
        >>> b = load_bundle("runs/bundle")  # doctest: +SKIP
        >>> monitoring_figures(b.model, loader, b.config.tasks, b.reference)["ctr"]["ne"]  # doctest: +SKIP
        0.87
    """
    figures = FeedbackFigures(tasks, reference)
    model.eval()
    with torch.inference_mode():
        for batch in loader():
            out = model.predict(batch)  # {task: (B,)}
            figures.add({t.name: batch[f"label:{t.name}"].numpy() for t in tasks}, {t.name: out[t.name].numpy() for t in tasks})
    return figures.figures()
