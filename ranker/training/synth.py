"""Synthetic impression logs with a hidden multi-task ground truth, plus a config to train on them.

The labels follow the synthetic recipe of the MMoE paper (Ma et al., KDD 2018, section 5.2),
grafted onto recommendation-shaped columns:

    z      = user latent + item/category/tag latents + projected dense features + device + noise
    x_k    = w_k . z       corr(x_j, x_k) = |P|, the task correlation (w_k whitened against Cov(z))
    s_k    = x_k + sum_i sin(alpha_i x_k + beta_i) + small noise   (negated for cvr when P < 0)
    click      ~ Bernoulli(sigmoid(a_ctr s_ctr + b_ctr))
    conversion ~ click * Bernoulli(sigmoid(a_cvr s_cvr + b_cvr))
    watch_seconds = exp(mu + sigma s_watch + noise)

b_ctr and b_cvr are solved on a seeded sample so that P(click) = 5% and P(conversion | click) =
10% whatever P is. The sin terms make the scores a mildly non-linear function of z, so the
empirical correlation of s_j and s_k tracks P closely but not exactly, as in the paper.

For P < 0 the conversion score is negated rather than its direction flipped: corr(s_ctr, s_cvr)
and corr(s_cvr, s_watch) are about P while corr(s_ctr, s_watch) is about |P|. That is the
"clickbait" regime in which engagement and conversion conflict; three tasks cannot all be
pairwise correlated below -1/2.

Every entity (user, item, category, tag, device) owns a latent vector drawn once from the seed, so
an id always means the same thing and a model can learn it from the columns. Users and items are
Zipf-skewed (a few heavy hitters and a long tail); about 10% of ids lie above 2**53 so that any
pass through float64 shows up as a changed id.

Position bias (``position_bias=True``, ``ranker synth --position-bias``): an old ranker shows
each impression at a ``position`` 1..10 from its own score, o = 0.5 s_ctr / sd + 2 promotion +
0.7 noise, where the promotion is a hidden boost per item category unrelated to relevance (the
old ranking favoured some categories for business reasons). A user examines position p with probability 1 / p
(the position-based click model), so in train and val

    click = examined * Bernoulli(sigmoid(a_ctr s_ctr + b_ctr))

while the test split is unbiased: its ``click`` is the relevance draw alone, as if every item
had been examined, so test AUC measures ranking by true relevance. A model that learns clicks
without knowing position credits promoted categories with the clicks their top slots earned; a
position-bias tower (``tasks[].bias_features: [position]``) takes that part of the logit.

Rows are generated in fixed blocks, each from its own seeded stream, and re-cut into files and
row groups, so the data depends only on (seed, rows, task_correlation), never on the file layout,
and memory is bounded by max(block, row_group_size) rows whatever ``rows`` is.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from ranker.config import parse_config
from ranker.errors import RankerError
from ranker.files import usual_mode

SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("item_category", pa.string()),
        ("device", pa.string()),
        ("item_tags", pa.list_(pa.string())),
        ("price", pa.float64()),
        ("item_age_days", pa.float64()),
        ("user_activity", pa.float64()),
        ("hour", pa.int64()),
        ("click", pa.int64()),
        ("conversion", pa.int64()),
        ("watch_seconds", pa.float64()),
    ]
)
POSITION_SCHEMA = SCHEMA.append(pa.field("position", pa.int64()))
TASKS = ("ctr", "cvr", "watch")
POSITIONS = 10  # slots of the old ranking
POSITION_ETA = 1.0  # P(examined) = (1 / position) ** POSITION_ETA: the position-based click model
PROMO_WEIGHT, OLD_RELEVANCE_WEIGHT, OLD_NOISE = 2.0, 0.5, 0.7
SPLITS = ("train", "val", "test")  # 80/10/10

N_USERS = 200_000
N_ITEMS = 50_000
N_CATEGORIES = 50
TAGS_PER_CATEGORY = 10  # each category has its own tag vocabulary, so tags and category agree
N_TAGS = N_CATEGORIES * TAGS_PER_CATEGORY
MAX_TAGS = 5
DEVICES = ("android", "ios", "web", "tv")
DEVICE_P = np.array([0.45, 0.35, 0.15, 0.05])
LATENT_DIM = 16
N_SIN = 3  # sinusoid terms per task score, as in the MMoE recipe

CTR_RATE = 0.05  # P(click)
CVR_RATE = 0.10  # P(conversion | click)
TASK_SCALE = 2.0  # c = |w_k|: keeps the linear part of s_k ahead of the bounded sin terms
# a: how sharply scores separate labels, which sets the best achievable AUC. cvr's is gentler:
# clicks already select high s_cvr when P is high, and a steep a made conversion near-certain there
LOGIT_SCALE_CTR, LOGIT_SCALE_CVR = 2.0, 1.0
WATCH_MU, WATCH_SIGMA, WATCH_NOISE = math.log(30.0), 0.6, 0.5
SCORE_NOISE = 0.1

DEVICE_NULL, PRICE_NULL, TAGS_NULL = 0.05, 0.03, 0.01
DEVICE_SWITCH = 0.15  # rows not on the user's usual device

# Share of Var(z) per source, per latent dimension. What the ids and columns explain is learnable;
# the noise share is not, and it is what keeps the tasks from being perfectly predictable.
VAR_USER, VAR_ITEM, VAR_CATEGORY, VAR_TAGS = 0.15, 0.15, 0.20, 0.10
VAR_DENSE, VAR_DEVICE, VAR_NOISE = 0.25, 0.05, 0.10

_BLOCK = 100_000  # rows generated at once: bounds memory, big enough to stay vectorised
_CALIBRATION_ROWS = 50_000
_OUTPUT_ENTRIES = {"config.yaml", "train", "val", "test"}
_HEADER = "# written by ranker.training.synth"  # config.yaml's first line: how a rerun knows its own output
_PART = re.compile(r"part-\d{5}\.parquet")


@dataclass(frozen=True)
class _World:
    """Everything fixed by the seed: entity tables and the hidden ground truth."""

    user_cdf: np.ndarray  # (N_USERS,) Zipf CDF over user rank
    user_ids: np.ndarray  # (N_USERS,) int64 id of each rank
    user_latent: np.ndarray  # (N_USERS, D)
    user_device: np.ndarray  # (N_USERS,) usual device index
    user_activity: np.ndarray  # (N_USERS,) float64 counts
    item_cdf: np.ndarray  # (N_ITEMS,)
    item_ids: np.ndarray  # (N_ITEMS,) int64
    item_latent: np.ndarray  # (N_ITEMS, D) item + its category + its tags
    item_category: pa.Array  # (N_ITEMS,) string
    item_tags: pa.Array  # (N_ITEMS,) list<string>, some null
    item_price: np.ndarray  # (N_ITEMS,) float64
    item_age: np.ndarray  # (N_ITEMS,) float64 days
    hour_cdf: np.ndarray  # (24,)
    device_latent: np.ndarray  # (len(DEVICES) + 1, D); last row = unknown device
    dense_proj: np.ndarray  # (5, D)
    dense_stats: np.ndarray  # (3, 2) mean and sd of log1p(price, age, activity)
    task_w: np.ndarray  # (D, 3) task vectors, columns in TASKS order; whitened by _calibrate
    task_sign: np.ndarray  # (3,) -1 for cvr when P < 0, else 1
    sin_alpha: np.ndarray  # (N_SIN,)
    sin_beta: np.ndarray  # (N_SIN,)
    bias: tuple[float, float] = (0.0, 0.0)  # b_ctr, b_cvr, solved to hit the target rates


def _zipf_cdf(n: int, a: float, offset: float) -> np.ndarray:
    """CDF of p(rank) ~ (rank + offset)^-a: Zipf-Mandelbrot. The offset keeps the top entity
    from taking a fifth of all traffic, which a pure Zipf(1.2) would."""
    cdf = np.cumsum((np.arange(n) + offset) ** -a)
    return cdf / cdf[-1]


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique scrambled int64 ids; ~10% sit above 2**53 and are odd, so float64 cannot hold them."""
    perm = rng.permutation(n).astype(np.int64)
    big = perm % 10 == 0
    return np.where(big, 2**53 + 1 + 2 * 7919 * perm, 1_000_003 + 7919 * perm)


