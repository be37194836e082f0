"""Synthetic impression logs: real Parquet files in tmp_path, a few thousand rows each."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ranker.config import load_config
from ranker.errors import RankerError
from ranker.training import synth
from ranker.training.synth import SCHEMA, write_synthetic

ROWS = 20_000
LABELS = ("click", "conversion", "watch_seconds")


def _read(folder: Path) -> pa.Table:
    """All part files of one split, in file order."""
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Brute-force pair count: P(score of a positive > score of a negative), ties count half."""
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(folder, rows=ROWS, seed=0, rows_per_file=6_000, row_group_size=2_000)
    return folder


@pytest.fixture(scope="module")
def train(out: Path) -> pa.Table:
    return _read(out / "train")


def test_schema_and_split_sizes(out: Path) -> None:
    sizes = {}
    for split in ("train", "val", "test"):
        files = sorted((out / split).glob("*.parquet"))
        assert files, split
        for f in files:
            assert pq.read_schema(f).remove_metadata() == SCHEMA, f
        sizes[split] = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert sizes == {"train": 16_000, "val": 2_000, "test": 2_000}
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "test", "train", "val"]


def test_files_and_row_groups(out: Path) -> None:
    files = sorted((out / "train").glob("*.parquet"))
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(3)]
    meta = [pq.ParquetFile(f).metadata for f in files]
    assert [m.num_rows for m in meta] == [6_000, 6_000, 4_000]
    groups = [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in meta]
    assert groups == [[2_000] * 3, [2_000] * 3, [2_000] * 2]


def test_layout_does_not_change_the_rows(tmp_path: Path, train: pa.Table) -> None:
    # same seed and rows, other cuts: blocks are seeded independently of files and row groups
    write_synthetic(tmp_path / "d", rows=ROWS, seed=0, rows_per_file=7_777, row_group_size=999)
    other = _read(tmp_path / "d" / "train")
    assert len(list((tmp_path / "d" / "train").glob("*.parquet"))) == 3
    assert other.equals(train)


def test_label_rates_and_constraints(out: Path) -> None:
    t = pa.concat_tables(_read(out / s) for s in ("train", "val", "test"))
    click, conv = t["click"].to_numpy(), t["conversion"].to_numpy()
    watch = t["watch_seconds"].to_numpy()
    assert set(np.unique(click)) == {0, 1} and set(np.unique(conv)) == {0, 1}
    assert 0.03 <= click.mean() <= 0.08
    assert not conv[click == 0].any()  # a conversion needs a click
    assert 0.05 <= conv[click == 1].mean() <= 0.15
    assert all(t[c].null_count == 0 for c in LABELS)
    assert (watch >= 0).all()
    assert np.percentile(watch, 99) > 5 * np.median(watch)  # heavy right tail


def test_ids_above_2_53_survive_exactly(train: pa.Table) -> None:
    w = synth._world(0, 0.5)
    for col, table in (("user_id", w.user_ids), ("item_id", w.item_ids)):
        ids = train[col].to_numpy()
        big = ids[ids > 2**53]
        assert 0.03 < len(big) / len(ids) < 0.3, col
        # odd values above 2**53 do not fit in a float64: a float round trip would change them
        assert (big % 2 == 1).all()
        assert (big.astype(np.float64).astype(np.int64) != big).all()
        assert np.isin(ids, table).all(), col  # every value is one the generator issued


