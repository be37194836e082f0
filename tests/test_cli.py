"""The command line: train/evaluate happy paths and every user error -> one line, exit 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ranker.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def copy_logs(tiny_logs: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "logs"
    shutil.copytree(tiny_logs.parent, dst)
    return dst / "config.yaml"


def edit(cfg_path: Path, fn) -> Path:
    raw = yaml.safe_load(cfg_path.read_text())
    fn(raw)
    cfg_path.write_text(yaml.safe_dump(raw))
    return cfg_path


def test_evaluate_prints_the_same_metrics_as_training(tiny_bundle: Path, tiny_logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tiny_logs.parent / "test"), "--json"], capsys)
    assert code == 0
    got = json.loads(out)["metrics"]
    want = json.loads((tiny_bundle / "metrics.json").read_text())["test"]
    for task in ("ctr", "cvr", "watch"):
        for metric, value in want[task].items():
            assert got[task][metric] == pytest.approx(value, rel=1e-6)
    code, out, _ = run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tiny_logs.parent / "test")], capsys)
    assert code == 0 and "ctr" in out and "auc=" in out


def test_evaluate_json_is_strict_when_a_metric_is_undefined(tiny_bundle: Path, tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = pq.read_table(tiny_logs.parent / "test")
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array([0] * t.num_rows, t.schema.field("click").type))
    pq.write_table(t, tmp_path / "no_clicks.parquet")  # one class only: ctr's AUC is undefined
    code, out, _ = run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "no_clicks.parquet"), "--json"], capsys)
    assert code == 0
    got = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the output"))
    assert got["metrics"]["ctr"]["auc"] is None
    assert isinstance(got["metrics"]["watch"]["rmse"], float)


def test_train_cli_prints_metrics_and_bundle(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(epochs=1))
    code, out, _ = run(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0
    assert "val:" in out and "test:" in out and f"bundle: {tmp_path / 'b'}" in out
    assert (tmp_path / "b" / "model.safetensors").is_file()


def _err(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ranker: error: "), err
    assert "Traceback" not in err
    return lines[0]


CONFIG_ERRORS = {
    "unknown_key": (lambda r: r["train"].update(epoch=3), r"train\.epoch: unknown key"),
    "bad_value": (lambda r: r["train"].update(epochs=0), r"train\.epochs: Input should be greater than 0"),
    "bad_feature_type": (lambda r: r["features"][0].update(type="embedding"), r"features\[user_id\]\.type"),
    "unknown_architecture": (lambda r: r["model"].update(architecture="moe"), r"model\.architecture: unknown architecture 'moe'; valid: shared_bottom, mmoe, ple"),
    "unknown_weighting": (lambda r: r["train"].update(weighting="magic"), r"train\.weighting: unknown weighting 'magic'; valid: static, uncertainty"),
    "missing_train_data": (lambda r: r["data"].update(train="nowhere/*.parquet"), r"data\.train: no Parquet files found at .*nowhere"),
    "label_as_feature": (lambda r: r["features"].append({"name": "click", "type": "dense"}), r"label column 'click'"),
    # pydantic's lax mode would read true as 1
    "flag_as_count": (lambda r: r["train"].update(epochs=True), r"train\.epochs: needs a number, not true"),
    "mask_is_own_label": (lambda r: r["tasks"][0].update(mask=r["tasks"][0]["label"]), r"'mask' is its own label column 'click'"),
    "cross_rank_alone": (lambda r: r["model"].update(cross_rank=4), r"cross_rank: applies to cross layers only"),
    # sizes past any address space (hundreds of TiB): torch's allocator refuses them on any machine
    "tower_too_wide": (lambda r: r["model"].update(tower_dims=[10**12]), r"model: its parameters do not fit in memory \(check model\.tower_dims\[0\]\)"),
    "table_too_large": (lambda r: r["features"][0].update(buckets=10**13), r"do not fit in memory \(check features\[0\]\.(buckets|dim) \(user_id\)\)"),
    # an empty string switched the key off without a word (cvr trained on every row)
    "empty_mask": (lambda r: r["tasks"][1].update(mask=""), r"tasks\[cvr\]\.mask: String should have at least 1 character"),
    "empty_test_path": (lambda r: r["data"].update(test=""), r"data\.test: String should have at least 1 character"),
    "negative_seed": (lambda r: r["train"].update(seed=-1), r"train\.seed: Input should be greater than or equal to 0"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_config_errors_exit_2_naming_the_key(case: str, tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fn, pattern = CONFIG_ERRORS[case]
    cfg = edit(copy_logs(tiny_logs, tmp_path), fn)
    line = _err(*run(["train", "--config", str(cfg), "--out", str(tmp_path / "b")], capsys)[::2])
    assert re.search(pattern, line), line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("key", "where"), [("checkpoint", "b"), ("checkpoint", "b/ck"), ("log_dir", "b"), ("log_dir", "b/tb")])
def test_checkpoints_or_logs_inside_out_are_refused_before_training(key: str, where: str, tiny_logs: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """They were found only when the bundle write met them, after the whole run."""
    value = {"dir": str(tmp_path / where), "every_steps": 1} if key == "checkpoint" else str(tmp_path / where)
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update({key: value}))
    line = _err(*run(["train", "--config", str(cfg), "--out", str(tmp_path / "b")], capsys)[::2])
    name = "train.checkpoint.dir" if key == "checkpoint" else "train.log_dir"
    assert line.startswith(f"ranker: error: {name}: ") and ("is --out" if where == "b" else "is inside --out") in line, line
    assert not (tmp_path / "b").exists()


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was found at the first checkpoint (every_minutes in), as a FileNotFoundError traceback."""
    (tmp_path / "afile").write_text("x")
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(checkpoint={"dir": str(tmp_path / "afile" / "ck"), "every_minutes": 60}))
    line = _err(*run(["train", "--config", str(cfg), "--out", str(tmp_path / "b")], capsys)[::2])
    assert line.startswith("ranker: error: train.checkpoint.dir: ") and "cannot be written" in line, line


