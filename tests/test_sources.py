"""Multi-source training: tasks reading their own logs, the task sampler, per-task validation,
two ranks and exact resume over several sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from ranker.config import TaskSampling, load_config, parse_config
from ranker.errors import RankerError
from ranker.training.checkpoint import checkpoints, load_latest
from ranker.training.data import ParquetSource, resolve_files
from ranker.training.sources import (
    SAMPLERS,
    plan_steps,
    quotas,
    sampling_rates,
    schedule,
    sub_batches,
    task_sources,
)
from ranker.training.trainer import Trainer
from tests.datagen import CONFIG, make_table, write_logs
from tests.test_distributed import (
    SMALL,
    _cli,
    _env,
    _kill_after_checkpoint,
    _torchrun,
    _train,
    _weights,
)


# ----- the sampler ---------------------------------------------------------------------------------
def test_rates_follow_each_strategy_formula() -> None:
    rows = np.array([80_000, 15_000, 5_000])
    assert set(SAMPLERS) == {"proportional", "uniform", "temperature"}
    assert sampling_rates(rows, TaskSampling()) == pytest.approx(rows / rows.sum())
    assert sampling_rates(rows, TaskSampling(strategy="uniform")) == pytest.approx([1 / 3] * 3)
    for t in (1.0, 2.0, 8.0):
        want = rows ** (1 / t) / (rows ** (1 / t)).sum()
        assert sampling_rates(rows, TaskSampling(strategy="temperature", temperature=t)) == pytest.approx(want, rel=1e-12)
    hot = sampling_rates(rows, TaskSampling(strategy="temperature", temperature=1e6))  # T -> inf: uniform
    assert hot == pytest.approx([1 / 3] * 3, rel=1e-4)
    huge = sampling_rates([10**15, 10**3], TaskSampling(strategy="temperature", temperature=3.0))  # no overflow
    assert huge == pytest.approx([1e5 / (1e5 + 10), 10 / (1e5 + 10)])


def test_quotas_and_schedule() -> None:
    rates = np.array([0.62, 0.27, 0.11])
    q = quotas(rates, 100)
    assert q.tolist() == [62, 27, 11] and quotas(rates, 7).sum() == 7
    assert quotas(np.array([0.5, 0.5]), 3).tolist() == [2, 1]  # tie to the lower index
    a = schedule(rates, 100, seed=3, epoch=0)
    assert np.bincount(a, minlength=3).tolist() == [62, 27, 11]  # exactly the quotas per epoch
    assert np.array_equal(a, schedule(rates, 100, seed=3, epoch=0))  # every rank alike
    assert not np.array_equal(a, schedule(rates, 100, seed=3, epoch=1))  # reshuffled per epoch
    assert not np.array_equal(a, np.sort(a))  # interleaved, not source after source
    assert schedule(np.array([1.0]), 5, seed=3, epoch=0).tolist() == [0] * 5


def test_sub_batches_and_step_plans() -> None:
    rates = np.array([0.62, 0.27, 0.11])
    assert sub_batches(rates, 100).tolist() == [62, 27, 11]
    assert sub_batches(rates, 1000).sum() == 1000
    # a source the rounding would leave out still gets a row, taken from the largest
    assert sub_batches(np.array([0.998, 0.001, 0.001]), 64).tolist() == [62, 1, 1]
    with pytest.raises(RankerError, match=r"train\.batch_size: 2 rows cannot hold a sub-batch of each of 3 sources"):
        sub_batches(rates, 2)
    rows = plan_steps(rates, 50, seed=1, epoch=0, mix="rows")
    assert rows.shape == (50, 3) and rows.all()  # every step draws on every source
    one = plan_steps(rates, 100, seed=1, epoch=0, mix="batches")
    assert (one.sum(1) == 1).all() and one.sum(0).tolist() == [62, 27, 11]
    assert np.array_equal(one.argmax(1), schedule(rates, 100, seed=1, epoch=0))


def test_sampling_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {"data": {"train": "t", "val": "v"}, **CONFIG}
    for sampling, msg in [({"strategy": "nope"}, "train.task_sampling.strategy: unknown strategy 'nope'"),
                          ({"strategy": "temperature"}, "train.task_sampling: temperature"),
                          ({"temperature": 2.0}, "train.task_sampling: temperature"),
                          ({"strategy": "temperature", "temperature": 0}, "train.task_sampling.temperature"),
                          ({"mix": "pooled"}, "train.task_sampling.mix: Input should be 'rows' or 'batches'")]:
        raw = {**base, "train": {**base["train"], "task_sampling": sampling}}
        with pytest.raises(RankerError, match=msg.replace("[", r"\[").replace(".", r"\.")):
            parse_config(raw, "c.yaml")
    tasks = [{"name": "ctr", "type": "binary", "label": "click"},
             {"name": "cvr", "type": "binary", "label": "conversion", "data": {"train": "conv", "val": "conv_val"}},
             {"name": "ctcvr", "type": "binary", "product": ["ctr", "cvr"]}]
    with pytest.raises(RankerError, match="product factors ctr, cvr read different data"):
        parse_config({**base, "tasks": tasks}, "c.yaml")


# ----- two sources on the tiny logs ------------------------------------------------------------------
def split_logs(root: Path, rows: int = 3000, conv_val_share: float = 1.0) -> Path:
    """The tiny logs cut into a click log (no conversion column) and a conversion log (clicked
    rows only, no click column); cvr reads the latter. Returns the config path."""
    write_logs(root, rows=rows)
    for split in ("train", "val", "test"):
        (root / "clicks" / split).mkdir(parents=True)
        (root / "conv" / split).mkdir(parents=True)
        for f in sorted((root / split).glob("*.parquet")):
            t = pq.read_table(f)
            pq.write_table(t.drop_columns(["conversion"]), root / "clicks" / split / f.name, row_group_size=300)
            conv = t.filter(pc.equal(t["click"], 1)).drop_columns(["click"])
            if split == "val":
                conv = conv.slice(0, int(conv.num_rows * conv_val_share))
            pq.write_table(conv, root / "conv" / split / f.name, row_group_size=100)
    raw = yaml.safe_load((root / "config.yaml").read_text())
    raw["data"] = {"train": "clicks/train", "val": "clicks/val", "test": "clicks/test"}
    for t in raw["tasks"]:
        if t["name"] == "cvr":
            t.pop("mask")  # the conversion log holds clicked rows only
            t["data"] = {"train": "conv/train", "val": "conv/val", "test": "conv/test"}
    raw["train"] = {**raw["train"], "threads": 1, "diagnostics_batches": 2, "epochs": 2}
    raw["model"] = {**raw["model"], **SMALL}
    path = root / "multi.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _with(cfg: Path, name: str, **train: object) -> Path:
    raw = yaml.safe_load(cfg.read_text())
    raw["train"] = {**raw["train"], **train}
    out = cfg.with_name(name)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))


def test_each_task_trains_and_is_validated_on_its_own_source(tmp_path: Path) -> None:
    """The default mix (rows): every batch holds a sub-batch of each log at the proportional
    rates, so each task's loss sees its own rows on every step."""
    cfg_path = split_logs(tmp_path, conv_val_share=0.5)
    cfg = load_config(cfg_path)
    assert cfg.train.task_sampling.mix == "rows"
    srcs = task_sources(cfg)
    assert [(s.name, [t.name for t in s.tasks]) for s in srcs] == [("data", ["ctr", "watch"]), ("tasks[cvr].data", ["cvr"])]
    trainer = Trainer(cfg, progress=False, log=lambda s: None)
    seen: list[tuple[int, int, int, list[str]]] = []  # rows, ctr labels, cvr labels, losses per step
    trainer.step_hooks.append(lambda model, batch, losses, step: seen.append((
        len(batch["cat"]), int((~batch["label:ctr"].isnan()).sum()), int((~batch["label:cvr"].isnan()).sum()), sorted(losses))))
    metrics = trainer.run(tmp_path / "b").metrics
    # cvr: measured on its own (half) val log, ctr and watch on the click log
    assert metrics["val"]["cvr"]["count"] == _rows(tmp_path / "conv" / "val")
    assert metrics["val"]["ctr"]["count"] == _rows(tmp_path / "clicks" / "val") == 750
    assert metrics["test"]["cvr"]["count"] == _rows(tmp_path / "conv" / "test")
    assert list(metrics["val"]) == ["ctr", "cvr", "watch"]
    assert metrics["val"]["ctr"]["auc"] > 0.6 and metrics["val"]["cvr"]["auc"] > 0.55
    # the epoch: as many rows as one pass over both logs, every step drawing on both
    n_click, n_conv = _rows(tmp_path / "clicks" / "train"), _rows(tmp_path / "conv" / "train")
    b_click, b_conv = sub_batches(np.array([n_click, n_conv]) / (n_click + n_conv), 256).tolist()
    assert b_conv >= 10 and b_click + b_conv == 256
    steps = -(-(-(-n_click // b_click) * b_click + -(-n_conv // b_conv) * b_conv) // 256)
    for h in metrics["history"]:
        got = h["sources"]
        assert got["data"]["batches"] == got["tasks[cvr].data"]["batches"] == steps
        assert (got["data"]["rows"], got["tasks[cvr].data"]["rows"]) == (b_click, b_conv)
        assert got["tasks[cvr].data"]["rate"] == pytest.approx(n_conv / (n_click + n_conv))
    assert len(seen) == 2 * steps and all(s[3] == ["ctr", "cvr", "watch"] for s in seen)
    # a full step: b_click rows labelled for ctr, b_conv for cvr (a pass's last sub-batch may be short)
    assert sum(s[1:3] == (b_click, b_conv) and s[0] == 256 for s in seen) >= len(seen) - 4
    assert all(s[1] <= b_click and 0 < s[2] <= b_conv and s[0] == s[1] + s[2] for s in seen)


def test_batches_mix_draws_one_source_per_step(tmp_path: Path) -> None:
    cfg_path = _with(split_logs(tmp_path), "batches.yaml", task_sampling={"strategy": "proportional", "mix": "batches"})
    trainer = Trainer(load_config(cfg_path), progress=False, log=lambda s: None)
    seen: list[list[str]] = []
    trainer.step_hooks.append(lambda model, batch, losses, step: seen.append(sorted(losses)))
    metrics = trainer.run(tmp_path / "b").metrics
    # the epoch: one pass over both sources' batches, split by the proportional rates
    n_click, n_conv = _rows(tmp_path / "clicks" / "train"), _rows(tmp_path / "conv" / "train")
    steps = -(-n_click // 256) + -(-n_conv // 256)
    for h in metrics["history"]:
        got = h["sources"]
        assert got["data"]["batches"] + got["tasks[cvr].data"]["batches"] == steps
        assert got["tasks[cvr].data"]["batches"] == quotas(np.array([n_click, n_conv]) / (n_click + n_conv), steps)[1]
        assert got["tasks[cvr].data"]["rows"] == 256
    # a step's loss covers one source's tasks
    assert sorted({tuple(s) for s in seen}) == [("ctr", "watch"), ("cvr",)]
    assert sum(s == ["cvr"] for s in seen) == 2 * got["tasks[cvr].data"]["batches"]


def test_one_source_trains_alike_under_either_mix(tmp_path: Path) -> None:
    """With one source both mixes are the single-source trainer: byte-identical weights."""
    write_logs(tmp_path, rows=1500)
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["model"] = {**raw["model"], **SMALL}
    raw["train"] = {**raw["train"], "threads": 1, "epochs": 1, "diagnostics_batches": 0}
    for mix in ("rows", "batches"):
        raw["train"]["task_sampling"] = {"mix": mix}
        (tmp_path / f"{mix}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        _train(tmp_path / f"{mix}.yaml", tmp_path / mix)
    a, b = _weights(tmp_path / "rows"), _weights(tmp_path / "batches")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_a_feature_column_missing_in_one_source_is_a_one_line_error(tmp_path: Path) -> None:
    cfg_path = split_logs(tmp_path)
    bad = tmp_path / "conv" / "train" / "part-1.parquet"
    pq.write_table(pq.read_table(bad).drop_columns(["price"]), bad)
    with pytest.raises(RankerError, match=r"conv/train/part-1\.parquet: missing column 'price' \(tasks\[cvr\]\.data\.train\)"):
        _train(cfg_path, tmp_path / "b")
    run = subprocess.run([sys.executable, "-m", "ranker", "train", "--config", str(cfg_path), "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, env=_env(), timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "part-1.parquet: missing column 'price'" in lines[0]


def test_folders_and_globs_read_partitioned_layouts_whole(tmp_path: Path) -> None:
    """A folder is read with its sub-folders (Hive-style partitions), ``**`` matches any depth
    and a glob matching folders reads them; writers' ``_``/``.`` entries are skipped. Each
    spelling reads every row (before: 1/3 or none, without a word)."""
    t = make_table(900, 0)
    root = tmp_path / "train"
    for i, part in enumerate(["date=2024-01-01/hour=00", "date=2024-01-02", "."]):
        (root / part).mkdir(parents=True, exist_ok=True)
        pq.write_table(t.slice(300 * i, 300), root / part / "p.parquet")
    (root / "_temporary").mkdir()
    pq.write_table(t.slice(0, 10), root / "_temporary" / "p.parquet")  # a writer's unfinished file
    (root / ".p.parquet.crc").write_bytes(b"crc")
    for spec in [root, f"{root}/**/*.parquet", f"{root}/date=*", f"{root}/*"]:
        rows = ParquetSource(str(spec), "data.train", ["price"]).num_rows
        assert rows == (600 if str(spec).endswith("date=*") else 900), spec
    assert len(resolve_files(f"{root}/**/*.parquet", "data.train")) == 3


def test_a_file_read_by_two_splits_is_refused(tmp_path: Path) -> None:
    path = write_logs(tmp_path / "logs", rows=400)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["train"] = "."  # the folder above val/ and test/
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    with pytest.raises(RankerError, match=r"^data\.val: .*val/part-0\.parquet is also read by data\.train"):
        task_sources(cfg)


@pytest.mark.parametrize("mix", ["rows", "batches"])
def test_two_ranks_train_on_two_sources(tmp_path: Path, mix: str) -> None:
    cfg = _with(split_logs(tmp_path), "temp.yaml", task_sampling={"strategy": "temperature", "temperature": 2.0, "mix": mix})
    run = _torchrun(cfg, tmp_path / "two", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)
    assert two["throughput"]["ranks"] == 2
    assert two["val"]["ctr"]["count"] == 750 and two["val"]["cvr"]["count"] == _rows(tmp_path / "conv" / "val")
    assert two["val"]["ctr"]["auc"] > 0.6
    # temperature 2 oversamples the small conversion log: more than its share of rows
    conv = two["history"][0]["sources"]["tasks[cvr].data"]
    n_click, n_conv = _rows(tmp_path / "clicks" / "train"), _rows(tmp_path / "conv" / "train")
    assert conv["rate"] == pytest.approx(n_conv**0.5 / (n_conv**0.5 + n_click**0.5)) and conv["rate"] > n_conv / (n_conv + n_click)
    clicks = two["history"][0]["sources"]["data"]
    if mix == "rows":  # each rank's 128 rows split by the rates: the global sub-batches are twice those
        assert [clicks["rows"], conv["rows"]] == [2 * b for b in sub_batches(np.array([1 - conv["rate"], conv["rate"]]), 128).tolist()]
        assert clicks["batches"] == conv["batches"]
    else:
        assert clicks["rows"] == conv["rows"] == 256


@pytest.mark.parametrize("mix", ["rows", "batches"])
def test_sigkill_and_resume_over_two_sources_give_byte_identical_weights(tmp_path: Path, mix: str) -> None:
    """Uniform rates: the conversion log wraps into new passes mid-epoch and the click log
    carries unfinished passes over epoch boundaries, so the cursor of every source and the
    step position must all come back (both mixes)."""
    ck = tmp_path / "ck"
    base = split_logs(tmp_path)
    raw = yaml.safe_load(base.read_text())
    raw["model"]["dropout"] = 0.2
    raw["train"] = {**raw["train"], "epochs": 3, "batch_size": 64, "weighting": "famo", "task_sampling": {"strategy": "uniform", "mix": mix}}
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["train"]["checkpoint"] = {"dir": str(ck), "every_steps": 11, "keep": 2}
    cfg = tmp_path / "ck.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    reference = _train(plain, tmp_path / "ref")
    passes = [h["sources"]["tasks[cvr].data"]["pass"] for h in reference["history"]]
    assert passes[-1] > len(passes)  # the small source went round more often than the epochs

    proc = _cli(cfg, tmp_path / "b")
    _kill_after_checkpoint(proc, ck, 1)
    state = load_latest(ck)
    assert state is not None and set(state["progress"]["sources"]) == {"passes", "batches"}
    proc = _cli(cfg, tmp_path / "b", "--resume")
    _kill_after_checkpoint(proc, ck, 2)
    proc = _cli(cfg, tmp_path / "b", "--resume")
    newest = load_latest(ck)
    _kill_when_newer(proc, ck, newest["progress"]["step"] if newest else 0)
    proc = _cli(cfg, tmp_path / "b", "--resume")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "b")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), "resumed weights differ from the uninterrupted run"
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["val"] == reference["val"] and metrics["history"][-1]["sources"] == reference["history"][-1]["sources"]


def _kill_when_newer(proc: subprocess.Popen, folder: Path, step: int) -> None:
    """SIGKILL once a checkpoint past ``step`` exists (a third interruption, later in the run)."""
    from tests.test_distributed import _kill_when

    def ready() -> bool:
        return any(int(p.name[5:17]) > step + 30 for p in checkpoints(folder))

    _kill_when(proc, ready)


def test_audit_reads_each_task_from_its_own_source(tmp_path: Path) -> None:
    from ranker.audit import audit

    cfg_path = split_logs(tmp_path)  # the click log has no conversion column: cvr is audited on its own log
    labels = {f.task: f.message for f in audit(load_config(cfg_path)) if f.kind == "labels" and f.severity == "info"}
    n = _rows(tmp_path / "conv" / "train")
    assert f"train: {n:,} labelled of {n:,}" in labels["cvr"]
    assert f"train: {_rows(tmp_path / 'clicks' / 'train'):,} labelled of" in labels["ctr"]
