"""``POST /feedback``: labelled events of served scores -> the feedback sums in Prometheus.

The caller (whatever logs impressions) sends back, once a prediction's attribution window has
closed, the score it was served and the final label::

    {"events": [{"model_version": "3f2a...", "task": "ctr", "score": 0.031, "label": 0}, ...]}

Negatives are explicit events: the server keeps no state per prediction, so replaying old logs
through the endpoint gives the same sums. Each event is
checked (reasons in ``ranker.serving.errors.FeedbackReason``); the good ones are added to the
counters of ``FeedbackMetrics`` per task and model version, the others counted by reason. A
body that cannot be read at all is refused whole (422, nothing counted).

Model versions are the label values of every sum, so they must come from a bounded set: the
server accepts the versions it has loaded (the current bundle and the last few it served
before a reload), whose reference bins it knows. An event of any other version is refused as
``unknown_model_version``. That set is per pod (its workers share it): any pod takes the
events of the version every pod serves, but after a rolling update the new pods refuse the late
labels of the version they replaced.

Validation is vectorised: msgspec decodes the body into typed structs in C, and the checks and
sums are numpy operations over all events, then one counter update per (task, version, bin).
A body msgspec refuses (a field of the wrong type, a non-finite number) goes through the
standard-library JSON parser and a per-event check, so one bad event costs only itself.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np

from ranker.quality import log_loss_terms
from ranker.reference import assign_bins
from ranker.serving.errors import FEEDBACK_REASONS, ServingError
from ranker.serving.metrics import FeedbackMetrics
from ranker.serving.parsing import NESTED_TOO_DEEPLY
from ranker.serving.predictor import LoadedModel

FEEDBACK_PATH = "/feedback"
KEEP_VERSIONS = 8  # model versions whose late labels are still accepted (the current one included)
_REASON_CODE = {r: i + 1 for i, r in enumerate(FEEDBACK_REASONS)}  # 0 = accepted
# the largest regression score or label counted. The squared-error counters only grow, and an
# hour's increase is read off their all-time value: one label of 1e12 put them at ~1e24, where
# an hour's ~1e7 of squared error is below float64's resolution, and live RMSE read 0 for the
# rest of the process's life. At 1e9 a square is at most 1e18, which resolves increments of ~1e3.
MAX_VALUE = 1e9
_SHOWN = 60  # characters of a caller's string quoted back in a message


class _Event(msgspec.Struct, gc=False):
    model_version: str
    task: str
    score: float
    label: float


class _Body(msgspec.Struct):
    events: list[_Event]


_DECODER = msgspec.json.Decoder(_Body)


@dataclass(frozen=True)
class TaskRef:
    type: str  # "binary" | "regression"
    edges: np.ndarray  # (K-1,) the task's reference bin edges in this model version


@dataclass(frozen=True)
class _Columns:
    versions: list[str]
    tasks: list[str]
    scores: np.ndarray  # (N,) float64
    labels: np.ndarray  # (N,) float64
    bad: np.ndarray  # (N,) bool: not a well-formed event


def _quote(s: str) -> str:
    return repr(s if len(s) <= _SHOWN else s[:_SHOWN] + "...")


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _float(v: int | float) -> float:
    """A JSON number as a float; an integer past the float range is infinite (then refused
    as non-finite), not an OverflowError."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def parse_events(body: bytes, max_events: int) -> _Columns:
    """A /feedback body -> event columns.

    Raises:
        ServingError: 422 when the body is not a JSON object with an ``events`` list, or holds
            more than ``max_events`` events.
    """
    try:
        events: list[Any] = _DECODER.decode(body).events
        fast = True
    except RecursionError:  # msgspec skipping a deep unknown key; json.loads would fail alike
        raise ServingError(422, "bad_json", "body", NESTED_TOO_DEEPLY) from None
    except (msgspec.MsgspecError, UnicodeDecodeError):
        try:
            doc = json.loads(body)  # accepts NaN/Infinity and 1e999, so they can be named per event
        except RecursionError:
            raise ServingError(422, "bad_json", "body", NESTED_TOO_DEEPLY) from None
        except ValueError as e:
            raise ServingError(422, "bad_json", "body", f"not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise ServingError(422, "bad_type", "events", 'the body must be an object {"events": [...]} with a list of events') from None
        events, fast = doc["events"], False
    if len(events) > max_events:
        raise ServingError(422, "too_many_items", "events", f"{len(events)} events; at most {max_events} per request")
    n = len(events)
    if fast:
        return _Columns(
            versions=list(map(attrgetter("model_version"), events)),
            tasks=list(map(attrgetter("task"), events)),
            scores=np.fromiter(map(attrgetter("score"), events), np.float64, n),
            labels=np.fromiter(map(attrgetter("label"), events), np.float64, n),
            bad=np.zeros(n, dtype=bool),
        )
    # slow path, one event at a time: a malformed event is marked, never fatal
    versions, tasks, scores, labels, bad = [""] * n, [""] * n, np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=bool)
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            bad[i] = True
            continue
        v, t, s, y = e.get("model_version"), e.get("task"), e.get("score"), e.get("label")
        tasks[i] = t if isinstance(t, str) else ""
        if isinstance(v, str) and isinstance(t, str) and _number(s) and _number(y):
            versions[i], scores[i], labels[i] = v, _float(s), _float(y)  # type: ignore[arg-type]
        else:
            bad[i] = True
    return _Columns(versions, tasks, scores, labels, bad)