@pytest.mark.parametrize("lr", [10.0, 1e6])
def test_a_diverged_run_is_one_line_and_writes_no_bundle(lr: float, tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Weights gone NaN (lr 1e6) crashed the val pass with a traceback; huge but finite ones
    (lr 10) wrote a bundle scoring watch as inf, which serving then refused to load."""
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(lr=lr, epochs=1))
    code, _, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]  # after the run's log lines
    assert line.startswith("ranker: error: train: the model") and re.search(r"scores [\d,]+ rows of task '\w+' as NaN or infinite: training diverged; lower train\.lr", line), line
    assert not (tmp_path / "b").exists()


def test_config_files_that_yaml_reads_loosely_are_errors(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A repeated key kept the last one silently (a second train: block dropped the first's
    settings); bytes that are not UTF-8 gave a traceback; a folder was "not found"."""
    cfg = copy_logs(tiny_logs, tmp_path)
    dup = tmp_path / "dup.yaml"
    dup.write_text(cfg.read_text() + "train:\n  epochs: 1\n")
    line = _err(*run(["train", "--config", str(dup), "--out", str(tmp_path / "b")], capsys)[::2])
    assert re.search(r"dup\.yaml: not valid YAML \(duplicate key 'train' at line \d+\)$", line), line
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00x")
    line = _err(*run(["train", "--config", str(tmp_path / "bin.yaml"), "--out", str(tmp_path / "b")], capsys)[::2])
    assert line.endswith("bin.yaml: not valid YAML (not UTF-8 text: byte 0)"), line
    line = _err(*run(["train", "--config", str(tmp_path), "--out", str(tmp_path / "b")], capsys)[::2])
    assert line.endswith(": is a folder; --config takes the YAML file"), line


def _rewrite_train(cfg: Path, table: pa.Table) -> Path:
    train = cfg.parent / "train"
    shutil.rmtree(train)
    train.mkdir()
    pq.write_table(table, train / "bad.parquet")
    return train / "bad.parquet"


def _train_table(cfg: Path) -> pa.Table:
    return pq.read_table(cfg.parent / "train")


DATA_ERRORS = {
    "missing_column": (lambda t: t.drop_columns(["price"]), r"bad\.parquet: missing column 'price'"),
    "wrong_column_type": (lambda t: t.set_column(t.schema.get_field_index("category"), "category", pa.array([1.5] * t.num_rows)), r"bad\.parquet: column 'category' has type double"),
    "empty_data": (lambda t: t.slice(0, 0), r"data\.train: .* holds no rows"),
    "label_outside_0_1": (lambda t: t.set_column(t.schema.get_field_index("click"), "click", pa.array([2] * t.num_rows, pa.int64())), r"bad\.parquet: column 'click' has value 2; binary task 'ctr' needs 0 or 1"),
    # a sentinel past 2**53 (here INT64_MIN): the checked cast to float raised a traceback
    "huge_int_label": (lambda t: t.set_column(t.schema.get_field_index("click"), "click", pa.array([-(2**63)] + [0] * (t.num_rows - 1), pa.int64())),
                       r"bad\.parquet: column 'click' has value -9\.22337e\+18; binary task 'ctr' needs 0 or 1"),
    "infinite_label": (lambda t: t.set_column(t.schema.get_field_index("watch_seconds"), "watch_seconds", pa.array([float("inf")] * t.num_rows)),
                       r"bad\.parquet: column 'watch_seconds' has value inf; task 'watch' needs finite labels"),
    "negative_log1p_label": (lambda t: t.set_column(t.schema.get_field_index("watch_seconds"), "watch_seconds", pa.array([-3.0] * t.num_rows)),
                             r"bad\.parquet: column 'watch_seconds' has value -3; task 'watch' learns log1p\(label\), which needs labels >= 0"),
    "string_label": (lambda t: t.set_column(t.schema.get_field_index("watch_seconds"), "watch_seconds", pa.array(["x"] * t.num_rows)), r"label column 'watch_seconds' has type string"),
    # no clicks: cvr (masked by click) has no row to learn from
    "no_labelled_rows": (lambda t: t.set_column(t.schema.get_field_index("click"), "click", pa.array([0] * t.num_rows, pa.int64())),
                         r"data\.train: task 'cvr' has no labelled rows in column 'conversion' where 'click' is 1"),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_data_errors_exit_2_naming_file_and_column(case: str, tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fn, pattern = DATA_ERRORS[case]
    cfg = copy_logs(tiny_logs, tmp_path)
    _rewrite_train(cfg, fn(_train_table(cfg)))
    line = _err(*run(["train", "--config", str(cfg), "--out", str(tmp_path / "b")], capsys)[::2])

    assert re.search(pattern, line), line


def test_missing_config_and_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _err(*run(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "b")], capsys)[::2])
    assert "nope.yaml: config file not found" in line
    line = _err(*run(["evaluate", "--bundle", str(tmp_path / "nob"), "--data", str(tmp_path)], capsys)[::2])
    assert "nob: bundle folder not found" in line
    (tmp_path / "bad.yaml").write_text("data: [")
    line = _err(*run(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "b")], capsys)[::2])
    assert "bad.yaml: not valid YAML" in line


