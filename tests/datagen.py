"""Tiny labelled impression logs for tests: every feature kind, nulls, ids above 2^53."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

BIG = 2**60  # ids far above 2^53: float64 would merge neighbours


def impressions(rng: np.random.Generator, n: int, users: int, bias: float) -> tuple[np.ndarray, ...]:
    """(user, category index, price, click, conversion, watch seconds): labels depend on user,
    category and price, so a model can learn them; conversions only where clicked."""
    user = rng.integers(0, users, n)
    cat = rng.integers(0, 12, n)
    price = rng.lognormal(2.0, 1.0, n)
    effect = np.sin(user * 1.7) * 1.5
    logit = bias + effect + (cat % 3 - 1) * 1.0 + 0.4 * np.log(price)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    conv = (click * (rng.random(n) < 1 / (1 + np.exp(-(effect - 0.5))))).astype(np.int64)
    watch = np.exp(1.5 + 0.8 * effect + rng.normal(0, 0.5, n))
    return user, cat, price, click, conv, watch


def make_table(n: int, seed: int) -> pa.Table:
    """Every feature kind, with nulls; rows from ``impressions``."""
    rng = np.random.default_rng(seed)
    user, cat_idx, price, click, conv, watch = impressions(rng, n, users=300, bias=-1.5)
    tags = [None if k == 5 else [f"t{(u + j) % 40}" for j in range(k)] for u, k in zip(user, rng.integers(0, 6, n))]
    price_col = pa.array(np.where(rng.random(n) < 0.05, np.nan, price), mask=rng.random(n) < 0.05)
    return pa.table({
        "user_id": pa.array(BIG + user, pa.int64()),
        "category": pa.array([f"c{c}" for c in cat_idx], pa.string()),
        "device": pa.array(rng.choice(["ios", "android", "web"], n).tolist(), mask=rng.random(n) < 0.1),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "price": price_col,
        "click": click,
        "conversion": conv,
        "watch_seconds": watch,
    })


CONFIG = {
    "features": [
        {"name": "user_id", "type": "categorical", "buckets": 500, "dim": 8},
        {"name": "category", "type": "categorical", "buckets": 50, "dim": 4},
        {"name": "device", "type": "categorical", "buckets": 8, "dim": 4},
        {"name": "tags", "type": "multi_hot", "buckets": 100, "dim": 4},
        {"name": "price", "type": "dense", "transform": "log1p"},
    ],
    "tasks": [
        {"name": "ctr", "type": "binary", "label": "click"},
        {"name": "cvr", "type": "binary", "label": "conversion", "mask": "click"},
        {"name": "watch", "type": "regression", "label": "watch_seconds", "transform": "log1p"},
    ],
    "model": {"architecture": "mmoe", "experts": 4, "expert_dims": [32, 16], "tower_dims": [8]},
    "train": {"batch_size": 256, "epochs": 3, "lr": 0.005, "weighting": "uncertainty", "seed": 0, "progress": False},
}


def write_logs(root: Path, rows: int = 6000, seed: int = 0, **overrides: dict) -> Path:
    """train/ (two files), val/, test/ and config.yaml under ``root``; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": (rows, 2), "val": (rows // 4, 1), "test": (rows // 4, 1)}
    for i, (name, (n, files)) in enumerate(splits.items()):
        (root / name).mkdir(exist_ok=True)
        for j in range(files):
            pq.write_table(make_table(n // files, seed * 100 + i * 10 + j), root / name / f"part-{j}.parquet", row_group_size=1000)
    cfg = {"data": {"train": "train", "val": "val", "test": "test"}, **CONFIG}
    for key, val in overrides.items():
        cfg[key] = {**cfg[key], **val} if isinstance(cfg[key], dict) else val
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
