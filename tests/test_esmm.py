"""ESMM: pCTCVR = pCTR x pCVR over every impression, cvr learned without a loss of its own, on a
tiny log where conversion is only recorded for clicked rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from ranker.bundle import load_bundle
from ranker.config import load_config, parse_config
from ranker.errors import RankerError
from ranker.model import MultiTaskRanker
from ranker.model.esmm import product_logit
from ranker.training.data import extract_labels
from ranker.training.metrics import auc
from ranker.training.trainer import Trainer

TASKS = [
    {"name": "ctr", "type": "binary", "label": "click"},
    # evaluated on clicked rows (its mask), trained only through ctcvr
    {"name": "cvr", "type": "binary", "label": "conversion", "mask": "click", "loss": False},
    {"name": "ctcvr", "type": "binary", "product": ["ctr", "cvr"]},
]


def _table(n: int, seed: int) -> pa.Table:
    """Click depends on the user; conversion (given a click) on the category, and is null
    (never observed) on rows without a click."""
    rng = np.random.default_rng(seed)
    user, cat = rng.integers(0, 50, n), rng.integers(0, 8, n)
    click = rng.random(n) < 1 / (1 + np.exp(-(np.sin(user * 1.3) * 2 - 0.5)))
    conv = rng.random(n) < 1 / (1 + np.exp(-((cat % 4) * 1.5 - 2.0)))
    return pa.table({
        "user_id": pa.array(user, pa.int64()),
        "category": pa.array([f"c{c}" for c in cat]),
        "click": pa.array(click.astype(np.int64)),
        "conversion": pa.array(conv.astype(np.int64), mask=~click),
    })


@pytest.fixture(scope="module")
def esmm_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("esmm")
    for i, (split, n) in enumerate({"train": 6000, "val": 3000}.items()):
        (root / split).mkdir()
        pq.write_table(_table(n, i), root / split / "part-0.parquet")
    cfg = {
        "data": {"train": "train", "val": "val"},
        "features": [
            {"name": "user_id", "type": "categorical", "buckets": 200, "dim": 8},
            {"name": "category", "type": "categorical", "buckets": 30, "dim": 4},
        ],
        "tasks": TASKS,
        "model": {"architecture": "mmoe", "experts": 2, "expert_dims": [16], "tower_dims": [8]},
        "train": {"batch_size": 256, "epochs": 4, "lr": 0.01, "weighting": "static", "threads": 1,
                  "progress": False, "patience": 4, "diagnostics_batches": 1},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "config.yaml"


@pytest.fixture(scope="module")
def trained(esmm_config: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = load_config(esmm_config)
    out = tmp_path_factory.mktemp("esmm_bundle") / "b"
    return cfg, Trainer(cfg, progress=False, log=lambda s: None).run(out)


@pytest.mark.parametrize("a", [-30.0, -3.0, 0.0, 2.0, 30.0])
@pytest.mark.parametrize("b", [-30.0, -1.0, 0.5, 30.0])
def test_product_logit_is_the_logit_of_the_product(a: float, b: float) -> None:
    x, y = torch.tensor([a], dtype=torch.float64, requires_grad=True), torch.tensor([b], dtype=torch.float64)
    out = product_logit([x, y])
    assert torch.allclose(torch.sigmoid(out), torch.sigmoid(x) * torch.sigmoid(y), rtol=1e-6, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_a_saturated_product_keeps_its_loss_and_gradient() -> None:
    """Both factors' logits at 15 (p = 1 - 6e-7): a clamp of log p at -1e-6 gave a label-0 row
    the loss 13.82 instead of 14.31 and no gradient, so it could never be corrected."""
    a, b = (torch.tensor([15.0], dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss = F.binary_cross_entropy_with_logits(product_logit([a, b]), torch.zeros(1, dtype=torch.float64))
    loss.backward()
    p = torch.sigmoid(torch.tensor(15.0, dtype=torch.float64)) ** 2
    assert loss.item() == pytest.approx(-math.log1p(-p.item()), rel=1e-9)
    assert a.grad.item() == pytest.approx(0.5, rel=1e-5) and b.grad.item() == pytest.approx(0.5, rel=1e-5)
    three = [torch.tensor([v], dtype=torch.float64) for v in (1.0, -2.0, 20.0)]  # three factors, exact too
    want = torch.sigmoid(three[0]) * torch.sigmoid(three[1]) * torch.sigmoid(three[2])
    assert torch.allclose(torch.sigmoid(product_logit(three)), want, rtol=1e-12, atol=0)


def test_ctcvr_label_is_click_times_conversion_on_every_row() -> None:
    cfg = parse_config({"data": {"train": "x", "val": "y"}, "features": [{"name": "user_id", "type": "dense"}], "tasks": TASKS})
    rb = pa.RecordBatch.from_pydict({
        "click": pa.array([0, 0, 1, 1], pa.int64()),
        "conversion": pa.array([None, 0, 1, 0], pa.int64()),  # unobserved without a click
    })
    labels = extract_labels(rb, cfg.tasks, "t")
    assert labels["label:ctcvr"].tolist() == [0.0, 0.0, 1.0, 0.0]  # defined on all rows
    cvr = labels["label:cvr"]
    assert torch.isnan(cvr[:2]).all() and cvr[2:].tolist() == [1.0, 0.0]  # cvr only on clicks


def test_forward_runs_what_a_dependent_head_needs_and_returns_what_was_asked() -> None:
    cfg = parse_config({"data": {"train": "x", "val": "y"}, "features": [{"name": "p", "type": "dense"}], "tasks": TASKS,
                        "model": {"architecture": "ple", "expert_dims": [8], "tower_dims": [4]}})
    torch.manual_seed(0)
    model = MultiTaskRanker(cfg.features, cfg.tasks, cfg.model).eval()
    batch = {"cat": torch.zeros(5, 0, dtype=torch.long), "dense": torch.randn(5, 1)}
    full = model.predict(batch)
    assert set(model(batch, ["cvr"])) == {"cvr"}
    only = model.predict(batch, ["ctcvr"])
    assert set(only) == {"ctcvr"}
    assert set(model.trunk.last_gates) == {"ctr", "cvr"}  # ctcvr has no gate or tower of its own
    assert torch.allclose(only["ctcvr"], full["ctr"] * full["cvr"], atol=1e-6)
    assert not any("ctcvr" in k for k in model.state_dict())


def test_esmm_trains_cvr_through_ctcvr_without_a_direct_loss(trained) -> None:
    cfg, res = trained
    for h in res.history:
        assert set(h["train_loss"]) == {"ctr", "ctcvr"}  # no cvr loss term, ever
        assert set(h["weights"]) == {"ctr", "ctcvr"}
    first, last = res.history[0]["train_loss"], res.history[-1]["train_loss"]
    assert last["ctcvr"] < first["ctcvr"]
    val = res.metrics["val"]
    assert val["ctcvr"]["count"] == 3000  # over the entire impression space
    assert val["cvr"]["count"] < 3000  # cvr is evaluated on clicked rows only
    assert val["cvr"]["auc"] > 0.65  # learned purely through pCTR x pCVR
    assert val["ctr"]["auc"] > 0.65


def test_esmm_bundle_round_trips_and_serves_any_head(trained, esmm_config: Path) -> None:
    _, res = trained
    b = load_bundle(res.bundle)
    batch = b.featurizer.transform(_table(64, 9))
    with torch.inference_mode():
        full = b.model.predict(batch)
        cvr = b.model.predict(batch, ["cvr"])
    assert set(cvr) == {"cvr"} and torch.allclose(cvr["cvr"], full["cvr"])
    assert torch.allclose(full["ctcvr"], full["ctr"] * full["cvr"], atol=1e-6)
    # a conversion rate learned on the whole space: scores differ by category, as the truth does
    cats = np.array(_table(64, 9)["category"].to_pylist())
    high = full["cvr"].numpy()[np.isin(cats, ["c3", "c7"])].mean()
    low = full["cvr"].numpy()[np.isin(cats, ["c0", "c4"])].mean()
    assert high > low
    assert auc(np.isin(cats, ["c3", "c7"]), full["cvr"].numpy()) > 0.7


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([TASKS[0], TASKS[1], {"name": "ctcvr", "type": "binary", "product": ["ctr", "cvx"]}], "product factor 'cvx'"),
        ([TASKS[0], {**TASKS[1], "loss": False}], "'loss: false' needs the task to be a factor"),
        ([TASKS[0], TASKS[1], {**TASKS[2], "label": "conversion"}], "takes no 'label' or 'mask'"),
        ([TASKS[0], TASKS[1], {**TASKS[2], "product": ["ctr"]}], "two or more distinct"),
        ([{"name": "ctr", "type": "binary"}], "needs a 'label' column"),
    ],
)
def test_esmm_config_errors_name_the_task(tasks: list[dict], message: str) -> None:
    raw = {"data": {"train": "x", "val": "y"}, "features": [{"name": "p", "type": "dense"}], "tasks": tasks}
    with pytest.raises(RankerError, match=message):
        parse_config(raw, "cfg.yaml")
