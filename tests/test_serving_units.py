"""Unit tests of serving parts with no HTTP: drift tracker, response encoder, request parser."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from ranker.config import FeatureSpec
from ranker.errors import RankerError
from ranker.features import Featurizer
from ranker.reference import assign_bins, psi, reference_histogram
from ranker.serving.drift import MIN_PSI_SCORES, ScoreTracker
from ranker.serving.errors import RequestError
from ranker.serving.parsing import RequestParser
from ranker.serving.schemas import PredictResponse, encode_predict_response

# ---------------------------------------------------------------- drift



@pytest.mark.parametrize("kind", ["continuous", "three_values", "spike_at_zero", "constant"])
def test_reference_bins_always_number_ten(kind: str) -> None:
    """Tied quantiles left fewer bins (np.unique), and the live binned AUC adds bins of
    different model versions by index: every bundle keeps 9 strictly ascending edges, ties in
    one bin, the extra bins empty where the scores leave no room."""
    rng = np.random.default_rng(1)
    scores = {"continuous": rng.normal(size=4000), "three_values": rng.choice([0.1, 0.5, 0.9], 4000, p=[0.7, 0.2, 0.1]),
              "spike_at_zero": np.r_[np.zeros(3600), rng.random(400)], "constant": np.full(500, 0.25)}[kind]
    ref = reference_histogram(scores)
    edges = np.asarray(ref["edges"])
    assert edges.size == 9 and np.all(np.diff(edges) > 0)
    counts = np.bincount(assign_bins(scores, edges), minlength=10)
    assert np.allclose(counts / counts.sum(), ref["shares"]) and psi(counts, ref["shares"]) == pytest.approx(0.0, abs=1e-12)
    for v in np.unique(scores)[:50]:  # a tied value never straddles two bins
        assert np.unique(assign_bins(scores[scores == v], edges)).size == 1
    if kind == "continuous":  # untouched where the quantiles are distinct
        assert np.allclose(edges, np.quantile(scores, np.linspace(0, 1, 11)[1:-1]))

def test_ring_window_equals_brute_force_over_the_last_n_scores() -> None:
    rng = np.random.default_rng(0)
    ref = reference_histogram(rng.normal(size=5000))
    tracker = ScoreTracker(ref["edges"], ref["shares"], window=500)
    seen: list[np.ndarray] = []
    for size in [1, 7, 300, 499, 1200, 3, 0, 50]:  # fills, wraps, and one batch above the window
        batch = rng.normal(size=size)
        tracker.add(batch)
        seen.append(batch)
        every = np.concatenate(seen)
        snap = tracker.snapshot()
        want_window = np.bincount(assign_bins(every[-500:], ref["edges"]), minlength=len(ref["shares"]))
        assert snap.window.tolist() == want_window.tolist()
        assert snap.counts.tolist() == np.bincount(assign_bins(every, ref["edges"]), minlength=len(ref["shares"])).tolist()
        assert snap.total == pytest.approx(every.sum())


def test_psi_near_zero_for_reference_like_scores_and_large_for_shifted() -> None:
    rng = np.random.default_rng(1)
    ref = reference_histogram(rng.beta(2, 5, size=20_000))
    same = ScoreTracker(ref["edges"], ref["shares"], window=10_000)
    same.add(rng.beta(2, 5, size=10_000))
    shifted = ScoreTracker(ref["edges"], ref["shares"], window=10_000)
    shifted.add(rng.beta(3, 4, size=10_000))  # mean 0.29 -> 0.43
    assert same.snapshot().psi < 0.01
    assert shifted.snapshot().psi > 0.25


def test_psi_is_nan_until_the_window_holds_enough_scores() -> None:
    """Few scores drawn from the reference itself give a large PSI (10 in 10 bins: 2.4 median):
    the gauge is NaN below MIN_PSI_SCORES, or below a smaller window's size."""
    rng = np.random.default_rng(2)
    ref = reference_histogram(rng.normal(size=20_000))
    t = ScoreTracker(ref["edges"], ref["shares"], window=10_000)
    t.add(rng.normal(size=10))
    assert psi(t.snapshot().window, ref["shares"]) > 0.25 and math.isnan(t.snapshot().psi)
    t.add(rng.normal(size=MIN_PSI_SCORES - 11))
    assert math.isnan(t.snapshot().psi)
    t.add(rng.normal(size=1))
    assert t.snapshot().psi < 0.05
    small = ScoreTracker(ref["edges"], ref["shares"], window=200)
    small.add(rng.normal(size=199))
    assert math.isnan(small.snapshot().psi)
    small.add(rng.normal(size=1))
    assert small.snapshot().psi < 0.25


def test_tracker_skips_non_finite_scores_and_checks_shapes() -> None:
    t = ScoreTracker([0.5], [0.5, 0.5], window=10)
    t.add(np.array([0.2, np.nan, np.inf, 0.7], dtype=np.float32))
    assert t.snapshot().counts.tolist() == [1, 1]
    with pytest.raises(ValueError, match="2 bins but 3"):
        ScoreTracker([0.5], [0.3, 0.3, 0.4], window=10)


