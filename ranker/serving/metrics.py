"""Prometheus metrics of the server, on a registry the app owns (tests pass a fresh one).

Label values come only from small fixed sets: status class, task and feature names of the
loaded bundle, invalid-request reasons, bin indices, and the model's version/architecture.

Score histograms need each task's own bucket edges (the bundle's reference bins), which a
labelled ``Histogram`` cannot have, so ``ScoreCollector`` yields them, with the per-bin
counters, reference shares and PSI gauges, from the loaded model's ``ScoreTracker``s at scrape
time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ranker.serving.errors import REASONS
from ranker.serving.predictor import LoadedModel, Prediction

STATUS_CLASSES = ("2xx", "4xx", "5xx")
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("parse", "featurize", "encode")  # request work outside the model, timed per request
HEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ScoreCollector(Collector):
    """Per-task score histogram (reference bin edges as buckets), bin counters, reference
    shares and windowed PSI of the model ``current()`` returns."""

    def __init__(self, current: Callable[[], LoadedModel | None]) -> None:
        self._current = current

    @staticmethod
    def _families() -> tuple[HistogramMetricFamily, CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            HistogramMetricFamily("ranker_task_score", "Scores served per task; buckets are the task's reference bin edges.", labels=["task"]),
            CounterMetricFamily(
                "ranker_task_score_bin", "Items whose score fell into reference bin `bin` (non-cumulative).", labels=["task", "bin"]
            ),
            GaugeMetricFamily("ranker_task_score_reference", "Training reference share of each score bin.", labels=["task", "bin"]),
            GaugeMetricFamily("ranker_task_drift_psi", "PSI of this replica's recent scores (sliding window) vs the reference.", labels=["task"]),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()  # names only: lets the registry check for clashes without a collect

    def collect(self) -> Iterator[Metric]:
        hist, bins, ref, drift = self._families()
        loaded = self._current()
        if loaded is not None:
            for task, tracker in loaded.trackers.items():
                snap = tracker.snapshot()
                cumulative = np.cumsum(snap.counts)  # (K,)
                buckets = [(floatToGoString(e), float(c)) for e, c in zip(tracker.edges, cumulative[:-1], strict=True)]
                hist.add_metric([task], buckets + [("+Inf", float(cumulative[-1]))], snap.total)
                for i, (count, share) in enumerate(zip(snap.counts, tracker.shares, strict=True)):
                    bins.add_metric([task, str(i)], float(count))
                    ref.add_metric([task, str(i)], float(share))
                drift.add_metric([task], snap.psi)
        yield from (hist, bins, ref, drift)


class ServingMetrics:
    """Every metric of the server, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, current: Callable[[], LoadedModel | None]) -> None:
        r = registry
        self.requests = Counter("ranker_requests", "/predict requests by status class.", ["status"], registry=r)
        self.request_duration = Histogram(
            "ranker_request_duration_seconds", "Wall time of /predict requests, body read to response.", buckets=REQUEST_BUCKETS, registry=r
        )
        self.encoder_duration = Histogram(
            "ranker_encoder_duration_seconds",
            "Seconds in the encoder and shared trunk per request (run once whatever the tasks).",
            buckets=HEAD_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "ranker_request_stage_duration_seconds",
            "Seconds per request in the work around the model: JSON parse, featurizing, response encoding.",
            ["stage"],
            buckets=HEAD_BUCKETS,
            registry=r,
        )
        self.task_requests = Counter("ranker_task_requests", "Requests that asked for the task.", ["task"], registry=r)
        self.task_items = Counter("ranker_task_items", "Items scored for the task.", ["task"], registry=r)
        self.head_duration = Histogram(
            "ranker_task_head_duration_seconds", "Seconds in the task's tower per request.", ["task"], buckets=HEAD_BUCKETS, registry=r
        )
        self.feature_missing = Counter("ranker_feature_missing", "Items with the feature missing (absent or null).", ["feature"], registry=r)
        self.invalid = Counter("ranker_invalid_requests", "Refused /predict requests by reason.", ["reason"], registry=r)
        self.model_info = Gauge("ranker_model_info", "The model being served (value 1).", ["version", "architecture"], registry=r)
        self.ready = Gauge("ranker_ready", "1 when the model is loaded and warm.", registry=r)
        self.shed = Counter("ranker_requests_shed", "/predict requests refused with 503: too many already waiting for a worker.", registry=r)
        r.register(ScoreCollector(current))
        for s in STATUS_CLASSES:
            self.requests.labels(s)
        for reason in REASONS:
            self.invalid.labels(reason)
        for stage in STAGES:
            self.stage_duration.labels(stage)

    def model_loaded(self, new: LoadedModel, old: LoadedModel | None) -> None:
        """Create the new model's series at 0 and move ``ranker_model_info`` to it."""
        for t in new.task_names:
            self.task_requests.labels(t)
            self.task_items.labels(t)
            self.head_duration.labels(t)
        for f in new.bundle.featurizer.inputs:
            self.feature_missing.labels(f.name)
        if old is not None and (old.version, old.architecture) != (new.version, new.architecture):
            self.model_info.remove(old.version, old.architecture)
        self.model_info.labels(new.version, new.architecture).set(1)

    def request_done(self, status: int, seconds: float) -> None:
        self.requests.labels("5xx" if status >= 500 else "4xx" if status >= 400 else "2xx").inc()
        self.request_duration.observe(seconds)

    def observe(self, loaded: LoadedModel, p: Prediction) -> None:
        """Record one scored request (called on the event loop once the response is sent)."""
        self.encoder_duration.observe(p.shared_seconds)
        for stage, seconds in p.stage_seconds.items():
            self.stage_duration.labels(stage).observe(seconds)
        for t in p.tasks:
            self.task_requests.labels(t).inc()
            self.task_items.labels(t).inc(p.n_items)
            self.head_duration.labels(t).observe(p.head_seconds.get(t, 0.0))
            loaded.trackers[t].add(p.scores[t])
        for feature, n in p.missing.items():
            if n:
                self.feature_missing.labels(feature).inc(n)
