"""``ranker audit``: check the training data before training, with no model.

Four kinds of findings, each ``{"kind", "severity", "task", "feature", "value", "message"}``
with severity ``info``, ``warning`` or ``error``:

- ``leakage``: a feature that alone predicts a task's label almost perfectly (a label copy or a
  label-derived column such as ctcvr left among the inputs). Every feature is reduced to buckets
  (its hash bucket as the featurizer computes it; QUANTILE_BINS quantile bins for a dense
  feature; a multi-hot row scores the mean over its values), each bucket's smoothed label mean
  is fitted on **train** and scored on **val**: single-feature AUC for binary tasks, R^2 (of the
  task's transformed target, against the train mean) for regression. Out of sample, so an id
  column that merely memorises train rows does not look like a leak. ``error`` when AUC >=
  LEAK_AUC or R^2 >= LEAK_R2; the best feature of each task is reported as ``info``.
- ``label_correlation`` / ``correlation_shift``: the Pearson correlation (phi for two binary
  tasks) of each pair of tasks' labels over rows where both are labelled, per split, and a
  ``warning`` when val or test differs from train by at least SHIFT_MIN in r and the Fisher-z
  test gives |z| >= SHIFT_Z: a model that leans on one task to predict another learns a
  relation that does not hold where it is evaluated.
- ``labels`` / ``label_shift``: per task and split the rows, labelled rows, positive rate (binary)
  or mean (regression) and the share masked out; ``error`` for a task with no labelled train
  rows or a single class in train, ``warning`` for fewer than MIN_CLASS rows of a class in val
  or test, or a rate that moves by SHIFT_REL relative with a two-proportion |z| >= SHIFT_Z.
- ``temporal`` (when a time column is named, ``audit.time_column`` or ``--time-column``): the
  time range of each split; a ``warning`` when val or test rows are not later than the latest
  train row (a random split: offline metrics are optimistic for a model served on future
  traffic), when time values are missing, or when a task's label rate drifts over train time
  (TIME_BINS equal-width bins; a bin's rate off the overall by SHIFT_REL relative with
  |z| >= SHIFT_Z).

Memory is bounded: Parquet is read record batch by record batch with column projection, every
statistic is a running sum, and the only sample kept is DENSE_SAMPLE values per dense feature
(for the quantile edges). Four passes: dense sample, train, val, test.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranker.config import DataConfig, FeatureSpec, RankerConfig, TaskSpec
from ranker.errors import RankerError
from ranker.features import MISSING, Featurizer, _dense_values, bucket_values
from ranker.training.data import ParquetSource, extract_labels, label_columns, label_values
from ranker.training.sources import source_groups

LEAK_AUC = 0.995  # single-feature val AUC at or above this: the feature all but gives the label away
LEAK_R2 = 0.95  # single-feature val R^2 at or above this (regression)
SHIFT_MIN = 0.10  # |r_split - r_train| at least this ...
SHIFT_Z = 4.0  # ... and significant at this |z| (p ~ 6e-5 two-sided) to be a shift
SHIFT_REL = 0.25  # relative change of a rate that counts as a shift
MIN_CLASS = 30  # fewer rows of a class than this in val/test: AUC on it is noise
QUANTILE_BINS = 32
DENSE_SAMPLE = 100_000
MAX_BUCKETS = 1 << 18  # hash buckets per categorical feature for the audit (the config's, capped)
TIME_BINS = 10
SMOOTHING = 20.0  # pseudo-rows of the prior in each bucket's label mean
_SCORE_BINS, _LOGIT_RANGE = 4096, 12.0  # binary scores are histogrammed on the logit scale
SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str  # info | warning | error
    task: str | None
    feature: str | None
    value: float | None
    message: str


def thresholds() -> dict[str, float]:
    return {"leak_auc": LEAK_AUC, "leak_r2": LEAK_R2, "shift_min": SHIFT_MIN, "shift_z": SHIFT_Z,
            "shift_rel": SHIFT_REL, "min_class": MIN_CLASS}


# ----- per-split label statistics -------------------------------------------------------------
class _LabelStats:
    """Running label counts per task and pairwise moments per pair of tasks, for one split."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = list(tasks)
        self.rows = 0
        self.n = {t.name: 0 for t in tasks}  # labelled rows
        self.s = {t.name: 0.0 for t in tasks}  # sum of (transformed) labels
        self.masked = {t.name: 0 for t in tasks}
        self.pairs = {(a.name, b.name): np.zeros(6) for a, b in combinations(tasks, 2)}  # n, sx, sy, sxx, syy, sxy

    def update(self, y: dict[str, np.ndarray], masked: dict[str, np.ndarray]) -> None:
        self.rows += len(next(iter(y.values())))
        for t in self.tasks:
            v = y[t.name]
            ok = ~np.isnan(v)
            self.n[t.name] += int(ok.sum())
            self.s[t.name] += float(v[ok].sum())
            self.masked[t.name] += int(masked[t.name].sum())
        for (a, b), acc in self.pairs.items():
            ok = ~np.isnan(y[a]) & ~np.isnan(y[b])
            x, z = y[a][ok].astype(np.float64), y[b][ok].astype(np.float64)
            acc += [ok.sum(), x.sum(), z.sum(), (x * x).sum(), (z * z).sum(), (x * z).sum()]

    def corr(self, a: str, b: str) -> tuple[float, int]:
        n, sx, sy, sxx, syy, sxy = self.pairs[(a, b)]
        if n < 3:
            return float("nan"), int(n)
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        if vx <= 1e-12 * max(n, 1) or vy <= 1e-12 * max(n, 1):
            return float("nan"), int(n)  # a constant label on the shared rows (e.g. ctr where cvr is labelled)
        return float((sxy - sx * sy / n) / math.sqrt(vx * vy)), int(n)


