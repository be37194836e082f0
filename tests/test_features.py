"""The featurizer: stable hashing, exact int64 ids, missing handling, normalisation, bags."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from ranker.config import FeatureSpec
from ranker.errors import RankerError
from ranker.features import (
    MISSING,
    Featurizer,
    RunningMoments,
    bag_pads,
    bucketize,
    concat_batches,
    hash_int64,
    hash_str,
)

MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """Pure-Python splitmix64 finaliser, written independently of the numpy one."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_int_hash_golden_values() -> None:
    v = np.array([0, 1, -1, 2**53, 2**53 + 1, 2**63 - 1], dtype=np.int64)
    # splitmix64(0) is the generator's well-known first output 0xE220A8397B1DCDAF
    assert [int(x) for x in hash_int64(v)] == [
        16294208416658607535, 10451216379200822465, 16490336266968443936,
        14898857794701533647, 386430782533759031, 3055647633038352039,
    ]
    assert bucketize(hash_int64(v), 1000).tolist() == [536, 466, 937, 648, 32, 40]


def test_int_hash_matches_reference_implementation() -> None:
    rng = np.random.default_rng(0)
    v = rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64)
    ours = hash_int64(v)
    assert all(int(h) == splitmix64_reference(int(x) & MASK64) for h, x in zip(ours, v))


def test_ids_above_2_53_stay_distinct() -> None:
    # float64 cannot tell these apart; the hash must
    a, b = 2**53, 2**53 + 1
    assert float(a) == float(b)
    ha, hb = hash_int64(np.array([a, b], dtype=np.int64))
    assert ha != hb


def test_string_hash_golden_values_and_stable_across_processes() -> None:
    expected = [13020603013274838756, 9034625373069204908, 6789101201214928399, 14677004421776497939]
    words = ["", "ios", "cat_07", "héllo"]
    assert [hash_str(s) for s in words] == expected
    code = f"from ranker.features import hash_str; print([hash_str(s) for s in {words!r}])"
    for seed in ("1", "2"):  # a salted hash() would differ between these
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        assert eval(out) == expected


def _fz(**kinds: str) -> Featurizer:
    feats = [
        FeatureSpec(name="u", type="categorical", buckets=1000, dim=4),
        FeatureSpec(name="c", type="categorical", buckets=50, dim=4),
        FeatureSpec(name="tags", type="multi_hot", buckets=100, dim=4),
        FeatureSpec(name="p", type="dense", transform="log1p"),
        FeatureSpec(name="q", type="dense", encoding="standard"),
    ]
    return Featurizer(feats, {"u": "int", "c": "str", "tags": "str"}, {"p": (1.0, 2.0), "q": (10.0, 5.0)})