def _codes(values: list[str]) -> tuple[list[str], np.ndarray]:
    """(distinct values in first-seen order, index of each value among them): dict lookups
    in C, far cheaper than sorting the strings."""
    index = {v: i for i, v in enumerate(dict.fromkeys(values))}
    return list(index), np.fromiter(map(index.__getitem__, values), np.int64, len(values))


class FeedbackRecorder:
    """Checks feedback events and adds the good ones to ``metrics``.

    Args:
        metrics: where the sums go.
        max_events: the most events one request may carry.

    Example:
        >>> from prometheus_client import CollectorRegistry
        >>> rec = FeedbackRecorder(FeedbackMetrics(CollectorRegistry()), max_events=100)
        >>> rec.add_version("v1", {"ctr": TaskRef("binary", np.array([0.5]))})
        >>> rec.record(b'{"events": [{"model_version": "v1", "task": "ctr", "score": 0.7, "label": 1},'
        ...            b' {"model_version": "v1", "task": "ctr", "score": 1.5, "label": 0}]}')
        {'accepted': 1, 'rejected': {'score_out_of_range': 1}, 'detail': {'score_out_of_range': 'events[1].score: 1.5 is outside [0, 1] for binary task ctr'}}
    """

    def __init__(self, metrics: FeedbackMetrics, max_events: int) -> None:
        self.metrics = metrics
        self.max_events = max_events
        self._versions: OrderedDict[str, dict[str, TaskRef]] = OrderedDict()
        self._lock = threading.Lock()  # reloads change the version table; requests read a snapshot

    @staticmethod
    def _shape(tasks: dict[str, TaskRef]) -> dict[str, tuple[str, int]]:
        return {t: (ref.type, ref.edges.size + 1) for t, ref in tasks.items()}

    def add_version(self, version: str, tasks: dict[str, TaskRef]) -> None:
        """Accept events of ``version`` from now on (its series start at 0); the oldest of
        more than ``KEEP_VERSIONS`` versions is forgotten."""
        with self._lock:
            versions = OrderedDict(self._versions)
            versions.pop(version, None)
            versions[version] = tasks
            dropped = []
            while len(versions) > KEEP_VERSIONS:
                dropped.append(versions.popitem(last=False))
            self.metrics.add_version(version, self._shape(tasks))
            for old, old_tasks in dropped:
                self.metrics.remove_version(old, self._shape(old_tasks))
            self._versions = versions  # one reference swap: record() never sees a half-built table

    def model_loaded(self, loaded: LoadedModel) -> None:
        """Accept the newly served model's version and export its validation figures."""
        types = {t.name: t.type for t in loaded.bundle.config.tasks}
        self.add_version(loaded.version, {t: TaskRef(types[t], np.asarray(tr.edges)) for t, tr in loaded.trackers.items()})
        self.metrics.set_validation(loaded.bundle.metrics.get("val") or {}, loaded.task_names)

    @property
    def versions(self) -> list[str]:
        return list(self._versions)

    def table(self) -> dict[str, dict[str, TaskRef]]:
        """The accepted versions, oldest first, with their tasks' references."""
        return dict(self._versions)

    def record(self, body: bytes) -> dict[str, Any]:
        """Check and count one request's events; returns the answer
        ``{"accepted": n, "rejected": {reason: count}, "detail": {reason: message}}``."""
        cols = parse_events(body, self.max_events)
        versions = self._versions
        n = cols.scores.size
        reason = np.where(cols.bad, _REASON_CODE["bad_event"], 0)  # (N,) 0 = accepted
        messages: dict[str, tuple[int, str]] = {}  # reason -> (first event, what is wrong with it)

        def note(reason_name: str, i: int, text: str) -> None:
            if reason_name not in messages or i < messages[reason_name][0]:
                messages[reason_name] = (i, f"events[{i}]{text}")

        if cols.bad.any():
            note("bad_event", int(np.argmax(cols.bad)), ": needs model_version and task (strings), score and label (numbers)")
        task_label = np.asarray(cols.tasks, dtype=object)  # the outcome's task label per event
        known_tasks = {t for tasks in versions.values() for t in tasks}
        finite = np.isfinite(cols.scores) & np.isfinite(cols.labels)
        u_task, task_code = _codes(cols.tasks)
        u_version, version_code = _codes(cols.versions)
        unknown_name = np.array([t not in known_tasks for t in u_task], dtype=bool)
        if n:
            task_label[unknown_name[task_code]] = ""
        groups: list[tuple[str, str, TaskRef, np.ndarray]] = []  # (task, version, ref, event indices)
        width = max(len(u_task), 1)
        candidates = np.flatnonzero(reason == 0)  # (M,) well-formed events
        pair = version_code[candidates] * width + task_code[candidates]  # (M,) one code per (version, task)
        order = np.argsort(pair, kind="stable")  # one sort, however many distinct pairs a request holds
        codes, starts = np.unique(pair[order], return_index=True)
        for code, idx in zip(codes.tolist(), np.split(candidates[order], starts[1:]) if codes.size else [], strict=True):
            version, task = u_version[code // width], u_task[code % width]
            tasks = versions.get(version)
            if tasks is None:
                reason[idx] = _REASON_CODE["unknown_model_version"]
                note("unknown_model_version", int(idx[0]), f".model_version: {_quote(version)} is not a version this server has loaded ({', '.join(versions)})")
                continue
            ref = tasks.get(task)
            if ref is None:
                reason[idx] = _REASON_CODE["unknown_task"]
                note("unknown_task", int(idx[0]), f".task: {_quote(task)} is not a task of model {version} ({', '.join(tasks)})")
                continue
            s, y = cols.scores[idx], cols.labels[idx]
            # (reason, failed, field, message template); each event gets its first failing reason
            checks = [("non_finite", ~finite[idx], "", "score and label must be finite numbers")]
            if ref.type == "binary":  # task names are identifiers: no braces for str.format
                checks += [
                    ("score_out_of_range", (s < 0) | (s > 1), ".score", "{s:.15g} is outside [0, 1] for binary task " + task),
                    ("bad_label", (y != 0) & (y != 1), ".label", "{y:.15g} must be 0 or 1 for binary task " + task),
                ]
            else:  # the sums are counters, which only grow (and a ratio of sums needs one sign);
                # past MAX_VALUE one square would swamp them (see MAX_VALUE)
                checks += [
                    ("score_out_of_range", (s < 0) | (s > MAX_VALUE), ".score", "{s:.15g} is outside [0, " + f"{MAX_VALUE:g}" + "] for regression task " + task),
                    ("bad_label", (y < 0) | (y > MAX_VALUE), ".label", "{y:.15g} is outside [0, " + f"{MAX_VALUE:g}" + "] for regression task " + task),
                ]
            ok = np.ones(idx.size, dtype=bool)
            for name, failed, field, message in checks:
                failed &= ok
                if failed.any():
                    j = int(np.argmax(failed))
                    reason[idx[failed]] = _REASON_CODE[name]
                    note(name, int(idx[j]), f"{field}: " + message.format(s=s[j], y=y[j]))
                    ok &= ~failed
            if ok.any():
                groups.append((task, version, ref, idx[ok]))
        for task, version, ref, idx in groups:
            self._add(task, version, ref, cols.scores[idx], cols.labels[idx])
        return self._outcomes(task_label, reason, messages)

    def _add(self, task: str, version: str, ref: TaskRef, s: np.ndarray, y: np.ndarray) -> None:
        """Add one (task, version) group of accepted events to the counters."""
        m, tv = self.metrics, (task, version)
        m.labelled.labels(*tv).inc(s.size)
        m.label.labels(*tv).inc(float(y.sum()))
        m.score.labels(*tv).inc(float(s.sum()))
        if ref.type != "binary":
            m.squared_error.labels(*tv).inc(float(((s - y) ** 2).sum()))
            return
        m.logloss.labels(*tv).inc(float(log_loss_terms(y, s).sum()))
        k = ref.edges.size + 1
        bins = assign_bins(s, ref.edges)  # (n,)
        pos = np.bincount(bins[y == 1], minlength=k)  # (K,)
        neg = np.bincount(bins[y == 0], minlength=k)  # (K,)
        below = np.cumsum(neg) - neg  # (K,) negatives in the bins under each bin
        for b in np.flatnonzero(pos).tolist():
            m.score_bin.labels(*tv, "1", str(b)).inc(int(pos[b]))
        for b in np.flatnonzero(neg).tolist():
            m.score_bin.labels(*tv, "0", str(b)).inc(int(neg[b]))
        for b in np.flatnonzero(below).tolist():
            m.negatives_below.labels(*tv, str(b)).inc(int(below[b]))

    def _outcomes(self, task_label: np.ndarray, reason: np.ndarray, messages: dict[str, tuple[int, str]]) -> dict[str, Any]:
        """Count events per (task, outcome) and build the answer."""
        outcomes = ("accepted", *FEEDBACK_REASONS)
        rejected: dict[str, int] = {}
        if reason.size:
            u_task, task_code = _codes(task_label.tolist())
            counts = np.bincount(task_code * len(outcomes) + reason, minlength=len(u_task) * len(outcomes))
            for code in np.flatnonzero(counts).tolist():
                task, outcome = u_task[code // len(outcomes)], outcomes[code % len(outcomes)]
                self.metrics.events.labels(task, outcome).inc(int(counts[code]))
            per_reason = np.bincount(reason, minlength=len(outcomes))
            rejected = {outcomes[i]: int(c) for i, c in enumerate(per_reason.tolist()) if i and c}
        accepted = int((reason == 0).sum())
        out: dict[str, Any] = {"accepted": accepted, "rejected": rejected}
        if messages:
            out["detail"] = {r: messages[r][1] for r in rejected if r in messages}
        return out
