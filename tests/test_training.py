"""Training end to end on tiny real Parquet logs: masks, weighting, determinism, the bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ranker.bundle import load_bundle, probe, write_atomic_dir
from ranker.config import load_config
from ranker.errors import RankerError
from ranker.training.data import Loader, ParquetSource, extract_labels
from ranker.training.trainer import Trainer, task_losses
from ranker.training.weighting import StepContext, build_weighting


def test_end_to_end_loss_falls_and_auc_clears_chance(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "metrics.json").read_text())
    hist = m["history"]
    first, last = hist[0]["train_loss"], hist[-1]["train_loss"]
    assert last["ctr"] < first["ctr"]
    assert m["val"]["ctr"]["auc"] > 0.65 and m["test"]["ctr"]["auc"] > 0.65
    assert m["val"]["watch"]["r2"] > 0.0  # beats predicting the mean, in label units
    assert m["throughput"]["train_rows_per_second"] > 0
    assert set(m["val"]) == set(m["test"]) == {"ctr", "cvr", "watch"}


def test_bundle_contents(tiny_bundle: Path) -> None:
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["manifest.json", "metrics.json", "model.safetensors"]
    assert b"pickle" not in (tiny_bundle / "model.safetensors").read_bytes()[:200]
    man = json.loads((tiny_bundle / "manifest.json").read_text())
    assert len(man["version"]) == 16 and man["created_at"]
    assert man["featurizer"]["kinds"]["user_id"] == "int"
    ref = man["reference"]["ctr"]
    assert abs(sum(ref["shares"]) - 1) < 1e-9 and len(ref["shares"]) == len(ref["edges"]) + 1
    b = load_bundle(tiny_bundle)
    probe(b)
    assert b.version == man["version"] and not b.model.training


def test_cvr_mask_excludes_unclicked_rows(tiny_logs: Path) -> None:
    cfg = load_config(tiny_logs)
    src = ParquetSource(cfg.data.val, "data.val", ["click", "conversion", "watch_seconds"])
    _, rb = next(src.batches(["click", "conversion", "watch_seconds"]))
    labels = extract_labels(rb, cfg.tasks, "val")
    click = rb.column("click").to_numpy()
    cvr = labels["label:cvr"].numpy()
    assert np.isnan(cvr[click == 0]).all() and not np.isnan(cvr[click == 1]).any()


def test_masked_rows_add_nothing_to_the_loss(tiny_logs: Path) -> None:
    from ranker.model import MultiTaskRanker

    cfg = load_config(tiny_logs)
    model = MultiTaskRanker(cfg.features, cfg.tasks, cfg.model)
    y = torch.tensor([1.0, float("nan"), 0.0, float("nan")])
    raw = {"cvr": torch.tensor([2.0, 50.0, -1.0, -50.0])}
    losses = task_losses(model, {"cvr": "binary"}, raw, {"label:cvr": y})
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(losses["cvr"], expected)
    assert task_losses(model, {"cvr": "binary"}, raw, {"label:cvr": torch.full((4,), float("nan"))}) == {}


def test_evaluation_counts_only_labelled_rows(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "metrics.json").read_text())
    assert m["val"]["cvr"]["count"] < m["val"]["ctr"]["count"]


def test_static_weighting_uses_task_weights(tiny_logs: Path) -> None:
    cfg = load_config(tiny_logs)
    tasks = [t.model_copy(update={"weight": w}) for t, w in zip(cfg.tasks, [2.0, 0.5, 1.0])]
    p = torch.nn.Parameter(torch.tensor(1.0))
    w = build_weighting("static", tasks)
    weights = w.backward({"ctr": p * 3, "cvr": p * 4}, StepContext(shared=[p]))
    assert weights == {"ctr": 2.0, "cvr": 0.5}
    assert p.grad.item() == pytest.approx(2 * 3 + 0.5 * 4)


def test_uncertainty_weighting_learns_to_downweight_noisy_task(tiny_logs: Path) -> None:
    cfg = load_config(tiny_logs)
    w = build_weighting("uncertainty", cfg.tasks)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(300):  # fixed losses: the optimum is s = log(L) (binary) / log(L) (regression)
        opt.zero_grad()
        w.backward({"ctr": torch.tensor(0.2), "watch": torch.tensor(5.0)}, StepContext(shared=[]))
        opt.step()
    s = dict(zip(["ctr", "cvr", "watch"], w.log_var.detach().tolist()))
    # binary: d/ds [exp(-s) L + s/2] = 0 -> s = log(2L); regression: 0.5 exp(-s) L + s/2 -> s = log(L)
    assert s["ctr"] == pytest.approx(np.log(0.4), abs=0.05)
    assert s["watch"] == pytest.approx(np.log(5.0), abs=0.05)
    assert s["cvr"] == 0.0  # absent from every batch: untouched


def test_unknown_weighting_lists_valid_ones(tiny_logs: Path) -> None:
    with pytest.raises(RankerError, match="train.weighting: unknown weighting 'nope'; valid: .*static.*uncertainty"):
        build_weighting("nope", load_config(tiny_logs).tasks)


@pytest.mark.parametrize("arch", ["shared_bottom", "ple"])
def test_other_architectures_train(tiny_logs: Path, tmp_path: Path, arch: str) -> None:
    cfg = load_config(tiny_logs)
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"architecture": arch}),
        "train": cfg.train.model_copy(update={"epochs": 2, "weighting": "static"}),
    })
    res = Trainer(cfg, progress=False, log=lambda s: None).run(tmp_path / "b")
    assert res.metrics["val"]["ctr"]["auc"] > 0.6


def test_deterministic_for_a_seed(tiny_logs: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_logs)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1, "shuffle_buffer": 1500})})
    a = Trainer(cfg, progress=False, log=lambda s: None).run(tmp_path / "a")
    b = Trainer(cfg, progress=False, log=lambda s: None).run(tmp_path / "b")
    assert a.version == b.version
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_shuffle_buffer_permutes_but_keeps_every_row(tiny_logs: Path) -> None:
    cfg = load_config(tiny_logs)
    src = ParquetSource(cfg.data.train, "data.train", ["user_id"])
    from ranker.features import Featurizer

    fz = Featurizer.fit(cfg.features, src.schema, [], "x")
    loader = Loader(src, fz, cfg.tasks, batch_size=500, shuffle_buffer=2000)
    ordered = torch.cat([b["label:watch"] for b in loader()])
    shuffled = torch.cat([b["label:watch"] for b in loader(seed=3)])
    assert len(ordered) == len(shuffled) == src.num_rows
    assert not torch.equal(ordered, shuffled)
    assert torch.equal(ordered.sort().values, shuffled.sort().values)
    again = torch.cat([b["label:watch"] for b in loader(seed=3)])
    assert torch.equal(shuffled, again)


def test_atomic_write_keeps_old_bundle_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ranker.bundle as bundle_mod

    out = tmp_path / "bundle"
    write_atomic_dir(out, {"a.json": b"{}"})
    real = bundle_mod._fsync_write

    def failing(path: Path, data: bytes) -> None:
        if path.name == "b.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(bundle_mod, "_fsync_write", failing)
    with pytest.raises(RankerError, match=r"bundle: cannot write a bundle there \(disk full\); nothing there was changed"):
        write_atomic_dir(out, {"a.json": b"new", "b.json": b"x"})
    assert (out / "a.json").read_bytes() == b"{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.tmp")]
    monkeypatch.setattr(bundle_mod, "_fsync_write", real)

    # the swap itself fails once the old bundle is moved aside: it is put back, not left hidden
    real_replace, calls = os.replace, []

    def second_fails(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(bundle_mod.os, "replace", second_fails)
    with pytest.raises(RankerError, match="No space left on device"):
        write_atomic_dir(out, {"a.json": b"new"})
    assert (out / "a.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .bundle.old-* or .tmp- left


def test_load_bundle_names_the_broken_file(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(RankerError, match="model.safetensors: cannot load weights"):
        load_bundle(broken)
    (broken / "manifest.json").write_text("{")
    with pytest.raises(RankerError, match="manifest.json: not valid JSON"):
        load_bundle(broken)
    with pytest.raises(RankerError, match="bundle folder not found"):
        load_bundle(tmp_path / "nope")


def test_binary_label_outside_0_1_is_rejected() -> None:
    from ranker.config import TaskSpec

    rb = pa.record_batch({"click": pa.array([0, 1, 2])})
    with pytest.raises(RankerError, match="f.parquet: column 'click' has value 2; binary task 'ctr' needs 0 or 1"):
        extract_labels(rb, [TaskSpec(name="ctr", type="binary", label="click")], "f.parquet")


def test_bundle_json_writes_undefined_metrics_as_null() -> None:
    from ranker.bundle import _json_bytes

    doc = json.loads(_json_bytes({"val": {"cvr": {"auc": float("nan"), "count": 3}}, "monitor": [float("-inf"), 1.5]}))
    assert doc == {"val": {"cvr": {"auc": None, "count": 3}}, "monitor": [None, 1.5]}


# ----- row-sparse embedding updates (train.sparse_embeddings) ---------------------------------


def _table_step(sparse: bool, dense_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of an encoder whose batch looks up rows 1 and 3 of a 6-row table:
    the table's weights (before, after)."""
    from ranker.config import FeatureSpec
    from ranker.model.encoder import Encoder
    from ranker.training.optim import build_optimizer, row_sparse

    torch.manual_seed(0)
    enc = Encoder([FeatureSpec(name="u", type="categorical", buckets=5, dim=4), FeatureSpec(name="p", type="dense", encoding="standard")])
    tables = enc.sparse_tables() if sparse else []
    opt = build_optimizer(list(enc.parameters()), tables, lr=0.1, weight_decay=0.1)
    before = enc.tables[0].weight.detach().clone()
    out = enc({"cat": torch.tensor([[1], [3], [3]]), "dense": torch.ones(3, 1)})
    if dense_grad:  # what a gradient method on the shared parameters leaves: a dense .grad
        (g,) = torch.autograd.grad(out.square().sum(), [enc.tables[0].weight])
        enc.tables[0].weight.grad = g.to_dense()
    else:
        out.square().sum().backward()
        assert enc.tables[0].weight.grad.is_sparse == sparse  # type: ignore[union-attr]
    row_sparse(tables)
    opt.step()
    return before, enc.tables[0].weight.detach()


@pytest.mark.parametrize("dense_grad", [False, True])
def test_sparse_embeddings_move_only_the_rows_a_step_looked_up(dense_grad: bool) -> None:
    before, after = _table_step(sparse=True, dense_grad=dense_grad)
    moved = (after != before).any(1).tolist()
    assert moved == [False, True, False, True, False, False]
    _, dense_after = _table_step(sparse=False)
    # the looked-up rows take AdamW's first step, its decoupled weight decay included (lazy:
    # only the rows used decay); dense AdamW also decays every other row
    torch.testing.assert_close(after[[1, 3]], dense_after[[1, 3]], rtol=0, atol=1e-5)  # the decay: ~5e-4
    assert (dense_after != before).all(1).all()