def _task_values(rb: pa.RecordBatch, tasks: Sequence[TaskSpec], where: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """{task: (B,) float64 label, transformed as the model learns it; NaN = not labelled} and
    {task: (B,) bool masked out by the task's mask column}."""
    labels = extract_labels(rb, tasks, where)
    y, masked = {}, {}
    for t in tasks:
        v = labels[f"label:{t.name}"].numpy().astype(np.float64)
        if t.type == "regression" and t.transform == "log1p":
            v = np.log1p(np.clip(v, 0, None))
        y[t.name] = v
        if t.mask:
            m = label_values(rb.column(t.mask), where, t.mask)
            masked[t.name] = m != 1
        else:
            masked[t.name] = np.zeros(len(v), dtype=bool)
    return y, masked


# ----- single-feature predictors --------------------------------------------------------------
class _FeatureBuckets:
    """Maps a record batch's feature column to bucket ids: (B,) for categorical/dense, or
    (flat values, row index) for multi-hot."""

    def __init__(self, f: FeatureSpec, kind: str | None, edges: np.ndarray | None) -> None:
        self.f, self.kind, self.edges = f, kind, edges
        if f.type == "dense":
            assert edges is not None
            self.size = len(edges) + 2  # 0 = missing, then one per quantile bin
        else:
            self.size = min(int(f.buckets or 1), MAX_BUCKETS) + 1  # 0 = missing

    def __call__(self, rb: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray | None]:
        col = rb.column(self.f.source)
        if self.f.type == "dense":
            x = _dense_values(col, self.f.transform)
            ids = np.searchsorted(self.edges, x, side="right") + 1  # type: ignore[arg-type]
            ids[np.isnan(x)] = MISSING
            return ids, None
        buckets = self.size - 1
        if self.f.type == "categorical":
            return bucket_values([col], [self.kind], [buckets])[0], None  # type: ignore[list-item]
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = bucket_values([pc.list_flatten(col)], [self.kind], [buckets])[0]  # type: ignore[list-item]
        rows = np.repeat(np.arange(len(lengths)), lengths)
        empty = np.flatnonzero(lengths == 0)  # a null or empty list: one MISSING value
        return np.concatenate([values, np.full(len(empty), MISSING)]), np.concatenate([rows, empty])


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from score histograms (ties within a bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


class _Predictor:
    """Per feature and task: bucket label sums on train, then the val score's quality."""

    def __init__(self, size: int, task: TaskSpec) -> None:
        self.binary = task.type == "binary"
        self.n, self.s = np.zeros(size), np.zeros(size)
        self.hist_pos, self.hist_neg = np.zeros(_SCORE_BINS), np.zeros(_SCORE_BINS)
        self.sse = self.sst = 0.0
        self.prior = 0.0
        self.table: np.ndarray | None = None

    def fit_update(self, ids: np.ndarray, rows: np.ndarray | None, y: np.ndarray) -> None:
        yy = y if rows is None else y[rows]
        ok = ~np.isnan(yy)
        self.n += np.bincount(ids[ok], minlength=len(self.n))
        self.s += np.bincount(ids[ok], weights=yy[ok], minlength=len(self.n))

    def freeze(self, prior: float) -> None:
        self.prior = prior
        self.table = (self.s + SMOOTHING * prior) / (self.n + SMOOTHING)  # smoothed bucket means

    def score_update(self, ids: np.ndarray, rows: np.ndarray | None, y: np.ndarray) -> None:
        assert self.table is not None
        if rows is None:
            score = self.table[ids]
        else:  # multi-hot: mean over the row's values
            score = np.bincount(rows, weights=self.table[ids], minlength=len(y)) / np.maximum(np.bincount(rows, minlength=len(y)), 1)
        ok = ~np.isnan(y)
        score, yy = score[ok], y[ok]
        if self.binary:
            p = np.clip(score, 1e-9, 1 - 1e-9)
            logit = np.clip(np.log(p / (1 - p)), -_LOGIT_RANGE, _LOGIT_RANGE)
            b = np.minimum(((logit + _LOGIT_RANGE) / (2 * _LOGIT_RANGE) * _SCORE_BINS).astype(np.int64), _SCORE_BINS - 1)
            self.hist_pos += np.bincount(b, weights=yy, minlength=_SCORE_BINS)
            self.hist_neg += np.bincount(b, weights=1 - yy, minlength=_SCORE_BINS)
        else:
            self.sse += float(((yy - score) ** 2).sum())
            self.sst += float(((yy - self.prior) ** 2).sum())

    def quality(self) -> float:
        if self.binary:
            return _auc_from_hist(self.hist_pos, self.hist_neg)
        return 1.0 - self.sse / self.sst if self.sst > 0 else float("nan")


# ----- time -----------------------------------------------------------------------------------
_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


def _time_values(rb: pa.RecordBatch, column: str, where: str) -> np.ndarray:
    """The time column as float64: seconds since the epoch for timestamps and dates (any unit
    or time zone; ns values lie past 2**53, so they are scaled, not cast), the value itself for
    numbers; NaN where missing."""
    col = rb.column(column)
    t = col.type
    if pa.types.is_date(t):
        col, scale = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64()), 1
    elif pa.types.is_timestamp(t):
        col, scale = pc.cast(col, pa.int64()), _PER_SECOND[t.unit]
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        scale = 1
    else:
        raise RankerError(f"{where}: time column {column!r} has type {t}; it must be a timestamp, date or number")
    x = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False) / scale
    return np.where(np.isfinite(x), x, np.nan)