def test_ids_are_zipf_skewed(train: pa.Table) -> None:
    for col in ("user_id", "item_id"):
        _, counts = np.unique(train[col].to_numpy(), return_counts=True)
        counts = np.sort(counts)[::-1]
        top = counts[: max(1, len(counts) // 100)].sum() / counts.sum()
        assert top > 0.15, col  # the top 1% of entities take a large share of impressions
        assert np.median(counts) <= 2, col  # and most appear once or twice


def test_item_attributes_are_determined_by_the_item(train: pa.Table) -> None:
    tags = pc.fill_null(pc.binary_join(train["item_tags"], "|"), "<null>")
    pairs = pa.table({"item": train["item_id"], "cat": train["item_category"], "tags": tags})
    per_item = pairs.group_by("item").aggregate(
        [("cat", "count_distinct"), ("tags", "count_distinct")]
    )
    assert pc.max(per_item["cat_count_distinct"]).as_py() == 1
    assert pc.max(per_item["tags_count_distinct"]).as_py() == 1
    assert len(pc.unique(train["item_category"])) > 30
    lengths = pc.list_value_length(train["item_tags"]).drop_null().to_numpy()
    assert lengths.min() == 0 and lengths.max() == synth.MAX_TAGS


def test_nulls_where_expected(train: pa.Table) -> None:
    n = train.num_rows
    assert 0.03 < train["device"].null_count / n < 0.07
    assert 0.015 < train["price"].null_count / n < 0.045
    assert 0 < train["item_tags"].null_count / n < 0.03
    for col in ("user_id", "item_id", "item_category", "item_age_days", "user_activity", "hour"):
        assert train[col].null_count == 0, col
    assert set(pc.unique(train["device"]).drop_null().to_pylist()) <= set(synth.DEVICES)
    hours = train["hour"].to_numpy()
    assert hours.min() == 0 and hours.max() == 23


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    kw = {"rows": 3_000, "rows_per_file": 1_000, "row_group_size": 400}
    a = write_synthetic(tmp_path / "a", seed=7, **kw).parent
    b = write_synthetic(tmp_path / "b", seed=7, progress=True, **kw).parent
    c = write_synthetic(tmp_path / "c", seed=8, **kw).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert len(files) == 5  # train 3 files, val 1, test 1
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert not _read(a / "train").equals(_read(c / "train"))


def test_hidden_score_correlation_rises_with_p() -> None:
    ps = (-0.9, -0.5, 0.0, 0.5, 0.9)
    corr = []
    for p in ps:
        s = synth._hidden_scores(20_000, seed=0, task_correlation=p)
        corr.append(np.corrcoef(s["ctr"], s["cvr"])[0, 1])
    assert all(a < b for a, b in zip(corr, corr[1:], strict=False)), corr
    # the sin terms bend it a little, but the sign and size follow P
    assert np.allclose(corr, ps, atol=0.1), corr


def test_labels_are_learnable_from_the_columns(out: Path, train: pa.Table) -> None:
    # click rate per item_category, fitted on train, ranks held-out rows better than chance
    val = _read(out / "val")
    cats = pc.unique(train["item_category"])
    idx_t = pc.index_in(train["item_category"], cats).to_numpy()
    clicks = np.bincount(idx_t, weights=train["click"].to_numpy(), minlength=len(cats))
    rate = (clicks + 1) / (np.bincount(idx_t, minlength=len(cats)) + 20)
    idx_v = pc.fill_null(pc.index_in(val["item_category"], cats), 0).to_numpy()
    assert _auc(val["click"].to_numpy(), rate[idx_v]) > 0.55


def test_config_validates_and_points_at_the_data(out: Path) -> None:
    text = (out / "config.yaml").read_text()
    assert "train: train" in text  # relative, so the folder can be moved
    cfg = load_config(out / "config.yaml")
    for split in (cfg.data.train, cfg.data.val, cfg.data.test):
        assert split is not None and Path(split).is_dir() and Path(split).is_absolute()
    assert [f.name for f in cfg.features] == [n for n in SCHEMA.names if n not in LABELS]
    assert [(t.name, t.label, t.mask) for t in cfg.tasks] == [
        ("ctr", "click", None),
        ("cvr", "conversion", "click"),
        ("watch", "watch_seconds", None),
    ]
    assert cfg.model.architecture == "mmoe" and cfg.model.experts == 8
    assert cfg.train.weighting == "uncertainty" and cfg.train.epochs == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rows": 99}, "rows"),
        ({"rows": 1000.0}, "rows"),
        ({"seed": -1}, "seed"),
        ({"task_correlation": 1.01}, "task_correlation"),
        ({"task_correlation": -1.5}, "task_correlation"),
        ({"task_correlation": math.nan}, "task_correlation"),
        ({"rows_per_file": 0}, "rows_per_file"),
        ({"row_group_size": 0}, "row_group_size"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(RankerError, match=f"^{name}:"):
        write_synthetic(tmp_path / "d", **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(RankerError, match="^out_dir:.*notes.txt"):
        write_synthetic(tmp_path, rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_refuses_to_replace_a_users_folder_laid_out_like_its_output(tmp_path: Path) -> None:
    """config.yaml + train/val/test is also how users lay out their own data: only a config
    with synth's header and splits of synth's part files are replaced."""
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "my-logs.parquet").write_bytes(b"PAR1")
    (out / "config.yaml").write_text("# my config\n")
    with pytest.raises(RankerError, match=r"^out_dir:.*config.yaml \(not written by ranker synth\), train/my-logs.parquet"):
        write_synthetic(out, rows=100)
    write_synthetic(tmp_path / "ours", rows=100)
    (tmp_path / "ours" / "val" / "extra.parquet").write_bytes(b"PAR1")  # a user's file added to synth's output
    with pytest.raises(RankerError, match="^out_dir:.*val/extra.parquet"):
        write_synthetic(tmp_path / "ours", rows=100)
    assert (out / "config.yaml").read_text() == "# my config\n" and (tmp_path / "ours" / "val" / "extra.parquet").exists()


def test_replaces_earlier_output_only_on_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "d"
    write_synthetic(out, rows=1_000)
    write_synthetic(out, rows=2_000)
    assert _read(out / "train").num_rows == 1_600
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp or backup folders left

    def boom(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_split", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic(out, rows=5_000)
    assert _read(out / "train").num_rows == 1_600  # the earlier output is intact
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