def test_transform_categorical_missing_and_types() -> None:
    fz = _fz()
    t = pa.table({
        "u": pa.array([2**53, 2**53 + 1, None], pa.int64()),
        "c": pa.array(["a", None, "a"]),
        "tags": pa.array([["x", "y"], [], None], pa.list_(pa.string())),
        "p": pa.array([0.0, float("nan"), None]),
        "q": pa.array([20, 10, None], pa.int32()),
    })
    b = fz.transform(t)
    cat = b["cat"]
    assert cat.dtype == torch.int64 and cat.shape == (3, 2)
    assert cat[0, 0] != cat[1, 0] and cat[2, 0] == MISSING
    assert cat[0, 1] == cat[2, 1] == bucketize(np.array([hash_str("a")], dtype=np.uint64), 50)[0]
    assert cat[1, 1] == MISSING
    # dense: (log1p(0) - 1) / 2 = -0.5; NaN and null -> 0; q: (20 - 10) / 5 = 2
    assert torch.allclose(b["dense"], torch.tensor([[-0.5, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    bag = b["bag:tags"]
    assert bag.shape == (3, 2)
    assert bag[0].tolist() == bucketize(np.array([hash_str("x"), hash_str("y")], dtype=np.uint64), 100).tolist()
    assert bag[1].tolist() == [MISSING, 101] and bag[2].tolist() == [MISSING, 101]  # empty/null: one missing entry, then padding


def test_huge_dense_values_stay_finite() -> None:
    fz = _fz()
    d = fz.transform(pa.table({"q": [1e308, -1e308, 10.0]}))["dense"][:, 1]
    assert torch.isfinite(d).all() and d[0] > 1000 and d[1] < -1000 and d[2] == 0


def test_absent_column_counts_as_missing() -> None:
    fz = _fz()
    b = fz.transform(pa.table({"u": pa.array([5], pa.int64())}))
    assert b["cat"][0, 1] == MISSING and b["dense"].abs().sum() == 0 and b["bag:tags"].tolist() == [[MISSING]]
    assert fz.missing_counts(pa.table({"u": pa.array([5, None], pa.int64())}))["u"] == 1


def test_running_moments_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 3.0, 10_000)  # large offset: naive sum-of-squares would lose precision
    m = RunningMoments()
    for chunk in np.array_split(x, 7):
        m.update(np.concatenate([chunk, [np.nan]]))
    assert m.count == x.size
    assert m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.std == pytest.approx(x.std(), rel=1e-9)
    shards = [RunningMoments(), RunningMoments(), RunningMoments()]  # ranks' shares; the last one empty
    for shard, chunk in zip(shards, np.array_split(x, [3_000]), strict=False):
        shard.update(chunk)
    merged = RunningMoments()
    for s in shards:
        merged.merge(s)
    assert merged.count == x.size
    assert merged.mean == pytest.approx(x.mean(), rel=1e-12) and merged.std == pytest.approx(x.std(), rel=1e-9)


def test_fit_normalises_with_train_stats() -> None:
    feats = [FeatureSpec(name="p", type="dense", encoding="standard")]
    batches = [pa.record_batch({"p": pa.array([1.0, 2.0, None])}), pa.record_batch({"p": pa.array([3.0, 4.0])})]
    fz = Featurizer.fit(feats, batches[0].schema, batches, "train.parquet")
    mean, std = fz.dense_stats["p"]
    assert mean == pytest.approx(2.5) and std == pytest.approx(np.std([1, 2, 3, 4]))
    z = fz.transform(pa.table({"p": [1.0, 2.5, 4.0]}))["dense"][:, 0]
    assert z.mean().abs() < 1e-6 and z[1] == 0


def test_state_round_trip() -> None:
    fz = _fz()
    again = Featurizer.from_state(fz.features, fz.state())
    t = pa.table({"u": pa.array([1, 2], pa.int64()), "c": ["a", "b"], "p": [1.0, 2.0]})
    for k, v in fz.transform(t).items():
        assert torch.equal(v, again.transform(t)[k])


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (pa.array([1.5]), "u.*double"),
        (pa.array([["a"]]), "u.*list"),
    ],
)
def test_check_schema_rejects_wrong_types(column: pa.Array, match: str) -> None:
    feats = [FeatureSpec(name="u", type="categorical", buckets=10, dim=2)]
    with pytest.raises(RankerError, match=match):
        Featurizer.check_schema(feats, pa.schema([("u", column.type)]), "f.parquet")


def test_check_schema_names_missing_column() -> None:
    feats = [FeatureSpec(name="price", type="dense")]
    with pytest.raises(RankerError, match=r"f.parquet: missing column 'price'"):
        Featurizer.check_schema(feats, pa.schema([("x", pa.int64())]), "f.parquet")


def test_concat_pads_bags_to_common_width() -> None:
    feats = [FeatureSpec(name="t", type="multi_hot", buckets=9, dim=2)]
    a = {"bag:t": torch.tensor([[1]]), "cat": torch.zeros(1, 0, dtype=torch.long)}
    b = {"bag:t": torch.tensor([[2, 3, 4]]), "cat": torch.zeros(1, 0, dtype=torch.long)}
    out = concat_batches([a, b], bag_pads(feats))
    assert out["bag:t"].tolist() == [[1, 10, 10], [2, 3, 4]]


def _reference_buckets(values: list, kind: str, buckets: int) -> list[int]:
    """Value by value, in plain Python: the buckets the featurizer must give."""
    def one(v: object) -> int:
        if v is None:
            return MISSING
        h = splitmix64_reference(int(v) & MASK64) if kind == "int" else hash_str(v)  # type: ignore[arg-type]
        return h % buckets + 1
    return [one(v) for v in values]


def test_wide_transform_matches_value_by_value_reference() -> None:
    """Many columns hashed together (one dictionary encoding per kind) give each value the bucket
    it gets alone, whatever the column's Arrow layout: plain, dictionary-encoded, chunked with
    different dictionaries, large_string, int32, bool, and nulls in every form."""
    rng = np.random.default_rng(3)
    n = 300
    words = [f"w{i}" for i in range(40)] + ["", "héllo", "ios"]
    feats, kinds, cols, expect = [], {}, {}, {}
    for i in range(12):  # string columns sharing values, with different bucket counts
        vals = [None if rng.random() < 0.1 else words[rng.integers(len(words))] for _ in range(n)]
        b = [7, 1000, 1000, 50][i % 4]
        arr: pa.Array | pa.ChunkedArray = pa.array(vals)
        if i % 4 == 1:
            arr = arr.dictionary_encode()
        elif i % 4 == 2:  # two chunks, each with its own dictionary
            arr = pa.chunked_array([pa.array(vals[:100]).dictionary_encode(), pa.array(vals[100:]).dictionary_encode()])
        elif i % 4 == 3:
            arr = pa.array(vals, pa.large_string())
        feats.append(FeatureSpec(name=f"s{i}", type="categorical", buckets=b, dim=2))
        kinds[f"s{i}"], cols[f"s{i}"], expect[f"s{i}"] = "str", arr, _reference_buckets(vals, "str", b)
    ints = {
        "i64": (pa.int64(), [None if rng.random() < 0.1 else int(v) for v in rng.integers(-(2**62), 2**62, n)]),
        "i32": (pa.int32(), [int(v) for v in rng.integers(-50, 50, n)]),
        "flag": (pa.bool_(), [bool(v) for v in rng.integers(0, 2, n)]),
    }
    for name, (typ, vals) in ints.items():
        feats.append(FeatureSpec(name=name, type="categorical", buckets=97, dim=2))
        kinds[name], cols[name], expect[name] = "int", pa.array(vals, typ), _reference_buckets([None if v is None else int(v) for v in vals], "int", 97)
    feats.append(FeatureSpec(name="gone", type="categorical", buckets=5, dim=2))  # absent column: missing
    kinds["gone"] = "str"
    expect["gone"] = [MISSING] * n
    tags = [None if j == 0 else [None if rng.random() < 0.1 else words[rng.integers(len(words))] for _ in range(j - 1)] for j in rng.integers(0, 4, n)]
    feats.append(FeatureSpec(name="tags", type="multi_hot", buckets=100, dim=2))
    kinds["tags"], cols["tags"] = "str", pa.array(tags, pa.list_(pa.string()))

    b = Featurizer(feats, kinds, {}).transform(pa.table(cols))
    cats = [f for f in feats if f.type == "categorical"]
    for j, f in enumerate(cats):
        assert b["cat"][:, j].tolist() == expect[f.name], f.name
    for row, t in zip(b["bag:tags"].tolist(), tags, strict=True):
        want = _reference_buckets(t, "str", 100) if t else [MISSING]
        assert row[: len(want)] == want and set(row[len(want) :]) <= {101}