def _task_vectors(rng: np.random.Generator, p: float) -> np.ndarray:
    """(D, 3) task vectors c (sqrt(|P|) u0 + sqrt(1 - |P|) u_k) with orthonormal u: pairwise
    cosine |P|. The sign of P is applied to the cvr score itself (``_World.task_sign``)."""
    u, _ = np.linalg.qr(rng.standard_normal((LATENT_DIM, 4)))  # (D, 4) orthonormal columns
    return TASK_SCALE * (math.sqrt(abs(p)) * u[:, :1] + math.sqrt(1.0 - abs(p)) * u[:, 1:])


def _build_world(seed: int, task_correlation: float) -> _World:
    rng = np.random.default_rng([seed, 0])
    d = LATENT_DIM

    def gauss(*shape: int, var: float) -> np.ndarray:
        return rng.standard_normal((*shape, d)) * math.sqrt(var)

    user_rank = np.arange(N_USERS)
    # heavy users are active users: activity falls with popularity rank, with a heavy tail
    log_act = 2.0 + 0.3 * np.log(N_USERS / (user_rank + 1)) + rng.standard_normal(N_USERS)
    user_activity = np.floor(np.exp(log_act)).astype(np.float64)

    category = rng.integers(0, N_CATEGORIES, N_ITEMS)
    # up to MAX_TAGS draws per item: 60% from its category's vocabulary, the rest from a
    # Zipf-popular global pool; duplicates collapse, so an item has 0..MAX_TAGS distinct tags
    home = category[:, None] * TAGS_PER_CATEGORY + rng.integers(
        0, TAGS_PER_CATEGORY, (N_ITEMS, MAX_TAGS)
    )
    pool = np.searchsorted(
        _zipf_cdf(N_TAGS, 1.0, 5.0), rng.random((N_ITEMS, MAX_TAGS)), side="right"
    )
    draws = np.sort(np.where(rng.random((N_ITEMS, MAX_TAGS)) < 0.6, home, pool), axis=1)
    n_draws = rng.integers(0, MAX_TAGS + 1, N_ITEMS)
    keep = np.arange(MAX_TAGS) < n_draws[:, None]
    keep[:, 1:] &= draws[:, 1:] != draws[:, :-1]
    n_tags = keep.sum(axis=1)
    flat_tags = draws[keep]  # row-major, so grouped by item
    tag_item = np.repeat(np.arange(N_ITEMS), n_tags)
    tag_sum = np.zeros((N_ITEMS, d))
    np.add.at(tag_sum, tag_item, gauss(N_TAGS, var=1.0)[flat_tags])
    tag_latent = tag_sum / np.sqrt(np.maximum(n_tags, 1))[:, None]  # unit variance per dim
    item_latent = (
        gauss(N_ITEMS, var=VAR_ITEM)
        + gauss(N_CATEGORIES, var=VAR_CATEGORY)[category]
        + math.sqrt(VAR_TAGS) * tag_latent
    )
    offsets = pa.array(np.concatenate([[0], np.cumsum(n_tags)]).astype(np.int32))
    tag_names = pa.array([f"tag_{t:03d}" for t in range(N_TAGS)])
    item_tags = pa.ListArray.from_arrays(
        offsets, tag_names.take(pa.array(flat_tags)), mask=pa.array(rng.random(N_ITEMS) < TAGS_NULL)
    )
    cat_names = pa.array([f"cat_{c:02d}" for c in range(N_CATEGORIES)])

    item_price = np.round(np.exp(rng.normal(3.0, 1.0, N_ITEMS)), 2)
    item_age = rng.exponential(60.0, N_ITEMS)
    hours = np.arange(24)
    hour_cdf = np.cumsum(np.exp(0.8 * np.cos(2 * np.pi * (hours - 20) / 24)))  # evening peak
    logs = [np.log1p(item_price), np.log1p(item_age), np.log1p(user_activity)]

    return _World(
        user_cdf=_zipf_cdf(N_USERS, 1.2, 50.0),
        user_ids=_ids(rng, N_USERS),
        user_latent=gauss(N_USERS, var=VAR_USER),
        user_device=rng.choice(len(DEVICES), N_USERS, p=DEVICE_P),
        user_activity=user_activity,
        item_cdf=_zipf_cdf(N_ITEMS, 1.2, 20.0),
        item_ids=_ids(rng, N_ITEMS),
        item_latent=item_latent,
        item_category=cat_names.take(pa.array(category)),
        item_tags=item_tags,
        item_price=item_price,
        item_age=item_age,
        hour_cdf=hour_cdf / hour_cdf[-1],
        device_latent=gauss(len(DEVICES) + 1, var=VAR_DEVICE),
        dense_proj=gauss(5, var=VAR_DENSE / 5),  # 5 unit-variance inputs -> VAR_DENSE per dim
        dense_stats=np.array([[v.mean(), v.std()] for v in logs]),
        task_w=_task_vectors(rng, task_correlation),
        task_sign=np.array([1.0, -1.0 if task_correlation < 0 else 1.0, 1.0]),
        sin_alpha=rng.uniform(0.2, 0.5, N_SIN),
        sin_beta=rng.uniform(-np.pi, np.pi, N_SIN),
    )


