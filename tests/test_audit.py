"""``ranker audit``: clean on the synthetic logs, an injected leak named by feature and task,
correlation and temporal shifts on hand-made data, label counts against a direct count, the
CLI's table, JSON and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from ranker.audit import LEAK_AUC, _auc_from_hist, audit
from ranker.cli import main
from ranker.config import load_config
from ranker.training.synth import write_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("asynth") / "logs", rows=100_000, seed=0, task_correlation=0.5)


def _with_leaks(synth: Path, root: Path) -> Path:
    """The synthetic logs plus ctcvr = click x conversion and a noisy copy of watch_seconds as features."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        for f in sorted((synth.parent / split).glob("*.parquet")):
            t = pq.read_table(f)
            ctcvr = pc.multiply(t["click"], t["conversion"])
            watch = t["watch_seconds"].to_numpy() * np.exp(rng.normal(0, 0.01, t.num_rows))
            pq.write_table(t.append_column("ctcvr", ctcvr).append_column("watch_copy", pa.array(watch)), root / split / f.name)
    raw = yaml.safe_load(synth.read_text())
    raw["features"] += [{"name": "ctcvr", "type": "categorical", "buckets": 4, "dim": 2},
                        {"name": "watch_copy", "type": "dense", "transform": "log1p"}]
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_synthetic_logs_are_clean(synth: Path) -> None:
    findings = audit(load_config(synth))
    assert [f for f in findings if f.severity != "info"] == []
    kinds = {f.kind for f in findings}
    assert {"labels", "leakage", "label_correlation"} <= kinds
    best = {f.task: f for f in findings if f.kind == "leakage"}
    assert set(best) == {"ctr", "cvr", "watch"} and all(0.5 < f.value < LEAK_AUC for t, f in best.items() if t != "watch")


def test_injected_leak_is_an_error_naming_feature_and_task(synth: Path, tmp_path: Path) -> None:
    findings = audit(load_config(_with_leaks(synth, tmp_path)))
    errors = {(f.kind, f.task, f.feature) for f in findings if f.severity == "error"}
    # ctcvr equals conversion wherever cvr is labelled (clicked rows); it says little about ctr
    assert errors == {("leakage", "cvr", "ctcvr"), ("leakage", "watch", "watch_copy")}
    cvr = next(f for f in findings if f.severity == "error" and f.task == "cvr")
    assert cvr.value > 0.999 and "'ctcvr'" in cvr.message and "'cvr'" in cvr.message


def test_cli_json_strict_and_table(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    leaky = _with_leaks(synth, tmp_path / "leaky")
    assert main(["audit", "--config", str(leaky), "--json"]) == 0  # errors, but not --strict
    out = json.loads(capsys.readouterr().out)
    assert out["thresholds"]["leak_auc"] == LEAK_AUC
    for f in out["findings"]:
        assert set(f) == {"kind", "severity", "task", "feature", "value", "message"}
    assert any(f["severity"] == "error" and f["feature"] == "ctcvr" for f in out["findings"])
    assert main(["audit", "--config", str(leaky), "--strict"]) == 3
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:5] == ["severity", "kind", "task", "feature", "value"]
    assert "2 error(s)" in table and f"AUC >= {LEAK_AUC}" in table
    assert main(["audit", "--config", str(synth), "--strict"]) == 0


def _table(n: int, seed: int, copy: bool, t0: float = 0.0, rising: bool = False) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    ts = t0 + np.sort(rng.uniform(0, 1000, n))
    p = 1 / (1 + np.exp(-x)) if not rising else np.where(ts - t0 < 500, 0.1, 0.5)
    a = (rng.random(n) < p).astype(np.int64)
    b = a.copy() if copy else (rng.random(n) < 0.5).astype(np.int64)
    return pa.table({"x": x, "a": a, "b": b, "ts": ts, "name": [f"r{i}" for i in range(n)]})


def _write(root: Path, tables: dict[str, pa.Table], extra: dict | None = None) -> Path:
    for split, t in tables.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(t, root / split / "p.parquet", row_group_size=500)
    cfg = {"data": {s: s for s in tables}, "features": [{"name": "x", "type": "dense"}],
           "tasks": [{"name": "a", "type": "binary", "label": "a"}, {"name": "b", "type": "binary", "label": "b"}], **(extra or {})}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_correlation_shift_between_splits(tmp_path: Path) -> None:
    """b copies a in train but not in val: a warning naming the pair and the split."""
    path = _write(tmp_path, {"train": _table(4000, 0, copy=True), "val": _table(2000, 1, copy=False), "test": _table(2000, 2, copy=True)})
    findings = audit(load_config(path))
    shifts = [f for f in findings if f.kind == "correlation_shift"]
    assert len(shifts) == 1 and shifts[0].task == "a,b" and "on val" in shifts[0].message and shifts[0].severity == "warning"
    assert shifts[0].value == pytest.approx(-1.0, abs=0.1)
    corr = next(f for f in findings if f.kind == "label_correlation")
    assert corr.value == pytest.approx(1.0)


