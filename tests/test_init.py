"""``ranker init``: a config inferred from real Parquet that loads and trains; CLI errors."""

from __future__ import annotations

import datetime as dt
import decimal
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ranker.cli import main
from ranker.config import load_config
from ranker.features import _hash_array
from ranker.init_config import SPARSE_BUCKETS, _buckets, _collision_free_buckets, _dim


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    city = rng.choice([f"city{i}" for i in range(40)], n)
    age = rng.integers(18, 90, n)
    code = rng.integers(0, 12, n)
    income = rng.lognormal(10, 1.5, n)
    logit = -1.0 + (age > 50) * 1.0 + (code % 3 == 0) * 0.8 + np.where(np.char.endswith(city.astype(str), "7"), 1.0, 0.0)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    conversion = click * (rng.random(n) < 0.3)
    tags = [[f"t{(i + j) % 30}" for j in range(i % 4)] for i in range(n)]
    return pa.table({
        "city": pa.array(city.tolist(), mask=rng.random(n) < 0.05),
        "premium": pa.array(rng.random(n) < 0.2),
        "age": pa.array(age, pa.int64()),
        "code": pa.array(code, pa.int32()),
        "income": pa.array(income),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "seen_at": pa.array([dt.datetime(2024, 1, 1)] * n, pa.timestamp("s")),
        "row_id": pa.array(np.arange(n), pa.int64()),
        "click": pa.array(click),
        "conversion": pa.array(conversion),
        "watch_seconds": pa.array(np.exp(rng.normal(3, 1.5, n))),
    })


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for split, n, seed in (("train", 3000, 0), ("val", 800, 1), ("test", 800, 2)):
        (tmp_path / split).mkdir()
        pq.write_table(_table(n, seed), tmp_path / split / "part-0.parquet")
    return tmp_path