def _sample(w: _World, rng: np.random.Generator, n: int) -> tuple[list[pa.Array], np.ndarray, np.ndarray]:
    """n impressions: their feature columns (SCHEMA order, labels not included), latent z and
    item index."""
    user = np.searchsorted(w.user_cdf, rng.random(n), side="right")
    item = np.searchsorted(w.item_cdf, rng.random(n), side="right")
    hour = np.searchsorted(w.hour_cdf, rng.random(n), side="right")
    device = np.where(
        rng.random(n) < DEVICE_SWITCH, rng.choice(len(DEVICES), n, p=DEVICE_P), w.user_device[user]
    )
    device_null = rng.random(n) < DEVICE_NULL
    price = w.item_price[item] * np.exp(0.1 * rng.standard_normal(n))  # discounts, dynamic pricing
    price_null = rng.random(n) < PRICE_NULL
    age = w.item_age[item] + rng.uniform(0.0, 3.0, n)
    activity = w.user_activity[user]

    # what the model can observe, standardised; a missing price contributes nothing
    mu, sd = w.dense_stats[:, 0], w.dense_stats[:, 1]
    dense = np.stack(
        [
            np.where(price_null, 0.0, (np.log1p(price) - mu[0]) / sd[0]),
            (np.log1p(age) - mu[1]) / sd[1],
            (np.log1p(activity) - mu[2]) / sd[2],
            np.sqrt(2) * np.sin(2 * np.pi * hour / 24),
            np.sqrt(2) * np.cos(2 * np.pi * hour / 24),
        ],
        axis=1,
    )  # (n, 5)
    z = (
        w.user_latent[user]
        + w.item_latent[item]
        + dense @ w.dense_proj
        + w.device_latent[np.where(device_null, len(DEVICES), device)]
        + math.sqrt(VAR_NOISE) * rng.standard_normal((n, LATENT_DIM))
    )  # (n, D)
    columns = [
        pa.array(w.user_ids[user]),
        pa.array(w.item_ids[item]),
        w.item_category.take(pa.array(item)),
        pa.array(DEVICES).take(pa.array(device, mask=device_null)),
        w.item_tags.take(pa.array(item)),
        pa.array(np.round(price, 2), mask=price_null),
        pa.array(age),
        pa.array(activity),
        pa.array(hour.astype(np.int64)),
    ]
    return columns, z, item


