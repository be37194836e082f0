"""Fixtures for the serving tests: tiny Parquet logs and bundles trained on them for one epoch.

Independent of ``tests/conftest.py`` and of ``ranker.training.synth`` on purpose: the serving
tests need every feature shape the request parser handles, so the data has
- int64 ids above 2**53 (``user_id``; a pass through float64 would merge neighbours),
- a feature whose column differs from its name (``category`` reads ``item_category``),
- string and int64 multi-hot lists (``tags``, ``topic_ids``), with nulls and empty lists,
- dense features with nulls and a log1p transform.

Bundles are built once per process (``functools.cache``), whichever test module asks first.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tests.datagen import BIG, impressions
from tests.promhelpers import free_port

TASKS = ("ctr", "cvr", "watch")


def serving_table(n: int, seed: int) -> pa.Table:
    """Rows whose labels depend on user, category and price, so one epoch learns something."""
    rng = np.random.default_rng(seed)
    user, cat, price, click, conv, watch = impressions(rng, n, users=200, bias=-1.0)
    k = rng.integers(0, 5, n)
    tags = [None if j == 4 else [f"t{(u + i) % 40}" for i in range(j)] for u, j in zip(user, k, strict=True)]
    topics = [[int(BIG + (c * 7 + i) % 25) for i in range(j % 3)] for c, j in zip(cat, k, strict=True)]
    return pa.table(
        {
            # ids above 2**53 for a third of users, small ones for the rest
            "user_id": pa.array(np.where(user % 3 == 0, BIG + user, user + 1), pa.int64()),
            "item_category": pa.array([f"c{c}" for c in cat]),
            "device": pa.array(rng.choice(["ios", "android", "web"], n).tolist(), mask=rng.random(n) < 0.1),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "topic_ids": pa.array(topics, pa.list_(pa.int64())),
            "price": pa.array(price, mask=rng.random(n) < 0.05),
            "age_days": pa.array(rng.exponential(10.0, n)),
            "click": click,
            "conversion": conv,
            "watch_seconds": watch,
        }
    )


def serving_config(architecture: str = "mmoe", seed: int = 0) -> dict:
    return {
        "data": {"train": "train", "val": "val"},
        "features": [
            {"name": "user_id", "type": "categorical", "buckets": 500, "dim": 8},
            {"name": "category", "column": "item_category", "type": "categorical", "buckets": 50, "dim": 4},
            {"name": "device", "type": "categorical", "buckets": 8, "dim": 4},
            {"name": "tags", "type": "multi_hot", "buckets": 100, "dim": 4},
            {"name": "topic_ids", "type": "multi_hot", "buckets": 64, "dim": 4},
            {"name": "price", "type": "dense", "transform": "log1p"},
            {"name": "age_days", "type": "dense"},
        ],
        "tasks": [
            {"name": "ctr", "type": "binary", "label": "click"},
            {"name": "cvr", "type": "binary", "label": "conversion", "mask": "click"},
            {"name": "watch", "type": "regression", "label": "watch_seconds", "transform": "log1p"},
        ],
        "model": {"architecture": architecture, "experts": 4, "expert_dims": [32, 16], "tower_dims": [8]},
        "train": {"batch_size": 256, "epochs": 1, "lr": 0.005, "weighting": "static", "seed": seed, "progress": False},
    }


@dataclass(frozen=True)
class ServingData:
    root: Path
    config: Path
    val_file: Path  # the split the bundle's reference histograms come from


def write_serving_data(root: Path, rows: int = 3000, architecture: str = "mmoe", seed: int = 0) -> ServingData:
    for split, n, s in (("train", rows, seed), ("val", rows // 3, seed + 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(serving_table(n, s), root / split / "part-0.parquet")
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(serving_config(architecture, seed), sort_keys=False))
    return ServingData(root, cfg, root / "val" / "part-0.parquet")


def train_bundle(data: ServingData, out: Path) -> Path:
    from ranker.config import load_config
    from ranker.training.trainer import Trainer

    Trainer(load_config(data.config), progress=False, log=lambda _s: None).run(out)
    return out


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="ranker-serving-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def serving_data() -> ServingData:
    return write_serving_data(_root() / "data")


@functools.cache
def mmoe_bundle() -> Path:
    """The main test bundle: MMoE, trained one epoch on ``serving_data()``."""
    return train_bundle(serving_data(), _root() / "mmoe")


@functools.cache
def shared_bottom_bundle() -> Path:
    """A second, different bundle (another architecture and seed) for reload tests."""
    data = write_serving_data(_root() / "data_sb", rows=1500, architecture="shared_bottom", seed=1)
    return train_bundle(data, _root() / "shared_bottom")


@contextmanager
def ranker_serve(
    bundle: Path, log: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0, port: int | None = None
) -> Iterator[str]:
    """A real ``ranker serve`` process on a loopback port (``port``, or a free one); yields its
    base URL once /readyz answers 200, and stops it (Ctrl-C, then kill) on the way out. Output
    goes to ``log``."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ranker.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ranker serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ranker serve not ready after {timeout:.0f}s:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
