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


def monitoring_figures(
    model: MultiTaskRanker, loader: Loader, tasks: Sequence[TaskSpec], reference: Mapping[str, Mapping[str, list[float]]]
) -> dict[str, dict[str, float]]:
    """Per task, the feedback rules' figures over every labelled row of ``loader``.

    Args:
        model: the bundle's model.
        loader: labelled batches (``label:<task>``, NaN where a row has no label for the task).
        tasks: the bundle's task specs.
        reference: the bundle's reference histograms (``{task: {"edges": [...], ...}}``).

    Example:
        >>> from ranker.bundle import load_bundle  # doctest: +SKIP
        >>> b = load_bundle("runs/bundle")  # doctest: +SKIP
        >>> monitoring_figures(b.model, loader, b.config.tasks, b.reference)["ctr"]["ne"]  # doctest: +SKIP
        0.87
    """
    sums = {t.name: QualitySums(t.type, reference[t.name]["edges"] if t.type == "binary" else []) for t in tasks}
    model.eval()
    with torch.inference_mode():
        for batch in loader():
            out = model.predict(batch)  # {task: (B,)}
            for t in tasks:
                y = batch[f"label:{t.name}"].numpy()
                valid = ~np.isnan(y)
                sums[t.name].add(y[valid], out[t.name].numpy()[valid])
    return {t: s.figures() for t, s in sums.items()}
