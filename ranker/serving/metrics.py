"""Prometheus metrics of the server, on a registry the app owns (tests pass a fresh one).

Label values come only from small fixed sets: status class, task and feature names of the
loaded bundle, invalid-request reasons, bin indices, and the model's version/architecture.

Score histograms need each task's own bucket edges (the bundle's reference bins), which a
labelled ``Histogram`` cannot have, so ``ScoreCollector`` yields them, with the per-bin
counters, reference shares and PSI gauges, from the loaded model's ``ScoreTracker``s at scrape
time; a reload hands each tracker's all-time counts on to the next model's
(``ServingState._count_on``), so these counters never go back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

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

from ranker.serving.drift import TrackerSnapshot
from ranker.serving.errors import FEEDBACK_REASONS, FEEDBACK_REQUEST_REASONS, REASONS
from ranker.serving.predictor import LoadedModel, Prediction

# client_closed: the client hung up before any answer was sent (nginx logs these as 499). Not a
# server failure, so kept out of 5xx and of the request-duration histogram.
# The request-duration histogram times scored (2xx) requests only: refusals (4xx, 413, the 503s
# of load shedding) answer in microseconds, and counted in they made the latency quantiles look
# better exactly while callers were refused. Their counts are in ranker_requests_total.
CLIENT_CLOSED = "client_closed"
STATUS_CLASSES = ("2xx", "4xx", "5xx", CLIENT_CLOSED)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("parse", "featurize", "encode")  # request work outside the model, timed per request
HEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def status_class(status: int) -> str:
    return "5xx" if status >= 500 else "4xx" if status >= 400 else "2xx"


# set (by ``ranker serve --workers N``, or by hand) when metrics live in prometheus_client's
# multiprocess files, where remove() and clear() leave the values in place
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    return METRICS_DIR_ENV in os.environ


class ScoreCollector(Collector):
    """Per-task score histogram (reference bin edges as buckets), bin counters, reference
    shares and windowed PSI of the model ``current()`` returns."""

    def __init__(
        self,
        current: Callable[[], LoadedModel | None],
        snapshots: Callable[[LoadedModel], Mapping[str, TrackerSnapshot]] | None = None,
    ) -> None:
        self._current = current
        # where the tracker states come from: this process's trackers, or (several workers)
        # every worker's, summed (``multiproc.SharedScores.snapshots``)
        self._snapshots = snapshots or (lambda loaded: {t: tr.snapshot() for t, tr in loaded.trackers.items()})

    @staticmethod
    def _families() -> tuple[HistogramMetricFamily, CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            HistogramMetricFamily("ranker_task_score", "Scores served per task; buckets are the task's reference bin edges.", labels=["task"]),
            CounterMetricFamily(
                "ranker_task_score_bin", "Items whose score fell into reference bin `bin` (non-cumulative).", labels=["task", "bin"]
            ),
            GaugeMetricFamily("ranker_task_score_reference", "Training reference share of each score bin.", labels=["task", "bin"]),
            GaugeMetricFamily(
                "ranker_task_drift_psi", "PSI of this replica's recent scores (sliding window) vs the reference; NaN until the window holds 1,000 scores (or is full, if smaller).",
                labels=["task"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()  # names only: lets the registry check for clashes without a collect

    def collect(self) -> Iterator[Metric]:
        hist, bins, ref, drift = self._families()
        loaded = self._current()
        if loaded is not None:
            snaps = self._snapshots(loaded)
            for task, tracker in loaded.trackers.items():
                snap = snaps[task]
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
        self.requests = Counter("ranker_requests", "/predict requests by status class (2xx, 4xx, 5xx), or client_closed: the client hung up before an answer.", ["status"], registry=r)
        self.request_duration = Histogram(
            "ranker_request_duration_seconds", "Wall time of scored (2xx) /predict requests, body read to response.", buckets=REQUEST_BUCKETS, registry=r
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
        # multiprocess_mode: how worker processes combine (used only with several workers)
        self.model_info = Gauge("ranker_model_info", "The model being served (value 1).", ["version", "architecture"], registry=r, multiprocess_mode="livemax")
        self.ready = Gauge(
            "ranker_ready", "1 when the model is loaded and warm (with several workers: in every worker the supervisor runs).", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip
        self.shed = Counter("ranker_requests_shed", "/predict requests refused with 503: too many already waiting for a worker.", registry=r)
        self.scores = ScoreCollector(current)
        r.register(self.scores)
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
            # 0 first: in multiprocess mode (a PROMETHEUS_MULTIPROC_DIR) remove() leaves the
            # value in this process's file, where the old version would keep reading 1
            self.model_info.labels(old.version, old.architecture).set(0)
            if not multiprocess_mode():
                self.model_info.remove(old.version, old.architecture)
        self.model_info.labels(new.version, new.architecture).set(1)

    def request_done(self, status: int, seconds: float) -> None:
        cls = status_class(status)
        self.requests.labels(cls).inc()
        if cls == "2xx":
            self.request_duration.observe(seconds)

    def request_abandoned(self) -> None:
        """The client went away before the answer started: counted apart from server errors."""
        self.requests.labels(CLIENT_CLOSED).inc()

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


class FeedbackMetrics:
    """The metrics of ``POST /feedback`` (labelled events of served scores), on ``registry``.

    Only sums, so that Prometheus can add them across replicas and restarts before taking
    ratios (``ranker.quality`` has the formulas, the recording rules apply them). Every sum is
    per task and per the model version that served the score; binary tasks also count events
    into the version's reference score bins, split by label, for the binned AUC.
    Plain ``Counter``/``Gauge`` objects, so any aggregation of the registry applies to them.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r, tv = registry, ["task", "model_version"]
        self.events = Counter(
            "ranker_feedback_events", "Feedback events by task and outcome: accepted, or why refused (task is empty when unknown).",
            ["task", "outcome"], registry=r,
        )  # fmt: skip
        self.invalid = Counter("ranker_feedback_invalid_requests", "Refused POST /feedback requests (no event counted) by reason.", ["reason"], registry=r)
        # every answer of POST /feedback by status class: a 5xx (labels lost) shows here and
        # nowhere else, as ranker_requests_total counts /predict only
        self.requests = Counter("ranker_feedback_requests", "POST /feedback responses by status class (client_closed: the client hung up first).",
                                ["status"], registry=r)
        for st in STATUS_CLASSES:
            self.requests.labels(st)
        self.labelled = Counter("ranker_feedback_labelled", "Accepted labelled events.", tv, registry=r)
        self.label = Counter("ranker_feedback_label", "Sum of the labels of accepted events (observed positives for a binary task).", tv, registry=r)
        self.score = Counter("ranker_feedback_score", "Sum of the served scores of accepted events (expected positives for a binary task).", tv, registry=r)
        self.logloss = Counter("ranker_feedback_logloss_nats", "Sum of the log loss of accepted events of binary tasks, in nats.", tv, registry=r)
        self.squared_error = Counter("ranker_feedback_squared_error", "Sum of (score - label)^2 of accepted events of regression tasks.", tv, registry=r)
        self.score_bin = Counter(
            "ranker_feedback_score_bin", "Accepted events of binary tasks by label and the reference bin their score fell in.",
            [*tv, "label", "bin"], registry=r,
        )  # fmt: skip
        self.negatives_below = Counter(
            "ranker_feedback_negatives_below", "Accepted negative events of binary tasks whose score fell in a reference bin below `bin` (for AUC).",
            [*tv, "bin"], registry=r,
        )  # fmt: skip
        # set at model load by every live worker: "live" so a dead worker's value (for a task a
        # rolled bundle dropped) does not linger after a SIGHUP roll
        self.validation_calibration = Gauge(
            "ranker_task_validation_calibration", "Calibration of the served bundle on its validation split (metrics.json).", ["task"],
            registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.validation_ne = Gauge(
            "ranker_task_validation_ne", "Normalized entropy of the served bundle on its validation split (metrics.json).", ["task"],
            registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.validation_rmse = Gauge(
            "ranker_task_validation_rmse", "RMSE of the served bundle on its validation split (metrics.json), label units.", ["task"],
            registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        for reason in FEEDBACK_REQUEST_REASONS:
            self.invalid.labels(reason)
        for reason in ("bad_event", "unknown_task", "unknown_model_version"):  # refusals that may name no known task
            self.events.labels("", reason)

    def request_done(self, status: int, seconds: float) -> None:
        self.requests.labels(status_class(status)).inc()

    def request_abandoned(self) -> None:
        self.requests.labels(CLIENT_CLOSED).inc()

    def _version_series(self, task: str, version: str, task_type: str, bins: int) -> list[tuple[Counter, tuple[str, ...]]]:
        """Every (counter, labels) of one task and model version."""
        out: list[tuple[Counter, tuple[str, ...]]] = [(c, (task, version)) for c in (self.labelled, self.label, self.score)]
        if task_type == "binary":
            out.append((self.logloss, (task, version)))
            out += [(self.score_bin, (task, version, y, str(b))) for y in ("0", "1") for b in range(bins)]
            out += [(self.negatives_below, (task, version, str(b))) for b in range(bins)]
        else:
            out.append((self.squared_error, (task, version)))
        return out

    def add_version(self, version: str, tasks: dict[str, tuple[str, int]]) -> None:
        """Create a model version's series at 0 (``tasks``: {task: (type, bins)}), so that
        ``increase()`` sees its first events."""
        for task, (task_type, bins) in tasks.items():
            for outcome in ("accepted", *FEEDBACK_REASONS):
                self.events.labels(task, outcome)
            for counter, labels in self._version_series(task, version, task_type, bins):
                counter.labels(*labels)

    def remove_version(self, version: str, tasks: dict[str, tuple[str, int]]) -> None:
        """Drop a forgotten version's series (keeps the label sets bounded)."""
        for task, (task_type, bins) in tasks.items():
            for counter, labels in self._version_series(task, version, task_type, bins):
                try:
                    counter.remove(*labels)
                except KeyError:
                    pass

    def set_validation(self, metrics: Mapping[str, Mapping[str, object]], tasks: Sequence[str]) -> None:
        """The served bundle's validation figures per task (only the finite ones it has)."""
        for gauge, key in ((self.validation_calibration, "calibration"), (self.validation_ne, "ne"), (self.validation_rmse, "rmse")):
            if not multiprocess_mode():  # a worker serves one bundle for life (prometheus_client cannot clear there)
                gauge.clear()
            for task in tasks:
                v = metrics.get(task, {}).get(key)
                if isinstance(v, int | float) and math.isfinite(v):
                    gauge.labels(task).set(float(v))