def test_init_writes_a_config_that_trains(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cfg" / "config.yaml"
    rc = main(["init", "--data", str(data / "train"), "--label", "click,conversion,watch_seconds", "--exclude", "row_id", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = out.read_text()
    assert text.startswith("# written by `ranker init`") and "seen_at: left out: type timestamp" in text
    cfg = load_config(out)
    paths = {k: Path(getattr(cfg.data, k)).resolve() for k in ("train", "val", "test")}
    assert paths == {k: (data / k).resolve() for k in paths}  # val/ and test/ found beside train/
    feats = {f.name: f for f in cfg.features}
    assert set(feats) == {"city", "premium", "age", "code", "code_cat", "income", "tags"}
    assert feats["city"].type == "categorical" and 1024 <= feats["city"].buckets < 1024 + 256 and feats["city"].dim == _dim(40) == 16
    cities = pa.array(sorted({c for c in pq.read_table(data / "train").column("city").to_pylist() if c}))
    assert len(set(_hash_array(cities, "str", feats["city"].buckets).tolist())) == len(cities)  # no two cities merged
    assert feats["premium"].type == "categorical" and feats["tags"].type == "multi_hot"
    assert feats["age"].type == "dense" and feats["age"].encoding == "piecewise_linear"  # 72 values: no code twin
    assert feats["code"].type == "dense" and feats["code_cat"].column == "code" and feats["code_cat"].type == "categorical"
    assert feats["income"].type == "dense" and feats["income"].transform == "none"
    tasks = {t.name: t for t in cfg.tasks}
    assert tasks["click"].type == "binary" and tasks["click"].mask is None
    assert tasks["conversion"].type == "binary" and tasks["conversion"].mask == "click"  # positive only under click
    assert tasks["watch_seconds"].type == "regression" and tasks["watch_seconds"].transform == "log1p"
    # and it trains: one epoch through the real CLI
    raw = yaml.safe_load(text)
    raw["train"].update(epochs=1, progress=False)
    out.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(out), "--out", str(tmp_path / "bundle"), "--quiet"]) == 0
    assert "click" in capsys.readouterr().out


def test_files_where_a_column_is_all_null_train_as_missing_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Writers store a file where a column holds no value as Arrow type null (a partition
    without the feature): init took such columns, and train refused the file (type null)."""
    def nulled(t: pa.Table) -> pa.Table:
        for name in ("city", "income", "tags", "conversion"):
            t = t.set_column(t.schema.get_field_index(name), name, pa.nulls(t.num_rows))
        return with_decimal(t)

    def with_decimal(t: pa.Table) -> pa.Table:  # money as exact decimals: a dense feature too
        return t.append_column("fee", pa.array([decimal.Decimal(i % 97) / 4 for i in range(t.num_rows)], pa.decimal128(12, 2)))
    for split, seed in (("train", 0), ("val", 1)):
        (tmp_path / split).mkdir()
        pq.write_table(nulled(_table(500, seed)), tmp_path / split / "part-0.parquet")  # the first file of each split
        pq.write_table(with_decimal(_table(1500 if split == "train" else 500, seed + 10)), tmp_path / split / "part-1.parquet")
    out = tmp_path / "config.yaml"
    assert main(["init", "--data", str(tmp_path / "train"), "--label", "click,conversion", "--exclude", "row_id", "--out", str(out)]) == 0
    feats = {f.name: f.type for f in load_config(out).features}
    assert {feats["city"], feats["income"], feats["tags"]} == {"categorical", "dense", "multi_hot"} and feats["fee"] == "dense"
    raw = yaml.safe_load(out.read_text())
    raw["train"].update(epochs=1, progress=False)
    out.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(out), "--out", str(tmp_path / "b"), "--quiet"]) == 0, capsys.readouterr().err
    count = re.search(r"conversion +auc=\S+ .*count=(\d+)", capsys.readouterr().out)
    assert count and 0 < int(count.group(1)) < 1000  # the null file's rows are unlabelled for conversion


def test_identifier_columns_become_categorical_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ids are embedded, not numbers (64-bit ids past 2**53 included, as ``ranker synth``
    writes them); a name that only ends in "id" stays what its type says; a unique id is
    flagged as a possible row key; the config trains."""
    rng = np.random.default_rng(0)
    n = 2000
    users = rng.integers(2**60, 2**62, 300)
    table = pa.table({
        "user_id": pa.array(users[rng.integers(0, 300, n)], pa.int64()),
        "itemId": pa.array([f"i{v}" for v in rng.integers(0, 500, n)]),
        "request_id": pa.array(np.arange(n) * 7919, pa.int64()),
        "paid": pa.array(rng.integers(0, 1000, n), pa.int64()),
        "click": pa.array(rng.integers(0, 2, n), pa.int64()),
    })
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        pq.write_table(table, tmp_path / split / "part-0.parquet")
    out = tmp_path / "config.yaml"
    assert main(["init", "--data", str(tmp_path / "train"), "--label", "click", "--out", str(out)]) == 0
    text = out.read_text()
    feats = {f.name: f for f in load_config(out).features}
    assert set(feats) == {"user_id", "itemId", "request_id", "paid"}
    assert feats["user_id"].type == "categorical" and feats["user_id"].buckets == _buckets(300)
    assert feats["itemId"].type == "categorical" and feats["paid"].type == "dense"
    assert "user_id: categorical (an identifier, by its name), 300 distinct\n" in text
    assert "request_id: categorical (an identifier, by its name), 2000 distinct; every sampled value distinct" in text
    raw = yaml.safe_load(text)
    raw["train"].update(epochs=1, progress=False)
    out.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(out), "--out", str(tmp_path / "bundle"), "--quiet"]) == 0, capsys.readouterr().err


