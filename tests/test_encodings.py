"""Numeric encodings: config resolution, the quantile sketch against exact quantiles, bin edges,
golden values, the embedding modules, a bundle round trip and serving parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ranker.bundle import MANIFEST, load_bundle
from ranker.config import (
    DEFAULT_BINS,
    DEFAULT_NUMERIC_DIM,
    FeatureSpec,
    ModelConfig,
    load_config,
    parse_config,
)
from ranker.encodings import QuantileSketch, bin_edges, bin_position
from ranker.features import Featurizer
from ranker.model.encoder import Encoder
from ranker.model.numeric import PeriodicEmbedding, PiecewiseLinearEmbedding
from ranker.serving import ServingSettings, create_app
from ranker.training.trainer import Trainer
from tests.datagen import write_logs


# ----------------------------------------------------------------------------- config
def test_default_encoding_needs_no_transform_and_old_key_keeps_its_meaning() -> None:
    plain = FeatureSpec(name="money", type="dense")
    assert plain.encoding == "piecewise_linear" and plain.bins == DEFAULT_BINS and plain.dim == DEFAULT_NUMERIC_DIM == 12 and plain.embedded
    old = FeatureSpec(name="money", type="dense", transform="log1p")
    assert old.encoding == "log1p" and old.dim is None and not old.embedded
    assert FeatureSpec(name="m", type="dense", transform="log1p", encoding="standard").encoding == "log1p"
    # a validated spec dumps with its encoding, so re-reading it gives the same feature
    assert FeatureSpec.model_validate(plain.model_dump()) == plain


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "dense", "transform": "log1p", "encoding": "periodic"}, r"features\[m\]: feature 'm': 'transform: log1p' is the older spelling"),
        ({"type": "dense", "encoding": "standard", "dim": 4}, r"'dim' and 'bins' apply to encodings"),
        ({"type": "dense", "encoding": "log1p", "bins": 8}, r"'dim' and 'bins' apply to encodings"),
        ({"type": "categorical", "buckets": 5, "dim": 2, "encoding": "standard"}, r"'encoding' and 'bins' apply to dense"),
        ({"type": "dense", "encoding": "quantile"}, r"features\[m\]\.encoding"),
        ({"type": "dense", "bins": 0}, r"features\[m\]\.bins"),
    ],
)
def test_bad_encoding_settings_name_the_feature(spec: dict, match: str) -> None:
    raw = {"data": {"train": "t", "val": "v"}, "features": [{"name": "m", **spec}], "tasks": [{"name": "y", "type": "binary", "label": "y"}]}
    with pytest.raises(Exception, match=match):
        parse_config(raw, "c.yaml")


# ----------------------------------------------------------------------------- sketch + edges
def test_sketch_quantiles_match_exact_within_rank_tolerance() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([np.zeros(150_000), rng.lognormal(6.0, 2.0, 150_000), rng.normal(-50, 5, 100_000)])
    rng.shuffle(x)
    sketch = QuantileSketch(k=2048)
    for chunk in np.array_split(x, 37):  # uneven streaming chunks
        sketch.update(np.concatenate([chunk, [np.nan]]))
    assert sketch.count == x.size
    held = sum(level.size for level in sketch.levels)
    assert held < 2048 * len(sketch.levels) and held < x.size / 20  # bounded memory
    qs = np.linspace(0.005, 0.995, 199)
    est = sketch.quantiles(qs)
    ranks = np.searchsorted(np.sort(x), est, side="left") / x.size
    ranks_hi = np.searchsorted(np.sort(x), est, side="right") / x.size
    # the estimate's rank (an interval where values repeat) lies within 1% of the asked quantile
    err = np.maximum(0.0, np.maximum(ranks - qs, qs - ranks_hi))
    assert err.max() < 0.01, err.max()
    v, w = sketch.weighted()
    assert w.sum() == x.size and np.all(np.diff(v) >= 0)


def test_merged_shard_sketches_keep_the_bound_and_are_exact_while_small() -> None:
    """Ranks each sketch a share of the rows and merge: the merged sketch keeps the rank bound
    and the memory bound of one sketch over all rows; under k values it is exact."""
    rng = np.random.default_rng(5)
    x = np.concatenate([np.zeros(60_000), rng.lognormal(4.0, 2.0, 140_000)])
    rng.shuffle(x)
    shards = []
    for part in np.array_split(x, 3):
        s = QuantileSketch(k=1024)
        for chunk in np.array_split(part, 11):
            s.update(chunk)
        shards.append(s)
    merged = shards[0]
    for s in shards[1:]:
        merged.merge(s)
    assert merged.count == x.size and (merged.min, merged.max) == (x.min(), x.max())
    v, w = merged.weighted()
    assert w.sum() == x.size and sum(lv.size for lv in merged.levels) < 1024 * len(merged.levels)
    qs = np.linspace(0.01, 0.99, 99)
    est = merged.quantiles(qs)
    lo = np.searchsorted(np.sort(x), est, side="left") / x.size
    hi = np.searchsorted(np.sort(x), est, side="right") / x.size
    assert np.maximum(0.0, np.maximum(lo - qs, qs - hi)).max() < 0.01
    small = [QuantileSketch(), QuantileSketch()]
    whole = QuantileSketch()
    for i, chunk in enumerate(np.array_split(x[:5_000], 6)):
        small[i % 2].update(chunk)
        whole.update(chunk)
    small[0].merge(small[1])
    np.testing.assert_array_equal(bin_edges(small[0], 32), bin_edges(whole, 32))
    empty = QuantileSketch()
    empty.merge(whole)  # a rank whose share held no rows
    np.testing.assert_array_equal(bin_edges(empty, 32), bin_edges(whole, 32))


def test_bin_edges_give_a_point_mass_its_own_edge_and_share_the_rest() -> None:
    rng = np.random.default_rng(0)
    money = np.concatenate([np.zeros(9_000), rng.lognormal(8.0, 1.0, 1_000)])
    s = QuantileSketch()
    s.update(money)
    edges = bin_edges(s, 16)
    assert edges[0] == 0.0 and edges[-1] == money.max() and np.all(np.diff(edges) > 0)
    assert len(edges) == 17  # 90% zeros still leave 16 bins, 15 of them over the non-zero 10%
    q = bin_position(money[money > 0], edges)
    counts = np.histogram(q, bins=np.arange(17))[0][1:]  # bins 1..15: about equal mass
    assert counts.min() > 0.4 * counts.mean()
    few = QuantileSketch()
    few.update(np.array([3.0, 1.0, 2.0, 2.0, 7.0] * 100))
    assert bin_edges(few, 16).tolist() == [1.0, 2.0, 3.0, 7.0]  # every distinct value an edge
    const = QuantileSketch()
    const.update(np.full(10, 5.0))
    assert bin_edges(const, 8).tolist() == [5.0]


def test_bin_position_and_ple_golden_values() -> None:
    edges = np.array([0.0, 1.0, 3.0, 10.0])
    q = bin_position(np.array([-5.0, 0.0, 0.25, 1.0, 2.0, 3.0, 6.5, 10.0, 1e9, np.nan]), edges)
    np.testing.assert_allclose(q[:-1], [0.0, 0.0, 0.25, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0])
    assert np.isnan(q[-1])
    ple = PiecewiseLinearEmbedding(1, bins=4, dim=2)
    np.testing.assert_allclose(ple.expand(torch.tensor([[2.5], [0.0], [4.0]])).squeeze(1).numpy(),
                               [[1, 1, 0.5, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():  # one feature, width 1: e . w + b through ReLU
        ple.weight.copy_(torch.tensor([[[1.0, 0], [2.0, 0], [4.0, 0], [8.0, 0]]]))
        ple.bias.zero_()
    np.testing.assert_allclose(ple(torch.tensor([[2.5], [float("nan")]])).detach().numpy(),
                               [[1 + 2 + 2, 0.0], ple.missing.detach().numpy()[0]])


def test_periodic_embedding_golden_and_missing() -> None:
    emb = PeriodicEmbedding(1, frequencies=1, sigma=1.0, dim=2)
    with torch.no_grad():
        emb.frequencies.fill_(0.25)
        emb.weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))  # out = (cos, sin)
        emb.bias.zero_()
    out = emb(torch.tensor([[1.0], [0.5], [float("nan")]])).detach()
    np.testing.assert_allclose(out[0].numpy(), [0.0, 1.0], atol=1e-6)  # 2 pi * 0.25 = pi / 2
    np.testing.assert_allclose(out[1].numpy(), [np.cos(np.pi / 4), np.sin(np.pi / 4)], atol=1e-6)
    assert torch.equal(out[2], emb.missing.detach()[0])


def test_encoder_embeds_dense_features_and_gradients_reach_missing_vectors() -> None:
    feats = [
        FeatureSpec(name="a", type="dense", encoding="standard"),
        FeatureSpec(name="b", type="dense"),  # piecewise_linear at the default width
        FeatureSpec(name="c", type="dense", encoding="periodic", dim=3),
        FeatureSpec(name="d", type="dense", encoding="piecewise_linear", bins=4, dim=DEFAULT_NUMERIC_DIM),
    ]
    enc = Encoder(feats, ModelConfig(periodic_frequencies=4))
    d = DEFAULT_NUMERIC_DIM
    assert enc.out_dim == 1 + d + 3 + d and len(enc.numeric) == 2  # (periodic, 3) and (ple, d) groups
    dense = torch.tensor([[0.3, 5.0, 0.2, 1.5], [-1.0, float("nan"), float("nan"), 0.0]])
    out = enc({"cat": torch.zeros(2, 0, dtype=torch.long), "dense": dense})
    assert out.shape == (2, 4 + 2 * d) and torch.isfinite(out).all()
    assert out[0, 0] == 0.3 and out[1, 0] == -1.0  # the standard column passes through
    out.sum().backward()
    ple = enc.numeric[enc.numeric_keys.index(("piecewise_linear", d))]
    assert ple.missing.grad[0].abs().sum() > 0 and ple.missing.grad[1].abs().sum() == 0  # only b was missing
    assert ple.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- featurizer, bundle, serving
FEATURES = [
    {"name": "user_id", "type": "categorical", "buckets": 500, "dim": 8},
    {"name": "category", "type": "categorical", "buckets": 50, "dim": 4},
    {"name": "price", "type": "dense"},
    {"name": "price_periodic", "column": "price", "type": "dense", "encoding": "periodic", "bins": 16, "dim": 4},
    {"name": "price_log", "column": "price", "type": "dense", "transform": "log1p"},
]


@pytest.fixture(scope="module")
def encoded_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("enc")
    cfg_path = write_logs(root, rows=2000, features=FEATURES, train={"epochs": 1})
    out = root / "bundle"
    Trainer(load_config(cfg_path), progress=False, log=lambda s: None).run(out)
    return cfg_path, out


def test_fit_on_parquet_edges_match_exact_quantiles_and_nan_stays_missing(encoded_bundle: tuple[Path, Path]) -> None:
    cfg_path, out = encoded_bundle
    b = load_bundle(out)
    train = pq.read_table(cfg_path.parent / "train")
    price = train.column("price").to_numpy(zero_copy_only=False)
    finite = price[np.isfinite(price)]
    edges = b.featurizer.edges["price"]
    assert 20 <= len(edges) <= DEFAULT_BINS + 1 and edges[0] == finite.min() and edges[-1] == finite.max()
    # about equal mass per bin: every bin holds 1/T of the values give or take 1.5% of all values
    counts = np.histogram(finite, bins=edges)[0] / finite.size
    assert np.abs(counts - 1 / (len(edges) - 1)).max() < 0.015
    batch = b.featurizer.transform(pa.table({"price": pa.array([None, float("nan"), float(np.median(finite))])}))
    ple_col = [f.name for f in b.featurizer.dense].index("price")
    assert torch.isnan(batch["dense"][:2, ple_col]).all()
    assert abs(batch["dense"][2, ple_col].item() - (len(edges) - 1) / 2) < 1.0
    log_col = [f.name for f in b.featurizer.dense].index("price_log")
    assert batch["dense"][0, log_col] == 0.0  # standardised encodings keep mean imputation


def test_bundle_round_trip_keeps_edges_and_scores(encoded_bundle: tuple[Path, Path]) -> None:
    cfg_path, out = encoded_bundle
    b = load_bundle(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert {f["name"]: f["encoding"] for f in manifest["config"]["features"] if f["type"] == "dense"} == {
        "price": "piecewise_linear", "price_periodic": "periodic", "price_log": "log1p"}
    again = Featurizer.from_state(b.config.features, json.loads(json.dumps(b.featurizer.state())))
    table = pq.read_table(cfg_path.parent / "test")
    one, two = b.featurizer.transform(table), again.transform(table)
    assert all(torch.equal(one[k], two[k]) or torch.allclose(one[k], two[k], equal_nan=True) for k in one)
    with torch.inference_mode():
        s1 = b.model.predict(one)
        s2 = load_bundle(out).model.predict(two)
    for t in s1:
        assert torch.isfinite(s1[t]).all() and torch.equal(s1[t], s2[t])


def test_bundle_from_before_encodings_still_loads_as_standardised(encoded_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """A bundle written before this feature: dense config without ``encoding``, no fitted edges."""
    cfg_path, _ = encoded_bundle
    raw = yaml.safe_load(cfg_path.read_text())
    raw["features"] = [{"name": "user_id", "type": "categorical", "buckets": 500, "dim": 8},
                       {"name": "price", "type": "dense", "transform": "log1p"},
                       {"name": "price_raw", "column": "price", "type": "dense", "encoding": "standard"}]
    raw["data"] = {k: str(cfg_path.parent / v) for k, v in raw["data"].items()}
    raw["train"]["epochs"] = 1
    out = tmp_path / "b"
    Trainer(parse_config(raw), progress=False, log=lambda s: None).run(out)
    want = load_bundle(out)
    manifest = json.loads((out / MANIFEST).read_text())
    for f in manifest["config"]["features"]:
        f.pop("encoding", None)
        f.pop("bins", None)
    del manifest["featurizer"]["edges"], manifest["featurizer"]["bias"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    old = load_bundle(out)
    assert [f.encoding for f in old.config.features if f.type == "dense"] == ["log1p", "standard"]
    table = pq.read_table(cfg_path.parent / "test")
    with torch.inference_mode():
        a, b = want.model.predict(want.featurizer.transform(table)), old.model.predict(old.featurizer.transform(table))
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_serving_scores_equal_offline_featurizer_and_model(encoded_bundle: tuple[Path, Path]) -> None:
    cfg_path, out = encoded_bundle
    offline = load_bundle(out)
    items = [{"user_id": 2**60 + 3, "category": "c1", "price": 12.5}, {"user_id": 7, "category": "c2"},
             {"price": 1e7}, {"price": -3.0, "category": "c9"}]
    table = pa.table({"user_id": pa.array([r.get("user_id") for r in items], pa.int64()),
                      "category": pa.array([r.get("category") for r in items], pa.string()),
                      "price": pa.array([r.get("price") for r in items], pa.float64())})
    with torch.inference_mode():
        want = {t: s.numpy() for t, s in offline.model.predict(offline.featurizer.transform(table)).items()}
    settings = ServingSettings(bundle=out, device="cpu", warmup_rows=4)
    with TestClient(create_app(settings, registry=CollectorRegistry())) as client:
        r = client.post("/predict", json={"items": items})
    assert r.status_code == 200, r.text
    got = r.json()["scores"]
    for t, w in want.items():
        np.testing.assert_allclose(np.asarray(got[t]), w, rtol=1e-5, atol=1e-5, err_msg=t)
