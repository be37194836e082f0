"""Cross-stitch and FiLM: golden values against a hand-written loop, what each parameter couples,
the config keys, and a trained bundle that serves the same scores after loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranker.config import ModelConfig, load_config, parse_config
from ranker.errors import RankerError
from ranker.model.film import FiLM
from ranker.model.trunks import build_trunk
from ranker.model.trunks.cross_stitch import CrossStitch, stitch_init
from ranker.model.trunks.shared_bottom import SharedBottom

TASKS = ["a", "b", "c"]


def test_stitch_init_rows_sum_to_one() -> None:
    a = stitch_init(4, 0.7)
    assert torch.allclose(a.sum(1), torch.ones(4))
    assert torch.allclose(a.diagonal(), torch.full((4,), 0.7))
    assert stitch_init(1, 0.9).item() == 1.0


def test_cross_stitch_equals_a_loop_of_columns_and_mixes() -> None:
    torch.manual_seed(0)
    t = CrossStitch(ModelConfig(architecture="cross_stitch", expert_dims=[6, 5]), 4, TASKS)
    with torch.no_grad():
        for a in t.alpha:
            a.copy_(torch.randn(3, 3))
    x = torch.randn(7, 4)
    out = t(x, TASKS)
    # by hand: column j's layer k is expert j of bank k; after each layer h_i = sum_j alpha_ij h_j
    h = [x] * 3
    for bank, alpha in zip(t.layers, t.alpha, strict=True):
        h = [torch.relu(h[j] @ bank.w0[:, j] + bank.b0[j]) for j in range(3)]
        h = [sum(alpha[i, j] * h[j] for j in range(3)) for i in range(3)]
    for i, name in enumerate(TASKS):
        assert torch.allclose(out[name], h[i], atol=1e-5)


def test_identity_stitch_keeps_columns_separate() -> None:
    """alpha = I: task a's output has no gradient into column b's weights; any mixing gives one."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="cross_stitch", expert_dims=[6, 5], stitch_self=1.0)
    t = CrossStitch(cfg, 4, TASKS)
    x = torch.randn(7, 4)
    t(x, ["a"])["a"].sum().backward()
    g = t.layers[0].w0.grad  # (in, T, d)
    assert g[:, 0].abs().sum() > 0 and g[:, 1:].abs().sum() == 0
    t.zero_grad()
    with torch.no_grad():
        t.alpha[0].copy_(stitch_init(3, 0.8))
    t(x, ["a"])["a"].sum().backward()
    assert t.layers[0].w0.grad[:, 1:].abs().sum() > 0
    assert t.alpha[0].grad is not None and t.alpha[0].grad.abs().sum() > 0  # the mixing is learned


def test_cross_stitch_subset_runs_every_column_but_only_requested_rows() -> None:
    """The coupling documented in the module: all columns run; the last mix has one row per asked task."""
    t = CrossStitch(ModelConfig(architecture="cross_stitch", expert_dims=[6, 5]), 4, TASKS)
    shapes: list[int] = []
    for bank in t.layers:
        bank.register_forward_hook(lambda mod, args, out: shapes.append(out.shape[0]))
    out = t(torch.randn(2, 4), ["b"])
    assert shapes == [3, 3] and list(out) == ["b"]


def test_film_starts_as_the_plain_trunk_and_then_modulates_per_task() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="shared_bottom", expert_dims=[6], film=True)
    f = build_trunk(cfg, 4, TASKS)
    assert isinstance(f, FiLM) and isinstance(f.inner, SharedBottom) and f.out_dim == 6
    x = torch.randn(5, 4)
    plain = f.inner(x, TASKS)
    out = f(x, TASKS)
    assert all(torch.equal(out[t], plain[t]) for t in TASKS)  # zero generator output: identity
    with torch.no_grad():
        f.to_film.weight.normal_()
        f.to_film.bias.normal_()
    out = f(x, TASKS)
    assert not torch.allclose(out["a"], out["b"])  # one shared h, now different per task
    # without the input, gamma and beta are per task only: rep = gamma * h + beta row by row
    for i, t in enumerate(TASKS):
        gamma, beta = f.to_film(torch.relu(f.from_task(f.task_embedding.weight[i]))).chunk(2)  # (D,) each
        assert torch.allclose(out[t], (1 + gamma) * plain[t] + beta, atol=1e-5)


def test_film_input_makes_the_modulation_depend_on_the_row() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="shared_bottom", expert_dims=[6], film=True, film_input=True, film_dim=8)
    f = build_trunk(cfg, 4, TASKS)
    with torch.no_grad():
        f.to_film.weight.normal_()
    x = torch.randn(5, 4)
    h = f.inner(x, ["a"])["a"]
    rep = f(x, ["a"])["a"]
    a = f.from_task(f.task_embedding(torch.tensor([0])))  # (1, k)
    hidden = torch.relu(a + f.from_input(x))  # (B, k)
    gamma, beta = f.to_film(hidden).chunk(2, dim=-1)
    assert torch.allclose(rep, (1 + gamma) * h + beta, atol=1e-5)
    assert gamma.std(0).max() > 0  # varies over rows
    # gradients reach the task embedding and the input projection
    rep.sum().backward()
    assert f.task_embedding.weight.grad[0].abs().sum() > 0 and f.task_embedding.weight.grad[1:].abs().sum() == 0
    assert f.from_input.weight.grad.abs().sum() > 0