def _scores(w: _World, rng: np.random.Generator, z: np.ndarray) -> dict[str, np.ndarray]:
    """The hidden task scores s_k of the MMoE recipe, from latent rows z (n, D)."""
    x = z @ w.task_w  # (n, 3)
    s = w.task_sign * (x + np.sin(x[:, :, None] * w.sin_alpha + w.sin_beta).sum(axis=2))
    s += SCORE_NOISE * rng.standard_normal(s.shape)
    return {t: s[:, k] for k, t in enumerate(TASKS)}


def _labels(w: _World, rng: np.random.Generator, s: dict[str, np.ndarray]) -> list[pa.Array]:
    """click, conversion and watch_seconds drawn from the scores."""
    n = len(s["ctr"])
    b_ctr, b_cvr = w.bias
    click = rng.random(n) < _sigmoid(LOGIT_SCALE_CTR * s["ctr"] + b_ctr)
    conversion = click & (rng.random(n) < _sigmoid(LOGIT_SCALE_CVR * s["cvr"] + b_cvr))
    watch = np.exp(WATCH_MU + WATCH_SIGMA * s["watch"] + WATCH_NOISE * rng.standard_normal(n))
    return [
        pa.array(click.astype(np.int64)),
        pa.array(conversion.astype(np.int64)),
        pa.array(np.round(watch, 3)),
    ]


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow warnings for large |v|