# ---------------------------------------------------------------- response encoder


def test_encoded_scores_round_trip_float32_exactly_and_validate() -> None:
    rng = np.random.default_rng(2)
    both = rng.random((1000, 2)).astype(np.float32)
    scores = {"ctr": both[:, 0], "watch": (rng.lognormal(3, 2, 1000)).astype(np.float32)}  # a strided view too
    body = encode_predict_response("v1", scores)
    parsed = PredictResponse.model_validate_json(body)
    assert parsed.model_version == "v1" and list(parsed.scores) == ["ctr", "watch"]
    for t, s in scores.items():
        assert (np.asarray(parsed.scores[t], dtype=np.float32) == s).all()


def test_non_finite_scores_become_null() -> None:
    body = encode_predict_response("v", {"watch": np.array([1.5, np.inf, np.nan], dtype=np.float32)})
    assert json.loads(body)["scores"]["watch"] == [1.5, None, None]


# ---------------------------------------------------------------- request parser


@pytest.fixture
def parser() -> RequestParser:
    features = [
        FeatureSpec(name="uid", column="user", type="categorical", buckets=100, dim=2),
        FeatureSpec(name="topics", type="multi_hot", buckets=10, dim=2),
        FeatureSpec(name="price", type="dense"),
    ]
    return RequestParser(Featurizer(features, {"uid": "int", "topics": "int"}, {"price": (0.0, 1.0)}), max_items=100)


def test_parser_reads_by_source_column_and_both_id_conventions(parser: RequestParser) -> None:
    big = 2**62 + 1
    for uid in (big, str(big)):
        t = parser.parse(json.dumps({"context": {"user": uid, "price": 2}, "items": [{"topics": [str(big), 3]}, {"price": 1}]}).encode())
        assert t.column("user").to_pylist() == [big, big]
        assert t.column("topics").to_pylist() == [[big, 3], None]
        assert t.column("price").to_pylist() == [2.0, 1.0]
        assert t.column("user").type == pa.int64()


def test_parser_fast_path_takes_both_id_conventions_and_slow_path_the_rest(parser: RequestParser, monkeypatch: pytest.MonkeyPatch) -> None:
    slow: list[bytes] = []
    real_slow = parser._slow
    monkeypatch.setattr(parser, "_slow", lambda body: slow.append(body) or real_slow(body))
    big = 2**62 + 1
    for body in (
        {"items": [{"user": big, "topics": [1, 2]}]},
        {"items": [{"user": str(big), "topics": ["1", "-2"]}]},
        {"context": {"user": str(big)}, "items": [{"user": 5}, {}]},  # each scope has its own convention
    ):
        parser.parse(json.dumps(body).encode())
    assert slow == []
    mixed = json.dumps({"items": [{"user": 1}, {"user": str(big)}]}).encode()  # one column, both conventions
    assert parser.parse(mixed).column("user").to_pylist() == [1, big]
    boolean = b'{"items": [{"user": true}]}'  # booleans hash as 0/1, as in training
    assert parser.parse(boolean).column("user").to_pylist() == [1]
    assert slow == [mixed, boolean]


def test_parser_item_values_win_over_context(parser: RequestParser) -> None:
    t = parser.parse(b'{"context": {"price": 9, "topics": [1]}, "items": [{"price": 1}, {"price": null}, {"topics": []}]}')
    assert t.column("price").to_pylist() == [1.0, 9.0, 9.0]
    assert t.column("topics").to_pylist() == [[1], [1], []]  # [] is a value (no tags), not missing


def test_parser_refuses_two_features_typed_differently_on_one_column() -> None:
    features = [
        FeatureSpec(name="a", column="x", type="categorical", buckets=10, dim=2),
        FeatureSpec(name="b", column="x", type="multi_hot", buckets=10, dim=2),
    ]
    with pytest.raises(RankerError, match="column 'x'"):
        RequestParser(Featurizer(features, {"a": "int", "b": "int"}, {}), max_items=10)


def test_parser_reads_a_number_that_is_both_dense_and_categorical_as_int64() -> None:
    """Census-style features: `age` standardised and hashed per value, from one int64 column."""
    features = [
        FeatureSpec(name="age_num", column="age", type="dense", encoding="standard"),
        FeatureSpec(name="age", type="categorical", buckets=100, dim=2),
    ]
    fz = Featurizer(features, {"age": "int"}, {"age_num": (40.0, 10.0)})
    p = RequestParser(fz, max_items=10)
    t = p.parse(b'{"items": [{"age": 50}, {"age": "30"}, {}]}')
    assert t.column("age").type == pa.int64() and t.column("age").to_pylist() == [50, 30, None]
    b = fz.transform(t)
    assert b["dense"][:, 0].tolist() == [1.0, -1.0, 0.0]
    assert b["cat"][0, 0] != b["cat"][1, 0] and b["cat"][2, 0] == 0
    with pytest.raises(RequestError, match=r"items\[0\]\.age"):
        p.parse(b'{"items": [{"age": 50.5}]}')  # an int64 column in training