def _time_text(x: float, is_time: bool) -> str:
    """A time value for a message: UTC date-time for timestamps and dates, else the number."""
    if is_time:
        return datetime.datetime.fromtimestamp(x, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{x:.12g}"


class _TimeStats:
    def __init__(self) -> None:
        self.lo, self.hi, self.nulls, self.rows = math.inf, -math.inf, 0, 0
        self.before = 0  # rows earlier than a reference time (set for val/test)

    def update(self, x: np.ndarray, ref: float | None = None) -> None:
        ok = ~np.isnan(x)
        self.rows += len(x)
        self.nulls += int((~ok).sum())
        if ok.any():
            self.lo, self.hi = min(self.lo, float(x[ok].min())), max(self.hi, float(x[ok].max()))
            if ref is not None:
                self.before += int((x[ok] < ref).sum())


# ----- the audit --------------------------------------------------------------------------------
def _sources(cfg: RankerConfig, key: str, d: DataConfig, tasks: list[TaskSpec], time_column: str | None) -> dict[str, ParquetSource]:
    cols = [f.source for f in cfg.features] + label_columns(tasks) + ([time_column] if time_column else [])
    out = {"train": ParquetSource(d.train, f"{key}.train", cols), "val": ParquetSource(d.val, f"{key}.val", cols)}
    if d.test:
        out["test"] = ParquetSource(d.test, f"{key}.test", cols)
    return out


def _dense_edges(src: ParquetSource, dense: list[FeatureSpec]) -> dict[str, np.ndarray]:
    """Quantile bin edges per dense feature from an even sample of at most DENSE_SAMPLE rows."""
    if not dense:
        return {}
    keep = min(1.0, DENSE_SAMPLE / max(src.num_rows, 1))
    rng = np.random.default_rng(0)
    sample: dict[str, list[np.ndarray]] = {f.name: [] for f in dense}
    for _, rb in src.batches(list(dict.fromkeys(f.source for f in dense))):
        pick = rng.random(rb.num_rows) < keep
        for f in dense:
            x = _dense_values(rb.column(f.source), f.transform)[pick]
            sample[f.name].append(x[~np.isnan(x)])
    edges = {}
    for f in dense:
        x = np.concatenate(sample[f.name]) if sample[f.name] else np.zeros(0)
        qs = np.quantile(x, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1]) if len(x) else np.zeros(0)
        edges[f.name] = np.unique(qs)  # ties (few distinct values) merge bins
    return edges