def _solve_bias(a: float, s: np.ndarray, weight: np.ndarray, rate: float) -> float:
    """b with sum(weight * sigmoid(a s + b)) / sum(weight) = rate, by bisection (monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.average(_sigmoid(a * s + mid), weights=weight) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _calibrate(w: _World, seed: int) -> _World:
    """Fit the ground truth to a seeded sample of rows:

    - whiten the task vectors against Cov(z), so that the linear parts x_k = w_k . z have
      variance c^2 and correlation exactly P (z is only roughly isotropic: a few category and
      device vectors and a rank-5 dense projection tilt it);
    - pick b_ctr and b_cvr so the click and conversion rates hit their targets whatever P is.
    """
    rng = np.random.default_rng([seed, 1])
    _, z, _ = _sample(w, rng, _CALIBRATION_ROWS)
    evals, evecs = np.linalg.eigh(np.cov(z, rowvar=False))
    w = replace(w, task_w=(evecs / np.sqrt(evals)) @ evecs.T @ w.task_w)  # Cov^-1/2 W
    s = _scores(w, rng, z)
    b_ctr = _solve_bias(LOGIT_SCALE_CTR, s["ctr"], np.ones(_CALIBRATION_ROWS), CTR_RATE)
    p_click = _sigmoid(LOGIT_SCALE_CTR * s["ctr"] + b_ctr)
    b_cvr = _solve_bias(LOGIT_SCALE_CVR, s["cvr"], p_click, CVR_RATE)
    return replace(w, bias=(b_ctr, b_cvr))


def _world(seed: int, task_correlation: float) -> _World:
    return _calibrate(_build_world(seed, task_correlation), seed)


def _hidden_scores(
    rows: int, seed: int = 0, task_correlation: float = 0.5
) -> dict[str, np.ndarray]:
    """Test hook: the ground-truth scores s_ctr, s_cvr, s_watch of one freshly sampled chunk."""
    w = _world(seed, task_correlation)
    rng = np.random.default_rng([seed, 2])
    return _scores(w, rng, _sample(w, rng, rows)[1])


def _test_truth(rows: int, seed: int = 0, task_correlation: float = 0.5) -> dict[str, np.ndarray]:
    """Benchmark hook: the hidden relevance logit and the logged position of every row of the
    test split ``write_synthetic(rows=rows, seed=seed, position_bias=True)`` writes, in its order."""
    w = _world(seed, float(task_correlation))
    n_test = rows - rows * 8 // 10 - rows // 10
    truth: list[np.ndarray] = []
    tables = list(_blocks(w, seed, SPLITS.index("test"), n_test, True, truth))
    return {
        "relevance_logit": np.concatenate(truth),
        "position": np.concatenate([t.column("position").to_numpy() for t in tables]),
        "click": np.concatenate([t.column("click").to_numpy() for t in tables]),
    }


def _item_promotion(w: _World, seed: int) -> np.ndarray:
    """(N_ITEMS,) the old ranker's hidden boost of each item's category; its own stream, so the
    rest of the world (and every default synth output) is unchanged by position bias."""
    per_category = np.random.default_rng([seed, 7]).standard_normal(N_CATEGORIES)
    category = np.array([int(c[len("cat_"):]) for c in w.item_category.to_pylist()])
    return per_category[category]


def examination(position: np.ndarray) -> np.ndarray:
    """P(a user looks at the slot) in the position-based click model: (1 / position) ** eta."""
    return np.asarray(position, dtype=np.float64) ** -POSITION_ETA


def _positions(rng: np.random.Generator, s_ctr: np.ndarray, promo: np.ndarray) -> np.ndarray:
    """Slot 1..POSITIONS of each impression in the old ranking: higher old score, higher slot."""
    o = OLD_RELEVANCE_WEIGHT * s_ctr / s_ctr.std() + PROMO_WEIGHT * promo + OLD_NOISE * rng.standard_normal(len(s_ctr))
    rank = np.argsort(np.argsort(-o)) / len(o)  # 0 = best old score in the block
    return 1 + np.floor(rank * POSITIONS).astype(np.int64)


def _blocks(
    w: _World, seed: int, split: int, n: int, position_bias: bool = False, truth: list | None = None
) -> Iterator[pa.Table]:
    """The split's rows in fixed blocks, each from its own stream: layout-independent data.
    ``truth``, if given, gets each block's hidden relevance logit of a click (benchmarks' oracle)."""
    promo = _item_promotion(w, seed) if position_bias else None
    for b, start in enumerate(range(0, n, _BLOCK)):
        rng = np.random.default_rng([seed, 3, split, b])
        features, z, item = _sample(w, rng, min(_BLOCK, n - start))
        s = _scores(w, rng, z)
        labels = _labels(w, rng, s)
        if truth is not None:
            truth.append(LOGIT_SCALE_CTR * s["ctr"] + w.bias[0])
        if promo is None:
            yield pa.Table.from_arrays(features + labels, schema=SCHEMA)
            continue
        position = _positions(rng, s["ctr"], promo[item])
        if SPLITS[split] != "test":  # logged clicks: only examined items can be clicked
            examined = rng.random(len(position)) < examination(position)
            click = labels[0].to_numpy() * examined
            labels = [pa.array(click), pa.array(labels[1].to_numpy() * examined), labels[2]]
        yield pa.Table.from_arrays(features + labels + [pa.array(position)], schema=POSITION_SCHEMA)


class _Rebatcher:
    """Cuts a stream of tables into tables of requested sizes (zero-copy slices)."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self._tables = tables
        self._buf: list[pa.Table] = []
        self._rows = 0

    def take(self, n: int) -> pa.Table:
        while self._rows < n:
            t = next(self._tables)
            self._buf.append(t)
            self._rows += t.num_rows
        whole = pa.concat_tables(self._buf)
        rest = whole.slice(n)
        self._buf, self._rows = ([rest] if rest.num_rows else []), self._rows - n
        return whole.slice(0, n)