def test_label_counts_match_a_direct_count(tmp_path: Path) -> None:
    tables = {"train": _table(3000, 0, copy=False), "val": _table(1000, 1, copy=False)}
    findings = audit(load_config(_write(tmp_path, tables)))
    for t in ("a", "b"):
        f = next(f for f in findings if f.kind == "labels" and f.task == t and f.severity == "info")
        y = tables["train"][t].to_numpy()
        assert f.value == pytest.approx(y.mean())
        assert f"train: 3,000 labelled of 3,000, positive rate {y.mean():.4g}" in f.message
        assert f"val: 1,000 labelled of 1,000, positive rate {tables['val'][t].to_numpy().mean():.4g}" in f.message


def test_single_class_in_train_is_an_error(tmp_path: Path) -> None:
    t = _table(1000, 0, copy=False)
    t = t.set_column(t.schema.get_field_index("b"), "b", pa.array(np.zeros(1000, dtype=np.int64)))
    findings = audit(load_config(_write(tmp_path, {"train": t, "val": _table(500, 1, copy=False)})))
    err = [f for f in findings if f.severity == "error"]
    assert [(f.kind, f.task) for f in err] == [("labels", "b")] and "single class" in err[0].message


def test_temporal_checks(tmp_path: Path) -> None:
    # a random split (val overlaps train's time range) whose label rate rises over time
    rand = _write(tmp_path / "rand", {"train": _table(4000, 0, copy=False, rising=True), "val": _table(1000, 1, copy=False, rising=True)})
    findings = audit(load_config(rand), time_column="ts")
    warn = [f for f in findings if f.kind == "temporal" and f.severity == "warning"]
    assert any("val:" in f.message and "not a temporal split" in f.message and f.value > 0.5 for f in warn)
    assert any(f.task == "a" and "drifts over train time" in f.message for f in warn)
    assert not any(f.task == "b" for f in warn)  # b's rate is flat
    # a temporal split: val strictly after train; the time column named in the config
    temporal = _write(tmp_path / "temp", {"train": _table(4000, 0, copy=False), "val": _table(1000, 1, copy=False, t0=5000.0)},
                      extra={"audit": {"time_column": "ts"}})
    assert main(["audit", "--config", str(temporal), "--strict"]) == 0
    findings = audit(load_config(temporal), time_column="ts")
    assert [f for f in findings if f.severity != "info"] == []
    assert any(f.kind == "temporal" and f.message.startswith("val: ts 5000") for f in findings)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_timestamp_time_columns_of_any_unit(tmp_path: Path, unit: str) -> None:
    """ns timestamps (pandas' default) lie past 2**53: the checked cast to float raised; the
    ranges are dates, not raw epoch counts printed as 1.70407e+15."""
    def stamped(n: int, seed: int, start: str) -> pa.Table:
        t = _table(n, seed, copy=False).drop_columns(["ts"])
        times = np.datetime64(start, unit) + np.arange(n) * np.timedelta64(60, "s").astype(f"timedelta64[{unit}]")
        return t.append_column("ts", pa.array(times, pa.timestamp(unit, tz="UTC")))
    path = _write(tmp_path, {"train": stamped(2000, 0, "2024-01-01"), "val": stamped(500, 1, "2024-03-01")})
    findings = audit(load_config(path), time_column="ts")
    spans = {f.message.split(":")[0]: f.message for f in findings if f.kind == "temporal" and f.severity == "info"}
    assert spans["train"].startswith("train: ts 2024-01-01 00:00:00 .. 2024-01-02 09:19:00"), spans
    assert spans["val"].startswith("val: ts 2024-03-01 00:00:00 .."), spans
    assert not [f for f in findings if f.kind == "temporal" and f.severity != "info"]


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, {"train": _table(500, 0, copy=False), "val": _table(200, 1, copy=False)})
    assert main(["audit", "--config", str(path), "--time-column", "name"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "time column 'name'" in err and "p.parquet" in err
    assert main(["audit", "--config", str(path), "--time-column", "nope"]) == 2
    assert "missing column 'nope'" in capsys.readouterr().err
    assert main(["audit", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_auc_from_histograms_equals_a_pair_count() -> None:
    rng = np.random.default_rng(0)
    bins = rng.integers(0, 20, 500)
    y = rng.random(500) < (bins / 25)
    pos = np.bincount(bins[y], minlength=20).astype(float)
    neg = np.bincount(bins[~y], minlength=20).astype(float)
    s_pos, s_neg = bins[y][:, None], bins[~y][None, :]
    brute = ((s_pos > s_neg).sum() + 0.5 * (s_pos == s_neg).sum()) / (y.sum() * (~y).sum())
    assert _auc_from_hist(pos, neg) == pytest.approx(brute)