def test_label_existing_only_under_another_gets_its_mask(tmp_path: Path) -> None:
    n = 400
    click = np.arange(n) % 3 == 0
    t = pa.table({"x": pa.array(np.arange(n, dtype=float)), "click": pa.array(click.astype(np.int8)),
                  "cvr_label": pa.array(np.where(click, np.arange(n) % 2, 0).astype(float), mask=~click),
                  "rating": pa.array(np.arange(n) % 5 + 1.0)})
    pq.write_table(t, tmp_path / "train.parquet")
    pq.write_table(t, tmp_path / "val.parquet")
    out = tmp_path / "c.yaml"
    assert main(["init", "--data", str(tmp_path / "train.parquet"), "--label", "click,cvr_label,rating", "--out", str(out)]) == 0
    cfg = load_config(out)
    assert Path(cfg.data.val).resolve() == (tmp_path / "val.parquet").resolve()  # train.parquet -> val.parquet
    tasks = {t.name: t for t in cfg.tasks}
    assert tasks["cvr_label"].mask == "click" and tasks["click"].mask is None
    assert tasks["rating"].type == "regression" and tasks["rating"].transform == "none"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--label", "clik"], r"no column 'clik'"),
        (["--label", "city"], r"label column 'city' has type string; labels must be numeric"),
        (["--label", "click", "--exclude", "nope"], r"no column 'nope'"),
        (["--label", "click,click"], r"--label: a column is named twice"),
        (["--label", "click", "--sample-rows", "0"], r"--sample-rows: must be at least 1"),
        (["--label", ","], r"--label: name at least one label column"),
    ],
)
def test_init_errors_exit_2_with_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str) -> None:
    rc = main(["init", "--data", str(data / "train"), "--out", str(tmp_path / "c.yaml"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ranker: error: ") and err.count("\n") == 1 and "Traceback" not in err


    assert re.search(match, err), err  # noqa
    assert not (tmp_path / "c.yaml").exists()


def test_init_refuses_to_overwrite_without_force_and_missing_data(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.yaml"
    out.write_text("keep me")
    assert main(["init", "--data", str(data / "train"), "--label", "click", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["init", "--data", str(data / "train"), "--label", "click", "--out", str(out), "--force"]) == 0
    assert load_config(out).tasks[0].name == "click"
    assert main(["init", "--data", str(tmp_path / "nothing"), "--label", "click", "--out", str(tmp_path / "d.yaml")]) == 2
    assert "--data: no Parquet files found" in capsys.readouterr().err
    assert main(["init", "--data", str(data / "train"), "--out", str(tmp_path / "d.yaml")]) == 2  # --label is required
    assert "the following arguments are required: --label" in capsys.readouterr().err


def test_bucket_rule_avoids_collisions_in_small_vocabularies() -> None:
    assert _buckets(3) == 1024 and _buckets(200) == 20_000 and _buckets(1000) == 16_000 and _buckets(10**7) == 2**18
    values = pa.array([f"v{i}" for i in range(200)])  # at 3,200 buckets (16 d) ~6 pairs would collide
    assert len(set(_hash_array(values, "str", 16 * 200).tolist())) < 200
    b = _collision_free_buckets(values, "str")
    assert 20_000 <= b < 20_000 + 256 and len(set(_hash_array(values, "str", b).tolist())) == 200
    ids = pa.array(range(30_000))
    assert _collision_free_buckets(ids, "int") == _buckets(30_000)  # large vocabularies: no search


def test_a_large_identifier_table_turns_on_sparse_embeddings(tmp_path: Path) -> None:
    """5,000 distinct user ids get 80,000 buckets, past SPARSE_BUCKETS: init writes
    ``sparse_embeddings: true`` and says why; without the id column it does not."""
    rng = np.random.default_rng(1)
    n = 6000
    table = pa.table({"user_id": pa.array(rng.permutation(n) % 5000, pa.int64()),
                      "device": pa.array(rng.choice(["ios", "android"], n)),
                      "click": pa.array(rng.integers(0, 2, n), pa.int64())})
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table, tmp_path / "val.parquet")
    with_ids = tmp_path / "ids.yaml"
    assert main(["init", "--data", str(tmp_path / "train.parquet"), "--label", "click", "--out", str(with_ids)]) == 0
    cfg = load_config(with_ids)
    assert cfg.features[0].buckets == _buckets(5000) >= SPARSE_BUCKETS and cfg.train.sparse_embeddings
    assert f"sparse_embeddings: the largest table has {_buckets(5000):,} rows" in with_ids.read_text()
    without = tmp_path / "plain.yaml"
    assert main(["init", "--data", str(tmp_path / "train.parquet"), "--label", "click", "--exclude", "user_id", "--out", str(without)]) == 0
    assert not load_config(without).train.sparse_embeddings


def _init(data: Path, out: Path, label: str = "click") -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["init", "--data", str(data), "--label", label, "--out", str(out)])
    return rc, err.getvalue()


def test_init_names_the_file_whose_schema_differs_and_reads_widened_types(tmp_path: Path) -> None:
    """A folder of files is one data set: a later file lacking a column or holding it as
    another kind is an error naming both files; int32 beside int64 (or int beside float) is
    read as the wider type."""
    t = _table(400, 0).drop_columns(["tags", "seen_at", "row_id"])
    for name, later in {
        "strings": t.set_column(t.schema.get_field_index("age"), "age", t.column("age").cast(pa.string())),
        "missing": t.drop_columns(["city"]),
    }.items():
        d = tmp_path / name
        d.mkdir()
        pq.write_table(t, d / "p1.parquet")
        pq.write_table(later, d / "p2.parquet")
        rc, err = _init(d, tmp_path / f"{name}.yaml")
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        want = "column 'age' is string, int64 in" if name == "strings" else "no column 'city', which"
        assert f"{d / 'p2.parquet'}: {want}" in err and str(d / "p1.parquet") in err, err
    d = tmp_path / "widened"
    d.mkdir()
    pq.write_table(t, d / "p1.parquet")
    pq.write_table(t.set_column(t.schema.get_field_index("income"), "income", pa.array(np.arange(400), pa.int32())), d / "p2.parquet")
    rc, err = _init(d, tmp_path / "w.yaml")
    assert rc == 0, err
    assert {f.name: f.type for f in load_config(tmp_path / "w.yaml").features}["income"] == "dense"


def test_init_on_an_empty_file_is_one_line(tmp_path: Path) -> None:
    pq.write_table(_table(10, 0).slice(0, 0), tmp_path / "empty.parquet")
    rc, err = _init(tmp_path / "empty.parquet", tmp_path / "e.yaml")
    assert rc == 2 and err.strip() == f"ranker: error: {tmp_path / 'empty.parquet'}: holds no rows", err


def test_init_survives_odd_column_names(tmp_path: Path) -> None:
    """A line break in a column name stays inside the header's comments; an existing
    ``code_cat`` column makes the code feature of ``code`` take the next free name; a float
    column named as an identifier is flagged."""
    t = _table(600, 0).drop_columns(["tags", "seen_at", "row_id"])
    t = t.append_column("a\nb: 1", pa.array(np.arange(600) % 5 * 1.5))
    t = t.append_column("code_cat", pa.array(["x", "y"] * 300))
    t = t.append_column("user_id", pa.array(np.where(np.arange(600) % 7 == 0, np.nan, np.arange(600) % 50)))
    pq.write_table(t, tmp_path / "odd.parquet")
    rc, err = _init(tmp_path / "odd.parquet", tmp_path / "odd.yaml")
    assert rc == 0, err
    cfg = load_config(tmp_path / "odd.yaml")
    names = [f.name for f in cfg.features]
    assert {"code_cat", "code_cat2", "a\nb: 1"} <= set(names) and len(names) == len(set(names))
    assert next(f for f in cfg.features if f.name == "code_cat2").source == "code"
    text = (tmp_path / "odd.yaml").read_text()
    assert "user_id: dense; WARNING: named as an identifier but stored as floats" in text