def _write_split(
    blocks: Iterator[pa.Table],
    n: int,
    folder: Path,
    rows_per_file: int,
    row_group_size: int,
    bar: tqdm,
    schema: pa.Schema = SCHEMA,
) -> None:
    folder.mkdir()
    source = _Rebatcher(blocks)
    for f, start in enumerate(range(0, n, rows_per_file)):
        n_file = min(rows_per_file, n - start)
        with pq.ParquetWriter(folder / f"part-{f:05d}.parquet", schema) as writer:
            for g in range(0, n_file, row_group_size):
                group = source.take(min(row_group_size, n_file - g))
                writer.write_table(group, row_group_size=group.num_rows)
                bar.update(group.num_rows)


def _config(position_bias: bool = False) -> dict:
    cfg = _base_config()
    if position_bias:
        # 1,000 buckets: slots 1..10 land in 10 distinct buckets (at 16 two pairs would merge)
        cfg["features"].append({"name": "position", "type": "categorical", "buckets": 1000, "dim": 4})
        cfg["tasks"][0]["bias_features"] = ["position"]
    return cfg


def _base_config() -> dict:
    return {
        "data": {"train": "train", "val": "val", "test": "test"},
        "features": [
            {"name": "user_id", "type": "categorical", "buckets": 100_000, "dim": 16},
            {"name": "item_id", "type": "categorical", "buckets": 50_000, "dim": 16},
            {"name": "item_category", "type": "categorical", "buckets": 100, "dim": 8},
            {"name": "device", "type": "categorical", "buckets": 16, "dim": 4},
            {"name": "item_tags", "type": "multi_hot", "buckets": 1000, "dim": 8},
            {"name": "price", "type": "dense", "transform": "log1p"},
            {"name": "item_age_days", "type": "dense"},
            {"name": "user_activity", "type": "dense", "transform": "log1p"},
            {"name": "hour", "type": "categorical", "buckets": 24, "dim": 4},
        ],
        "tasks": [
            {"name": "ctr", "type": "binary", "label": "click"},
            {"name": "cvr", "type": "binary", "label": "conversion", "mask": "click"},
            {"name": "watch", "type": "regression", "label": "watch_seconds", "transform": "log1p"},
        ],
        "model": {
            "architecture": "mmoe",
            "experts": 8,
            "expert_dims": [128, 64],
            "tower_dims": [32],
        },
        "train": {
            "batch_size": 1024,
            "epochs": 3,
            "lr": 0.001,
            "weighting": "uncertainty",
            "seed": 0,
        },
    }