def test_evaluate_on_data_without_labels(tiny_bundle: Path, tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file lacking some label columns is scored on the tasks it can be (the same figures
    as on the whole file), the others named as skipped; one without any is an error."""
    full = pq.read_table(tiny_logs.parent / "val")
    pq.write_table(full, tmp_path / "all.parquet")
    pq.write_table(full.drop_columns(["conversion"]), tmp_path / "no_conversion.parquet")
    code, out, _ = run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "all.parquet"), "--json"], capsys)
    want = json.loads(out)["metrics"]
    code, out, _ = run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "no_conversion.parquet"), "--json"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["skipped"] == {"cvr": "no column 'conversion'"} and set(got["metrics"]) == {"ctr", "watch"}
    for task in ("ctr", "watch"):
        assert got["metrics"][task] == pytest.approx(want[task], rel=1e-9)
    code, out, _ = run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "no_conversion.parquet")], capsys)
    assert code == 0 and "cvr          skipped: no column 'conversion'" in out
    pq.write_table(full.drop_columns(["conversion", "click", "watch_seconds"]), tmp_path / "nolabel.parquet")
    line = _err(*run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "nolabel.parquet")], capsys)[::2])
    assert "nolabel.parquet holds none of the bundle's label columns (click, conversion, watch_seconds)" in line


def test_console_script_exits_2_without_traceback(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "ranker.cli", "train", "--config", str(tmp_path / "x.yaml"), "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"ranker: error: {tmp_path / 'x.yaml'}: config file not found"
    p = subprocess.run([sys.executable, "-m", "ranker.cli", "train"], capture_output=True, text=True)
    assert p.returncode == 2 and "--config" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_evaluate_refuses_data_whose_ids_changed_kind(tiny_bundle: Path, tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = pq.read_table(tiny_logs.parent / "val")
    t = t.set_column(t.schema.get_field_index("user_id"), "user_id", t.column("user_id").cast(pa.string()))
    pq.write_table(t, tmp_path / "strings.parquet")
    line = _err(*run(["evaluate", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "strings.parquet")], capsys)[::2])
    assert "strings.parquet: feature 'user_id' holds str values but was trained on int values" in line


def test_a_later_file_of_another_kind_is_refused_naming_it(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every file's schema is checked, not only the first's: user ids as digit strings in a
    second file would hash into other buckets than the first file's integers."""
    cfg = copy_logs(tiny_logs, tmp_path)
    second = sorted((cfg.parent / "train").glob("*.parquet"))[1]
    t = pq.read_table(second)
    pq.write_table(t.set_column(t.schema.get_field_index("user_id"), "user_id", t.column("user_id").cast(pa.string())), second)
    for cmd in (["train", "--config", str(cfg), "--out", str(tmp_path / "b")], ["audit", "--config", str(cfg)]):
        line = _err(*run(cmd, capsys)[::2])
        assert f"{second}: feature 'user_id' holds str values but was trained on int values" in line, line


def _no_clicks_in_val(cfg: Path) -> tuple[Path, pa.Table]:
    """Set every click of the config's val file to 0 (one class: ctr's AUC is undefined there,
    and cvr, masked by click, has no labelled row); returns the file and its table before."""
    val = next((cfg.parent / "val").glob("*.parquet"))
    t = pq.read_table(val)
    pq.write_table(t.set_column(t.schema.get_field_index("click"), "click", pa.array([0] * t.num_rows, pa.int64())), val)
    return val, t


def test_the_monitor_is_judged_by_its_own_metric(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One class in val: ctr's AUC is undefined there but its log loss is not (it was refused
    all the same), and "mean" says which tasks it leaves out instead of dropping them unseen."""
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(epochs=1, monitor="ctr.logloss"))
    _no_clicks_in_val(cfg)
    code, out, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0 and "warning" not in err, err
    cfg = edit(cfg, lambda r: r["train"].update(monitor="mean"))
    code, out, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "c"), "--quiet"], capsys)
    assert code == 0, err
    assert "warning: train.monitor 'mean' leaves out 'ctr', 'cvr': undefined on the val split" in err, err


def test_an_undefined_val_monitor_is_an_error_naming_the_split(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(epochs=2, monitor="ctr.auc"))
    val, t = _no_clicks_in_val(cfg)
    code, _, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]  # after the fit pass's log line, before any epoch
    assert line.startswith("ranker: error: data.val: train.monitor 'ctr.auc' is undefined on the val split: task(s) 'ctr' have"), line
    assert "epoch 1" not in err and not (tmp_path / "b").exists()
    # a bad label value in val (or test) is found before training too, naming the file
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array([2] + [0] * (t.num_rows - 1), pa.int64()))
    pq.write_table(t, val)
    code, _, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 2 and "epoch 1" not in err, err
    assert err.strip().splitlines()[-1] == f"ranker: error: {val}: column 'click' has value 2; binary task 'ctr' needs 0 or 1", err


def test_out_that_is_not_a_bundle_is_refused_before_training(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--out`` is replaced whole: a folder holding anything but a bundle (here the data and
    config themselves) is refused, as is a path through a file, and nothing is touched."""
    cfg = copy_logs(tiny_logs, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = _err(*run(["train", "--config", str(cfg), "--out", str(cfg.parent)], capsys)[::2])
    assert f"--out: {cfg.parent} holds config.yaml, test, train, ..., so it is not a ranker bundle" in line, line
    line = _err(*run(["train", "--config", str(cfg), "--out", str(cfg / "b")], capsys)[::2])
    assert f"--out: {cfg / 'b'} cannot be created: {cfg} is a file" in line, line
    line = _err(*run(["train", "--config", str(cfg), "--out", str(cfg)], capsys)[::2])
    assert f"--out: {cfg} exists and is not a folder" in line, line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bundles_are_readable_by_other_users_and_replace_earlier_bundles(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from ranker.files import umask

    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(epochs=1))
    out = tmp_path / "b"
    for _ in range(2):  # the second run replaces the first's bundle
        code, _, err = run(["train", "--config", str(cfg), "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's owner-only 0700
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")], "a temporary folder was left behind"
    assert os.access(out / "manifest.json", os.R_OK)


def test_a_fresh_run_refuses_a_checkpoint_folder_of_an_earlier_run(tiny_logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pruning keeps the highest steps whoever wrote them, so a fresh run into an earlier run's
    checkpoints would delete its own as it wrote them; it must say so and stop instead."""
    ck = tmp_path / "ck"
    cfg = edit(copy_logs(tiny_logs, tmp_path), lambda r: r["train"].update(epochs=1, checkpoint={"dir": str(ck), "every_steps": 1000}))
    code, _, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0, err
    kept = sorted(ck.iterdir())
    assert kept
    line = _err(*run(["train", "--config", str(cfg), "--out", str(tmp_path / "c"), "--quiet"], capsys)[::2])
    assert f"train.checkpoint.dir: {ck} holds an earlier run's checkpoints (newest {kept[-1].name}); pass --resume" in line, line
    assert sorted(ck.iterdir()) == kept and not (tmp_path / "c").exists()
    code, _, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "c"), "--quiet", "--resume"], capsys)
    assert code == 0, err