def audit(cfg: RankerConfig, time_column: str | None = None) -> list[Finding]:
    """Run every check; returns the findings, errors first.

    Args:
        cfg: the validated config (its data, features and tasks).
        time_column: a column of event times (timestamp, date or number), for the temporal checks.

    Example:
        >>> from ranker.config import load_config
        >>> findings = audit(load_config("/tmp/synth/config.yaml"))  # doctest: +SKIP
        >>> [f for f in findings if f.severity == "error"]  # doctest: +SKIP
        []
    """
    findings = []
    for key, data, tasks in source_groups(cfg):  # tasks with their own logs: audited on those
        findings += _audit_source(cfg, key, data, tasks, time_column)
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    return sorted(findings, key=lambda f: order[f.severity])


def _audit_source(cfg: RankerConfig, key: str, data: DataConfig, tasks: list[TaskSpec], time_column: str | None) -> list[Finding]:
    srcs = _sources(cfg, key, data, tasks, time_column)
    train = srcs["train"]
    assert train.schema is not None
    kinds = Featurizer.check_schema(cfg.features, train.schema, str(train.files[0]))
    for src in srcs.values():
        src.check_files(Featurizer(cfg.features, kinds))
    if time_column:
        _time_values(pa.RecordBatch.from_pylist([], schema=pa.schema([train.schema.field(time_column)])), time_column, str(train.files[0]))
    edges = _dense_edges(train, [f for f in cfg.features if f.type == "dense"])
    fb = {f.name: _FeatureBuckets(f, kinds.get(f.name), edges.get(f.name)) for f in cfg.features}
    pred = {(f.name, t.name): _Predictor(fb[f.name].size, t) for f in cfg.features for t in tasks}
    cols = list(dict.fromkeys([f.source for f in cfg.features] + label_columns(tasks) + ([time_column] if time_column else [])))

    stats = {name: _LabelStats(tasks) for name in srcs}
    times = {name: _TimeStats() for name in srcs}
    # temporal drift: train time range first (a cheap pass over one column)
    t_lo = t_hi = None
    if time_column:
        for f, rb in train.batches([time_column]):
            times["train"].update(_time_values(rb, time_column, str(f)))
        t_lo, t_hi = times["train"].lo, times["train"].hi
        times["train"] = _TimeStats()
    drift_n = {t.name: np.zeros(TIME_BINS) for t in tasks}
    drift_s = {t.name: np.zeros(TIME_BINS) for t in tasks}

    for split, src in srcs.items():
        for f, rb in src.batches(cols):
            where = str(f)
            y, masked = _task_values(rb, tasks, where)
            stats[split].update(y, masked)
            if time_column:
                tv = _time_values(rb, time_column, where)
                times[split].update(tv, None if split == "train" else _finite_or_none(t_hi))
                if split == "train" and t_lo is not None and t_hi is not None and math.isfinite(t_lo) and t_hi > t_lo:
                    ok = ~np.isnan(tv)
                    b = np.minimum(((tv[ok] - t_lo) / (t_hi - t_lo) * TIME_BINS).astype(np.int64), TIME_BINS - 1)
                    for t in tasks:
                        v = y[t.name][ok]
                        lab = ~np.isnan(v)
                        drift_n[t.name] += np.bincount(b[lab], minlength=TIME_BINS)
                        drift_s[t.name] += np.bincount(b[lab], weights=v[lab], minlength=TIME_BINS)
            if split == "test":
                continue
            for feat in cfg.features:
                ids, rows = fb[feat.name](rb)
                for t in tasks:
                    p = pred[(feat.name, t.name)]
                    (p.fit_update if split == "train" else p.score_update)(ids, rows, y[t.name])
        if split == "train":
            for (_, tname), p in pred.items():
                n = stats["train"].n[tname]
                p.freeze(stats["train"].s[tname] / n if n else 0.0)

    findings = _label_findings(tasks, stats) + _leak_findings(cfg, tasks, pred, stats) + _corr_findings(tasks, stats)
    if time_column:
        t = train.schema.field(time_column).type
        findings += _time_findings(time_column, tasks, times, drift_n, drift_s, pa.types.is_timestamp(t) or pa.types.is_date(t))
    return findings


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _rate_z(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two-proportion z statistic (pooled)."""
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n1 + 1 / n2))
    return (p2 - p1) / se


def _label_findings(tasks: list[TaskSpec], stats: dict[str, _LabelStats]) -> list[Finding]:
    out = []
    tr = stats["train"]
    for t in tasks:
        kind_of = "positive rate" if t.type == "binary" else "mean" + (" log1p" if t.transform == "log1p" else "")
        parts = []
        for split, st in stats.items():
            n = st.n[t.name]
            rate = st.s[t.name] / n if n else float("nan")
            parts.append(f"{split}: {n:,} labelled of {st.rows:,}, {kind_of} {rate:.4g}, masked {st.masked[t.name] / max(st.rows, 1):.1%}")
        n_tr = tr.n[t.name]
        rate_tr = tr.s[t.name] / n_tr if n_tr else float("nan")
        out.append(Finding("labels", "info", t.name, None, rate_tr, "; ".join(parts)))
        if n_tr == 0:
            out.append(Finding("labels", "error", t.name, None, 0.0, f"task {t.name!r} has no labelled rows in train"))
            continue
        if t.type != "binary":
            continue
        pos_tr = tr.s[t.name]
        if pos_tr == 0 or pos_tr == n_tr:
            out.append(Finding("labels", "error", t.name, None, rate_tr, f"task {t.name!r} has a single class in train ({int(pos_tr):,} positives of {n_tr:,})"))
            continue
        for split, st in stats.items():
            if split == "train" or not st.n[t.name]:
                continue
            n, pos = st.n[t.name], st.s[t.name]
            if min(pos, n - pos) < MIN_CLASS:
                out.append(Finding("labels", "warning", t.name, None, float(min(pos, n - pos)),
                                   f"{split}: only {int(min(pos, n - pos))} rows of the rarer class for {t.name!r}; its AUC is noise"))
            rate = pos / n
            z = _rate_z(rate_tr, n_tr, rate, n)
            if abs(rate - rate_tr) >= SHIFT_REL * rate_tr and abs(z) >= SHIFT_Z:
                out.append(Finding("label_shift", "warning", t.name, None, rate,
                                   f"{split} positive rate {rate:.4g} vs train {rate_tr:.4g} (z {z:+.1f})"))
    return out


def _leak_findings(cfg: RankerConfig, tasks: list[TaskSpec], pred: dict, stats: dict[str, _LabelStats]) -> list[Finding]:
    out = []
    for t in tasks:
        if not stats["val"].n[t.name]:
            continue
        metric, limit = ("AUC", LEAK_AUC) if t.type == "binary" else ("R^2", LEAK_R2)
        scored = [(f.name, pred[(f.name, t.name)].quality()) for f in cfg.features]
        scored = [(n, q) for n, q in scored if math.isfinite(q)]
        for name, q in scored:
            if q >= limit:
                out.append(Finding("leakage", "error", t.name, name, q,
                                   f"feature {name!r} alone predicts task {t.name!r} with val {metric} {q:.4f} >= {limit}: "
                                   "a label or label-derived column among the inputs?"))
        if scored:
            name, q = max(scored, key=lambda s: s[1])
            out.append(Finding("leakage", "info", t.name, name, q,
                               f"strongest single feature for {t.name!r}: {name!r}, val {metric} {q:.4f} (leak threshold {limit})"))
    return out


def _corr_findings(tasks: list[TaskSpec], stats: dict[str, _LabelStats]) -> list[Finding]:
    out = []
    for a, b in combinations([t.name for t in tasks], 2):
        r_tr, n_tr = stats["train"].corr(a, b)
        per = {s: st.corr(a, b) for s, st in stats.items()}
        text = ", ".join(f"{s} {r:+.3f} (n={n:,})" if math.isfinite(r) else f"{s} n/a (n={n:,})" for s, (r, n) in per.items())
        out.append(Finding("label_correlation", "info", f"{a},{b}", None, r_tr if math.isfinite(r_tr) else None,
                           f"label correlation {a}/{b}: {text}"))
        if not math.isfinite(r_tr) or n_tr < 4:
            continue
        for s, (r, n) in per.items():
            if s == "train" or not math.isfinite(r) or n < 4:
                continue
            z = (math.atanh(max(min(r, 0.999999), -0.999999)) - math.atanh(max(min(r_tr, 0.999999), -0.999999))) / math.sqrt(1 / (n - 3) + 1 / (n_tr - 3))
            if abs(r - r_tr) >= SHIFT_MIN and abs(z) >= SHIFT_Z:
                out.append(Finding("correlation_shift", "warning", f"{a},{b}", None, r - r_tr,
                                   f"label correlation {a}/{b} is {r:+.3f} on {s} vs {r_tr:+.3f} on train (Fisher z {z:+.1f}): "
                                   "what one task says about the other does not carry over"))
    return out


def _time_findings(col: str, tasks: list[TaskSpec], times: dict[str, _TimeStats], drift_n: dict, drift_s: dict,
                   is_time: bool = False) -> list[Finding]:
    out = []
    tr = times["train"]
    for split, ts in times.items():
        span = f"{_time_text(ts.lo, is_time)} .. {_time_text(ts.hi, is_time)}" if math.isfinite(ts.lo) else "no values"
        out.append(Finding("temporal", "info", None, col, None, f"{split}: {col} {span}, {ts.nulls:,} missing of {ts.rows:,}"))
        if ts.nulls:
            out.append(Finding("temporal", "warning", None, col, ts.nulls / max(ts.rows, 1),
                               f"{split}: {ts.nulls / max(ts.rows, 1):.1%} of rows have no {col}"))
        if split != "train" and ts.rows > ts.nulls and math.isfinite(tr.hi):
            share = ts.before / (ts.rows - ts.nulls)
            if share > 0:
                out.append(Finding("temporal", "warning", None, col, share,
                                   f"{split}: {share:.1%} of rows are earlier than the latest train row ({_time_text(tr.hi, is_time)}): not a "
                                   "temporal split, so offline metrics are optimistic for a model served on later traffic"))
    for t in tasks:
        n, s = drift_n[t.name], drift_s[t.name]
        if t.type != "binary" or n.sum() == 0:
            continue
        p = s.sum() / n.sum()
        worst = None
        for b in range(TIME_BINS):
            if n[b] < MIN_CLASS or p <= 0 or p >= 1:
                continue
            rate = s[b] / n[b]
            z = (rate - p) / math.sqrt(p * (1 - p) / n[b])
            if abs(rate - p) >= SHIFT_REL * p and abs(z) >= SHIFT_Z and (worst is None or abs(z) > abs(worst[1])):
                worst = (b, z, rate)
        if worst is not None:
            b, z, rate = worst
            out.append(Finding("temporal", "warning", t.name, col, rate,
                               f"{t.name!r} positive rate drifts over train time: {rate:.4g} in time bin {b + 1}/{TIME_BINS} vs "
                               f"{p:.4g} overall (z {z:+.1f})"))
    return out


# ----- output ---------------------------------------------------------------------------------------
def to_json(findings: Sequence[Finding]) -> dict:
    def clean(d: dict) -> dict:
        v = d["value"]
        return {**d, "value": v if v is None or math.isfinite(v) else None}

    return {"findings": [clean(asdict(f)) for f in findings], "thresholds": thresholds()}


def render_table(findings: Sequence[Finding]) -> str:
    """A plain-text table, errors first; then the thresholds in force."""
    head = ("severity", "kind", "task", "feature", "value", "message")
    rows = [(f.severity, f.kind, f.task or "", f.feature or "", "" if f.value is None else f"{f.value:.4g}", f.message) for f in findings]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:-1], widths, strict=True)) + "  message"]
    lines.append("  ".join("-" * w for w in widths) + "  -------")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append("")
    lines.append(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")
    lines.append(f"thresholds: leak if single-feature val AUC >= {LEAK_AUC} or R^2 >= {LEAK_R2}; shifts need |z| >= {SHIFT_Z} "
                 f"and |delta r| >= {SHIFT_MIN} (correlations) or {SHIFT_REL:.0%} relative (rates)")
    return "\n".join(lines)
