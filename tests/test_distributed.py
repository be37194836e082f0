"""Training at scale on CPU: real torchrun processes on gloo, checkpoints, SIGKILL and --resume,
bounded-memory metrics, autocast precisions, TensorBoard scalars."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ranker.config import load_config
from ranker.errors import RankerError
from ranker.training import evaluation
from ranker.training.checkpoint import checkpoints, load_latest
from ranker.training.data import ParquetSource, Unit, plan_units
from ranker.training.distributed import Collective
from ranker.training.evaluation import TaskAccumulator, histogram_auc
from ranker.training.metrics import task_metrics
from ranker.training.trainer import Trainer
from tests.datagen import make_table, write_logs
from tests.promhelpers import free_port

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
CPU = Collective.single(torch.device("cpu"))
SMALL = {"experts": 2, "expert_dims": [16], "tower_dims": [8], "shared_experts": 1, "specific_experts": 1}


def _env() -> dict[str, str]:
    # one intra-op thread per process: 2 ranks share the cores without oversubscribing, and
    # runs are bit-for-bit repeatable
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(cfg: Path, out: Path, *extra: str, nproc: int = 2, timeout: float = 240, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *flags, "-m", "ranker", "train", "--config", str(cfg), "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _cli(cfg: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ranker", "train", "--config", str(cfg), "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(cmd, env={**_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(cfg: Path, out: Path, timeout: float = 180) -> list[tuple[int, str]]:
    """Ranks 0 and 1 started as two plain processes with torchrun's environment, as two nodes'
    launchers would start them: no agent ends one rank when the other fails, so what each rank
    prints and returns is its own doing. (exit code, stderr) per rank."""
    world = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [_cli(cfg, out, env={**world, "RANK": str(rank)}) for rank in (0, 1)]
    try:
        ranks = []
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            ranks.append((p.returncode, err))
        return ranks
    finally:
        for p in procs:
            p.kill()  # a rank left waiting (the failure this guards against) goes with the test


def _config(root: Path, **train: object) -> Path:
    """The tiny logs with a small model, one thread and the given train.* keys."""
    path = root / "config.yaml"
    if not path.exists():
        write_logs(root, rows=3000)
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {**raw["train"], "threads": 1, "diagnostics_batches": 2, **train}
    raw["model"] = {**raw["model"], **SMALL}
    out = root / f"config-{abs(hash(json.dumps(train, sort_keys=True, default=str))) % 10**8}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _train(cfg: Path, out: Path, resume: bool = False) -> dict:
    return Trainer(load_config(cfg), progress=False, log=lambda s: None).run(out, resume=resume).metrics


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(bundle / "model.safetensors")


# ----- the data plan -----------------------------------------------------------------------


def test_plan_is_disjoint_balanced_and_seeded() -> None:
    units = [Unit(f, g, r) for f, g, r in [(0, 0, 1000), (0, 1, 1000), (0, 2, 400), (1, 0, 900), (1, 1, 100), (2, 0, 600)]]
    for world in (2, 3, 4):
        plan = plan_units(units, world, seed=3, epoch=0)
        rows = [(u.file, u.group, u.start + i) for share in plan for u in share for i in range(u.rows)]
        assert sorted(rows) == sorted((u.file, u.group, i) for u in units for i in range(u.rows))  # every row once
        sizes = [sum(u.rows for u in s) for s in plan]
        assert max(sizes) - min(sizes) <= 1, sizes  # equal shares: no rank's rows sit the epoch out
        pieces = sum(len(s) for s in plan) - len(units)
        assert pieces <= world - 1  # only groups on a boundary are split (and read twice)
        assert plan == plan_units(units, world, seed=3, epoch=0)  # every rank computes the same plan
        assert plan != plan_units(units, world, seed=3, epoch=1)  # reshuffled per epoch
    assert plan_units(units, 1) == [units]  # evaluation: one rank keeps file order
    assert plan_units(units[:1], 3)[0] == [Unit(0, 0, 333)] and plan_units(units[4:5], 200)[0] == []  # fewer rows than ranks


def test_a_split_row_group_reads_only_its_piece(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "a.parquet", row_group_size=4)
    src = ParquetSource(str(tmp_path / "a.parquet"), "data.train", ["x"])
    shares = plan_units(src.units, 3)
    got = [[v for _, rb in src.batches(["x"], units=share) for v in rb.column("x").to_pylist()] for share in shares]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


# ----- bounded-memory metrics ----------------------------------------------------------------


def test_streaming_metrics_equal_exact_ones_and_histogram_auc_keeps_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.3).astype(np.float64)
    p = (1 / (1 + np.exp(-(rng.normal(0, 1, y.size) + 1.5 * y)))).astype(np.float32)  # scores come as float32
    y_masked = np.where(rng.random(y.size) < 0.2, np.nan, y)
    acc = TaskAccumulator("binary")
    for i in range(0, y.size, 3000):
        acc.update(y_masked[i : i + 3000], p[i : i + 3000])
    got, sample = acc.result(CPU)
    keep = ~np.isnan(y_masked)
    want = task_metrics("binary", y_masked[keep], p[keep])
    assert got == pytest.approx(want, rel=1e-9) and "auc_max_error" not in got
    assert np.array_equal(np.sort(sample), np.sort(p.astype(np.float32)))  # under the cap: every score

    monkeypatch.setattr(evaluation, "EXACT_AUC_ROWS", 5_000)  # past the cap: histogram AUC
    monkeypatch.setattr(evaluation, "REFERENCE_SAMPLE", 1_000)
    acc = TaskAccumulator("binary")
    for i in range(0, y.size, 3000):
        acc.update(y_masked[i : i + 3000], p[i : i + 3000])
    approx, sample = acc.result(CPU)
    assert 0 < approx["auc_max_error"] < 1e-3
    assert abs(approx["auc"] - want["auc"]) <= approx["auc_max_error"] + 1e-12
    assert approx["logloss"] == pytest.approx(want["logloss"], rel=1e-9) and sample.size == 1_000
    assert abs(np.median(sample) - np.median(p)) < 0.05  # a uniform sample of all scores

    reg = TaskAccumulator("regression")
    w = rng.lognormal(2, 1, 10_000)
    for i in range(0, w.size, 999):
        reg.update(w[i : i + 999], w[i : i + 999] * 1.1 + 0.5)
    assert reg.result(CPU)[0] == pytest.approx(task_metrics("regression", w, w * 1.1 + 0.5), rel=1e-9)


def test_histogram_auc_against_pair_count() -> None:
    pos, neg = np.array([1, 0, 2, 3]), np.array([2, 1, 1, 0])
    ps = np.repeat(np.arange(4), pos)
    ns = np.repeat(np.arange(4), neg)
    pairs = sum((a > b) + 0.5 * (a == b) for a in ps for b in ns) / (len(ps) * len(ns))
    value, err = histogram_auc(pos, neg)
    assert value == pytest.approx(pairs) and err == pytest.approx(0.5 * (1 * 2 + 2 * 1) / (6 * 4))


# ----- several processes -----------------------------------------------------------------------


# sparse: row-sparse table gradients gathered over ranks; with PCGrad they first reach the
# tables densely (the method's combined direction), with uncertainty straight from the lookups
@pytest.mark.parametrize(("architecture", "weighting", "sparse"), [
    ("shared_bottom", "pcgrad", False), ("mmoe", "mgda", False), ("ple", "gradnorm", False),
    ("mmoe", "pcgrad", True), ("shared_bottom", "uncertainty", True), ("mmoe", "famo", False)])
def test_two_ranks_see_one_process_batches_and_match_its_parameters(tmp_path: Path, architecture: str, weighting: str, sparse: bool) -> None:
    """sharding: batches gives 2 ranks exactly the batches of one process. With a masked task
    (cvr) and a gradient method — PCGrad on the shared parameters (task gradients summed over
    ranks), MGDA-UB and GradNorm on the representation (Gram matrices summed) — the weights
    agree to rounding; so they do with ``sparse_embeddings``, and with FAMO's same-batch
    update (its second forward's losses summed over ranks). The featurizer, fitted on half
    the train rows per rank and merged, is one process's: the same bin edges, the same moments."""
    params = {"famo": {"after_loss": "same_batch"}} if weighting == "famo" else {}
    cfg_path = _config(tmp_path, sharding="batches", weighting=weighting, epochs=2, sparse_embeddings=sparse, weighting_params=params)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["architecture"] = architecture
    raw["features"].append({"name": "price_bins", "column": "price", "type": "dense"})  # piecewise_linear: a sketch
    cfg_path.write_text(yaml.safe_dump(raw))
    one = _train(cfg_path, tmp_path / "one")
    run = _torchrun(cfg_path, tmp_path / "two", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)
    assert two["throughput"]["ranks"] == 2
    fa, fb = (json.loads((tmp_path / d / "manifest.json").read_text())["featurizer"] for d in ("one", "two"))
    assert fa["edges"]["price_bins"] and fb["edges"] == fa["edges"]  # under the sketch's k values: merged exactly
    assert fa["dense_stats"] and fb["dense_stats"].keys() == fa["dense_stats"].keys()
    for k, v in fa["dense_stats"].items():
        assert fb["dense_stats"][k] == pytest.approx(v, rel=1e-9), k
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    for t in ("ctr", "cvr", "watch"):  # val metrics over both ranks' rows
        for m, v in one["val"][t].items():
            assert two["val"][t][m] == pytest.approx(v, rel=1e-3, abs=1e-4), (t, m)


def test_row_group_shards_train_as_well_as_one_process(tmp_path: Path) -> None:
    """Row-group sharding trains as well as one process; the featurizer's fit pass is shared
    too (each rank reads half the train rows)."""
    cfg = _config(tmp_path, weighting="uncertainty", epochs=2)
    one = _train(cfg, tmp_path / "one")
    run = _torchrun(cfg, tmp_path / "two", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)
    assert two["val"]["ctr"]["count"] == one["val"]["ctr"]["count"] == 750  # every val row, once
    for t in ("ctr", "cvr"):
        assert abs(two["val"][t]["auc"] - one["val"][t]["auc"]) < 0.03, t
    assert "featurizer fitted on 3,000 train rows in" in run.stderr and "read once over 2 ranks (1,500/1,500)" in run.stderr


def test_a_bad_label_in_one_ranks_share_stops_every_rank(tmp_path: Path) -> None:
    """The fit pass reads each row group on one rank only: a bad value there must still end
    the whole run with the one-line error, not leave the other rank waiting."""
    root = tmp_path / "logs"
    cfg = _config(root, epochs=1)
    for f in (root / "train").glob("*.parquet"):
        f.unlink()
    table = make_table(2000, 1)
    clicks = table.column("click").to_numpy().copy()
    clicks[1500] = 3  # in the second row group, which plan_units deals to rank 1
    table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(clicks))
    pq.write_table(table, root / "train" / "part-0.parquet", row_group_size=1000)
    src = ParquetSource(str(root / "train"), "data.train", ["click"])
    assert [u.group for u in plan_units(src.units, 2)[1]] == [1]
    # two plain processes: under torchrun its agent may end rank 0 before rank 0 prints
    ranks = _two_processes(cfg, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    msg = "part-0.parquet: column 'click' has value 3"
    for rank, (rc, err) in enumerate(ranks):
        assert rc == 2, (rank, err)  # both ranks exit as the CLI does on a user error
        lines = [ln for ln in err.splitlines() if ln.startswith("ranker: error:")]
        assert len(lines) == 1 and msg in lines[0], (rank, err)  # each rank says it, once
        assert "Traceback" not in err, (rank, err)


def _corrupt_rank_1_share(root: Path) -> Path:
    """Logs whose train file's row group 1 (rank 1's share over 2 ranks) has a corrupt page in
    a column the fit pass never reads (user_id): rank 1 fails in its training share."""
    cfg = _config(root, epochs=1)
    for f in (root / "train").glob("*.parquet"):
        f.unlink()
    path = root / "train" / "part-0.parquet"
    pq.write_table(make_table(2000, 1), path, row_group_size=1000, compression="snappy")
    col = pq.ParquetFile(path).metadata.row_group(1).column(pq.ParquetFile(path).schema_arrow.get_field_index("user_id"))
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + col.total_compressed_size // 3 : start + col.total_compressed_size - 4] = b"\xab" * (
        col.total_compressed_size - 4 - col.total_compressed_size // 3)
    path.write_bytes(bytes(data))
    return cfg


def test_a_rank_failing_mid_epoch_ends_every_rank(tmp_path: Path) -> None:
    """Rank 1 fails in its training share: it had met the others' step all-reduce with the
    closing barrier, and both waited out the 30-minute group timeout without a word. Now it
    exits with its one line, and torchrun ends rank 0 (or rank 0 notices first and says so)."""
    cfg = _corrupt_rank_1_share(tmp_path / "logs")
    run = _torchrun(cfg, tmp_path / "b", timeout=180)
    assert run.returncode != 0 and not (tmp_path / "b").exists()
    assert "part-0.parquet: row group 1 cannot be read" in run.stderr, run.stderr[-3000:]
    # which of the two comes first is a race between torchrun's agent and rank 0's collective
    assert "rank 0: lost the other ranks" in run.stderr or "exitcode  : -15" in run.stderr, run.stderr[-3000:]
    assert "trainer.py" not in run.stderr  # one line per rank, no traceback


def test_a_rank_left_alone_says_the_others_are_gone(tmp_path: Path) -> None:
    """Ranks on different nodes have different launchers, so nobody ends the survivor for it:
    rank 0 must find out itself, from its next collective, and stop with one line rather than
    a gloo traceback."""
    cfg = _corrupt_rank_1_share(tmp_path / "logs")
    (rc0, err0), (rc1, err1) = _two_processes(cfg, tmp_path / "b")
    assert (rc0, rc1) == (2, 2), (err0, err1)
    assert "row group 1 cannot be read" in err1, err1
    lines = [ln for ln in err0.splitlines() if ln.startswith("ranker: error:")]
    assert len(lines) == 1 and "rank 0: lost the other ranks" in lines[0], err0
    assert "Traceback" not in err0 + err1
    assert not (tmp_path / "b").exists()


def test_uneven_files_are_shared_out_evenly(tmp_path: Path) -> None:
    """Four row groups of 650 rows and one of 130 over 2 ranks: the plan splits a group so each
    rank holds 1,365 rows, and no rank's rows sit the epoch out."""
    root = tmp_path / "logs"
    cfg = _config(root, epochs=2, batch_size=128)
    for f in (root / "train").glob("*.parquet"):
        f.unlink()
    pq.write_table(make_table(2600, 1), root / "train" / "big.parquet", row_group_size=650)  # 4 groups
    pq.write_table(make_table(130, 2), root / "train" / "small.parquet")  # 1 small group
    run = _torchrun(cfg, tmp_path / "b", timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sit this epoch out" not in run.stderr and (tmp_path / "b" / "model.safetensors").is_file()
    assert "read once over 2 ranks (1,365/1,365)" in run.stderr  # the featurizer's pass, same plan


# ----- checkpoints and exact resume --------------------------------------------------------------


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished too early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_after_checkpoint(proc: subprocess.Popen, folder: Path, count: int) -> None:
    _kill_when(proc, lambda: len(checkpoints(folder)) >= count)


# cosine: the learning rate changes every step, so a resume must restart at the right one
# sparse: SparseAdam's per-row moments and step count come back from the checkpoint too
# famo with same_batch: the extra forward after each step draws dropout masks too (the
# next_batch default is resumed in test_sources)
@pytest.mark.parametrize(("weighting", "schedule", "sparse"), [("famo", "constant", False), ("pcgrad", "cosine", False),
                                                               ("uncertainty", "constant", True)])
def test_sigkill_and_resume_give_byte_identical_weights(tmp_path: Path, weighting: str, schedule: str, sparse: bool) -> None:
    ck = tmp_path / "ck"
    params = {"famo": {"after_loss": "same_batch"}} if weighting == "famo" else {}
    cfg = _config(tmp_path, weighting=weighting, epochs=3, batch_size=64, checkpoint={"dir": str(ck), "every_steps": 7, "keep": 2},
                  lr_schedule={"type": schedule}, sparse_embeddings=sparse, weighting_params=params)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["dropout"] = 0.2  # the RNG state must come back too
    cfg.write_text(yaml.safe_dump(raw))
    plain = yaml.safe_load(cfg.read_text())
    plain["train"].pop("checkpoint")
    plain_cfg = tmp_path / "plain.yaml"
    plain_cfg.write_text(yaml.safe_dump(plain))
    reference = _train(plain_cfg, tmp_path / "ref")  # uninterrupted, never checkpointed

    proc = _cli(cfg, tmp_path / "b")
    _kill_after_checkpoint(proc, ck, 1)  # mid-epoch 1
    state = load_latest(ck)
    assert state is not None and 0 < state["progress"]["batches"] < 47
    proc = _cli(cfg, tmp_path / "b", "--resume")
    _kill_after_checkpoint(proc, ck, 2)  # again, later on
    proc = _cli(cfg, tmp_path / "b", "--resume")
    # 3000 rows / 64 = 47 steps an epoch: step 94 is the checkpoint after epoch 2's validation
    _kill_when(proc, lambda: (ck / f"step-{94:012d}.pt").exists())
    # a write killed halfway leaves a temporary file; a torn newest checkpoint falls back to the one before
    (ck / ".step-000000099999.pt.tmp123").write_bytes(b"partial")
    newest = checkpoints(ck)[0]
    torn = ck / f"step-{999999:012d}.pt"
    torn.write_bytes(newest.read_bytes()[:1000])
    proc = _cli(cfg, tmp_path / "b", "--resume")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "unreadable" in err
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [h["epoch"] for h in reference["history"]]
    assert metrics["val"] == reference["val"]


def test_resume_refuses_a_changed_config_or_world_size(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    cfg = _config(tmp_path, epochs=1, checkpoint={"dir": str(ck), "every_steps": 100})
    _train(cfg, tmp_path / "b")
    assert checkpoints(ck)  # the end-of-epoch checkpoint
    changed = yaml.safe_load(cfg.read_text())
    changed["train"]["lr"] = 0.123
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    logged: list[str] = []
    with pytest.raises(RankerError, match=r"train\.lr: 0\.005 in the checkpoint, 0\.123 now"):
        Trainer(load_config(other), progress=False, log=logged.append).run(tmp_path / "c", resume=True)
    # refused before the pass over train that fits the featurizer, not after it
    assert not any(line.startswith("featurizer fitted") for line in logged), logged
    run = _torchrun(cfg, tmp_path / "d", "--resume", timeout=180)
    assert run.returncode != 0 and "world_size: 1 in the checkpoint, 2 now" in run.stderr


def test_resume_takes_a_checkpoint_from_before_a_config_key_existed(tmp_path: Path) -> None:
    """A checkpoint whose config lacks keys added since resumes while those keys keep their
    defaults, and is refused, naming the key, once one is set otherwise."""
    ck = tmp_path / "ck"
    cfg = _config(tmp_path, epochs=1, checkpoint={"dir": str(ck), "every_steps": 100})
    _train(cfg, tmp_path / "b")
    path = checkpoints(ck)[0]
    state = torch.load(path, weights_only=True)
    conf = state["fingerprint"]["config"]
    # as an older ranker wrote it: no learning-rate schedule, no numeric encodings
    del conf["train"]["lr_schedule"]
    dense = [f for f in conf["features"] if "encoding" in f and f["encoding"] is None]  # None: the default encoding
    assert dense
    for f in dense:
        del f["encoding"]
    torch.save(state, path)
    logged: list[str] = []
    Trainer(load_config(cfg), progress=False, log=logged.append).run(tmp_path / "c", resume=True)
    assert any(line.startswith(f"resumed from {path}") for line in logged), logged
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["lr_schedule"] = {"type": "constant"}  # written out, but the default all the same
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(raw))
    _train(same, tmp_path / "d", resume=True)
    raw["train"]["lr_schedule"] = {"type": "cosine"}
    other = tmp_path / "cosine.yaml"
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(RankerError, match=r"train\.lr_schedule: absent in the checkpoint, \{'type': 'cosine'"):
        _train(other, tmp_path / "e", resume=True)
    del state["fingerprint"]["config"]["train"]["lr"]  # a key the checkpoint has and this run lacks is never taken
    state["fingerprint"]["config"]["train"]["retired_key"] = 1
    torch.save(state, path)
    with pytest.raises(RankerError, match=r"train\.retired_key: 1 in the checkpoint, absent now"):
        _train(cfg, tmp_path / "f", resume=True)


# ----- precision and tracking ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_on_cpu_and_bundles_stay_fp32(tmp_path: Path, precision: str) -> None:
    cfg = _config(tmp_path, precision=precision, epochs=2, weighting="mgda")
    metrics = _train(cfg, tmp_path / "b")
    assert metrics["val"]["ctr"]["auc"] > 0.6 and np.isfinite(metrics["val"]["watch"]["rmse"])
    assert {v.dtype for v in _weights(tmp_path / "b").values()} == {torch.float32}


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(tmp_path, epochs=2, log_dir=str(tmp_path / "tb"))
    _train(cfg, tmp_path / "b")
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"val/ctr/auc", "val/watch/rmse", "weight/cvr", "val/monitor", "throughput/rows_per_second"} <= tags
    assert any(t.startswith("diagnostics/grad_cosine/") for t in tags)
    assert len(ev.Scalars("val/ctr/auc")) == 2


def test_bad_scale_settings_are_one_line_errors(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=1)
    with pytest.raises(RankerError, match="train.checkpoint"):
        _train(cfg, tmp_path / "b", resume=True)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["checkpoint"] = {"dir": "ck"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(RankerError, match="every_steps"):
        load_config(bad)
    if not torch.cuda.is_available():
        raw["train"] = {**raw["train"], "device": "cuda"}
        raw["train"].pop("checkpoint")
        bad.write_text(yaml.safe_dump(raw))
        with pytest.raises(RankerError, match="train.device"):
            _train(bad, tmp_path / "c")


def test_source_fingerprint_names_row_groups(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "a.parquet", row_group_size=4)
    src = ParquetSource(str(tmp_path / "a.parquet"), "data.train", ["x"])
    assert [u.rows for u in src.units] == [4, 4, 2] and src.fingerprint()[0][2] == [4, 4, 2]


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path: Path) -> None:
    from ranker.training.checkpoint import first_difference, save_checkpoint

    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == [f"step-{15:012d}.pt", f"step-{10:012d}.pt"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    (tmp_path / f"step-{20:012d}.pt").write_bytes(b"torn")  # a file that does not read back
    state = load_latest(tmp_path)
    assert state is not None and state["x"].item() == 15
    # set aside, so it no longer counts among the newest: a new checkpoint below its step was
    # deleted as soon as written (with keep 1 none survived)
    assert (tmp_path / f"step-{20:012d}.pt.unreadable").exists()
    save_checkpoint(tmp_path, 16, {"x": torch.tensor([16])}, keep=1)
    assert [p.name for p in checkpoints(tmp_path)] == [f"step-{16:012d}.pt"]
    # one flipped bit in a tensor's bytes: torch.load reads it without a word, the zip CRC does not
    newest = tmp_path / f"step-{16:012d}.pt"
    data = bytearray(newest.read_bytes())
    save_checkpoint(tmp_path, 12, {"x": torch.tensor([12])}, keep=2)  # an older good one
    at = data.find((16).to_bytes(8, "little"))  # the tensor's value in its storage member
    assert at > 0
    data[at] ^= 0x01
    newest.write_bytes(bytes(data))
    logged: list[str] = []
    state = load_latest(tmp_path, logged.append)
    assert state is not None and state["x"].item() == 12
    assert logged and "fails its CRC" in logged[0], logged
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == "a.b[1]: 2 in the checkpoint, 3 now"
    assert first_difference({"a": 1}, {"a": 1, "c": 2}) == "c: absent in the checkpoint, 2 now"
    assert first_difference({"a": [1]}, {"a": [1]}) is None
    # lists of other lengths name the first entry that differs, not both whole lists
    tasks = [{"name": n, "type": "binary", "label": n * 40} for n in ("ctr", "cvr", "watch")]
    msg = first_difference({"tasks": tasks}, {"tasks": [tasks[0], tasks[2]]})
    assert msg is not None and msg.startswith("tasks: 3 entries in the checkpoint, 2 now; [1] was {'name': 'cvr'") and len(msg) < 400, msg
    assert first_difference({"f": [1, 2]}, {"f": [1, 2, 3]}) == "f: 2 entries in the checkpoint, 3 now; [2] was nothing, is 3"