def test_film_keeps_the_inner_trunks_gates() -> None:
    cfg = ModelConfig(architecture="mmoe", experts=3, expert_dims=[6], film=True)
    f = build_trunk(cfg, 4, TASKS)
    f(torch.randn(2, 4), ["c"])
    assert set(f.last_gates) == {"c"} and f.last_gates["c"].shape == (2, 3)


def test_config_keys() -> None:
    base = {"data": {"train": "t", "val": "v"}, "features": [{"name": "p", "type": "dense"}],
            "tasks": [{"name": "ctr", "type": "binary", "label": "click"}]}
    cfg = parse_config({**base, "model": {"architecture": "cross_stitch", "stitch_self": 0.6, "film": True}})
    assert cfg.model.architecture == "cross_stitch" and cfg.model.stitch_self == 0.6 and cfg.model.film
    with pytest.raises(RankerError, match=r"model: film_input: needs 'film: true'"):
        parse_config({**base, "model": {"film_input": True}})
    with pytest.raises(RankerError, match=r"model\.stitch_self: "):
        parse_config({**base, "model": {"stitch_self": 1.5}})
    with pytest.raises(RankerError, match=r"model\.film_dims: unknown key"):
        parse_config({**base, "model": {"film_dims": 4}})


@pytest.mark.parametrize("model", [
    {"architecture": "cross_stitch", "expert_dims": [16, 8]},
    {"architecture": "mmoe", "experts": 3, "expert_dims": [16], "film": True, "film_input": True},
])
def test_trains_and_the_bundle_serves_the_same_scores(tiny_logs: Path, tmp_path: Path, model: dict) -> None:
    from ranker.bundle import load_bundle
    from ranker.training.data import Loader, ParquetSource, label_columns
    from ranker.training.trainer import Trainer

    cfg = load_config(tiny_logs)
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update=model),
        "train": cfg.train.model_copy(update={"epochs": 2, "weighting": "static", "threads": 1}),
    })
    res = Trainer(cfg, progress=False, log=lambda s: None).run(tmp_path / "b")
    assert res.metrics["val"]["ctr"]["auc"] > 0.6
    b = load_bundle(tmp_path / "b")
    assert b.config.model.architecture == model["architecture"]
    src = ParquetSource(cfg.data.val, "data.val", b.featurizer.columns + label_columns(cfg.tasks))
    batch = next(Loader(src, b.featurizer, cfg.tasks, 64)())
    with torch.inference_mode():
        full = b.model.predict(batch)
        sub = b.model.predict(batch, ["cvr"])
    assert torch.allclose(sub["cvr"], full["cvr"], atol=1e-6)
    assert ((full["ctr"] > 0) & (full["ctr"] < 1)).all()


def test_served_cross_stitch_film_bundle_matches_offline_scores(tmp_path: Path) -> None:
    """Serving loads the bundle through the same model code: HTTP scores equal offline ones,
    for all tasks and for a subset."""
    import numpy as np
    import pyarrow.parquet as pq
    import yaml
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from ranker.bundle import load_bundle
    from ranker.serving import ServingSettings, create_app
    from tests.serving_fixtures import train_bundle, write_serving_data

    data = write_serving_data(tmp_path / "data", rows=1500, architecture="cross_stitch")
    raw = yaml.safe_load(data.config.read_text())
    raw["model"].update({"film": True, "film_input": True, "film_dim": 8})
    data.config.write_text(yaml.safe_dump(raw))
    path = train_bundle(data, tmp_path / "bundle")
    offline = load_bundle(path)
    rows = pq.read_table(data.val_file).slice(0, 100)
    with torch.inference_mode():
        want = {t: s.numpy() for t, s in offline.model.predict(offline.featurizer.transform(rows)).items()}
    settings = ServingSettings(bundle=path, device="cpu", warmup_rows=8)
    with TestClient(create_app(settings, registry=CollectorRegistry())) as client:
        info = client.get("/model").json()
        full = client.post("/predict", json={"items": rows.to_pylist()})
        sub = client.post("/predict?tasks=cvr", json={"items": rows.to_pylist()})
    assert info["architecture"] == "cross_stitch"
    assert full.status_code == 200 and sub.status_code == 200
    for t, w in want.items():
        np.testing.assert_allclose(np.asarray(full.json()["scores"][t]), w, rtol=1e-5, atol=1e-5, err_msg=t)
    assert list(sub.json()["scores"]) == ["cvr"]
    np.testing.assert_allclose(np.asarray(sub.json()["scores"]["cvr"]), want["cvr"], rtol=1e-5, atol=1e-5)


def test_compare_runs_a_cross_stitch_film_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    from ranker.cli import main
    from tests.datagen import write_logs

    path = write_logs(tmp_path / "logs", rows=1200)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"architecture": "cross_stitch", "expert_dims": [8], "tower_dims": [4], "film": True}
    raw["train"].update({"epochs": 1, "batch_size": 200, "threads": 1, "diagnostics_batches": 1})
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "rep"), "--seeds", "1", "--quiet", "--affinity"]) == 0
    assert "warning: one seed: no spread to judge by" in capsys.readouterr().err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["architecture"] == "cross_stitch" and rep["multi"][0]["architecture"] == "cross_stitch"
    assert set(rep["recommendations"]) == {"ctr", "cvr", "watch"} and rep["affinity"]["steps"] == 1
