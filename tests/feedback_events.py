"""Feedback events for tests: every labelled row of a data set with the bundle's own score,
as `ranker evaluate` sees them, and the offline figures of such events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranker.bundle import Bundle
from ranker.quality import QualitySums
from ranker.training.data import Loader, ParquetSource, label_columns


def labelled_scores(b: Bundle, data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{task: (labels, scores)} of every labelled row of ``data``."""
    tasks = [t.name for t in b.config.tasks]
    src = ParquetSource(str(data), "--data", b.featurizer.columns + label_columns(b.config.tasks))
    ys: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    ps: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    with torch.inference_mode():
        for batch in Loader(src, b.featurizer, b.config.tasks, 512)():
            out = b.model.predict(batch)
            for t in tasks:
                y = batch[f"label:{t}"].numpy()
                ok = ~np.isnan(y)
                ys[t].append(y[ok])
                ps[t].append(out[t].numpy()[ok])
    return {t: (np.concatenate(ys[t]), np.concatenate(ps[t])) for t in tasks}


def as_events(version: str, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """One /feedback event per labelled row. float(float32) is exact and JSON carries the
    float64 exactly, so the server sees the very number the model produced."""
    return [
        {"model_version": version, "task": t, "score": float(s), "label": float(y)}
        for t, (ys, ss) in data.items()
        for y, s in zip(ys, ss, strict=True)
    ]


def offline_figures(b: Bundle, events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The feedback rules' figures of ``events`` (one model version), computed in Python."""
    types = {t.name: t.type for t in b.config.tasks}
    sums = {t: QualitySums(ty, b.reference[t]["edges"] if ty == "binary" else []) for t, ty in types.items()}
    for t in types:
        mine = [e for e in events if e["task"] == t]
        sums[t].add(np.array([e["label"] for e in mine]), np.array([e["score"] for e in mine]))
    return {t: s.figures() for t, s in sums.items()}