def _check_args(
    rows: int, seed: int, task_correlation: float, rows_per_file: int, row_group_size: int
) -> None:
    for name, value, least in (
        ("rows", rows, 100),
        ("seed", seed, 0),
        ("rows_per_file", rows_per_file, 1),
        ("row_group_size", row_group_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise RankerError(f"{name}: expected an integer, got {value!r}")
        if value < least:
            raise RankerError(f"{name}: must be at least {least}, got {value}")
    if (
        isinstance(task_correlation, bool)
        or not isinstance(task_correlation, (int, float))
        or not -1.0 <= task_correlation <= 1.0
    ):
        raise RankerError(
            f"task_correlation: must be a number in [-1, 1], got {task_correlation!r}"
        )


def _check_out_dir(out: Path) -> None:
    """Refuse to replace anything but an earlier synth output: ``--out .`` must not wipe a repo,
    nor a user's own ``config.yaml`` + ``train/val/test`` folder laid out as synth lays it out.
    A folder is synth's when its config carries synth's header line and its splits hold only
    synth's ``part-NNNNN.parquet`` files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RankerError(f"out_dir: {out} exists and is not a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUT_ENTRIES)
    config = out / "config.yaml"
    if not foreign and any(out.iterdir()):
        try:
            ours = config.is_file() and config.read_text(errors="replace").startswith(_HEADER)
        except OSError:
            ours = False
        if not ours:
            foreign = ["config.yaml (not written by ranker synth)" if config.exists() else "no config.yaml of ranker synth"]
        for split in SPLITS:
            d = out / split
            if d.is_dir():
                foreign += [f"{split}/{p.name}" for p in sorted(d.iterdir()) if not _PART.fullmatch(p.name)]
            elif d.exists():
                foreign.append(f"{split} (not a folder)")
    if foreign:
        raise RankerError(
            f"out_dir: {out} exists and holds {', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}, so it is not a synth output; refusing to replace it"
        )


def write_synthetic(
    out_dir: str | Path,
    rows: int = 200_000,
    seed: int = 0,
    task_correlation: float = 0.5,
    rows_per_file: int = 250_000,
    row_group_size: int = 50_000,
    progress: bool = False,
    position_bias: bool = False,
) -> Path:
    """Write train/val/test Parquet impression logs (80/10/10) and a matching config.yaml.

    Args:
        out_dir: folder to create; an earlier synth output there is replaced, only on success.
        rows: total rows over the three splits (at least 100).
        seed: the same seed and arguments give byte-identical files.
        task_correlation: cosine P between the hidden task directions, in [-1, 1]; see the
            module docstring for what P < 0 means.
        rows_per_file: the most rows in one Parquet file of a split.
        row_group_size: the most rows in one row group; memory grows with it, not with ``rows``.
        progress: show a tqdm bar over rows written.
        position_bias: add a ``position`` column from a biased old ranking; train/val clicks
            depend on it, test clicks are unbiased relevance (see the module docstring), and
            the config's ctr task gets a position-bias tower.

    Returns:
        The path of the written config.yaml (its data paths are relative to its folder).

    Example:
        >>> from ranker.config import load_config
        >>> cfg = write_synthetic("/tmp/synth", rows=10_000, seed=1)
        >>> load_config(cfg).data.train  # '/tmp/synth/train'
    """
    _check_args(rows, seed, task_correlation, rows_per_file, row_group_size)
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out)
    raw = _config(position_bias)
    parse_config(raw, "synth config")  # a schema drift fails here, before any data is written

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        usual_mode(tmp)
        w = _world(seed, float(task_correlation))
        n_train, n_val = rows * 8 // 10, rows // 10
        sizes = (n_train, n_val, rows - n_train - n_val)
        with tqdm(
            total=rows, unit="row", unit_scale=True, desc="synth", disable=not progress
        ) as bar:
            for k, (name, n) in enumerate(zip(SPLITS, sizes, strict=True)):
                _write_split(
                    _blocks(w, seed, k, n, position_bias), n, tmp / name, rows_per_file, row_group_size, bar,
                    POSITION_SCHEMA if position_bias else SCHEMA,
                )
        header = (
            f"{_HEADER}: rows={rows} seed={seed}"
            f" task_correlation={task_correlation}{' position_bias=true' if position_bias else ''}\n"
            "# data paths are relative to this file's folder\n"
        )
        (tmp / "config.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the earlier output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "config.yaml"
