"""Position-bias towers: config checks, in training only, absent from serving, and the synthetic
logs' position column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ranker.bundle import load_bundle
from ranker.config import FeatureSpec, ModelConfig, TaskSpec, load_config, parse_config
from ranker.features import Featurizer
from ranker.model import MultiTaskRanker
from ranker.model.bias import BiasTower
from ranker.serving import ServingSettings, create_app
from ranker.training.synth import POSITION_SCHEMA, write_synthetic
from ranker.training.trainer import Trainer
from tests.datagen import make_table, write_logs

BASE = {
    "data": {"train": "t", "val": "v"},
    "features": [{"name": "u", "type": "categorical", "buckets": 9, "dim": 2},
                 {"name": "position", "type": "categorical", "buckets": 16, "dim": 4},
                 {"name": "tags", "type": "multi_hot", "buckets": 9, "dim": 2}],
    "tasks": [{"name": "ctr", "type": "binary", "label": "click", "bias_features": ["position"]}],
}


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ([{"name": "ctr", "type": "binary", "label": "click", "bias_features": ["slot"]}], r"bias feature 'slot' is not a declared feature"),
        ([{"name": "ctr", "type": "binary", "label": "click", "bias_features": ["tags"]}], r"bias feature 'tags' must be categorical or dense"),
        ([{"name": "w", "type": "regression", "label": "w", "bias_features": ["position"]}], r"tasks\[w\]: task 'w': 'bias_features' need a binary task"),
        ([{"name": "ctr", "type": "binary", "label": "click", "bias_features": ["position", "position"]}], r"names a feature twice"),
    ],
)
def test_bias_features_are_validated(tasks: list, match: str) -> None:
    with pytest.raises(Exception, match=match):
        parse_config({**BASE, "tasks": tasks}, "c.yaml")


def test_every_feature_a_bias_feature_is_refused() -> None:
    raw = {**BASE, "features": [BASE["features"][1]]}
    with pytest.raises(Exception, match="encoder needs at least one input"):
        parse_config(raw, "c.yaml")


FEATURES = [FeatureSpec(name="u", type="categorical", buckets=20, dim=4), FeatureSpec(name="p", type="dense", encoding="standard"),
            FeatureSpec(name="position", type="categorical", buckets=12, dim=3), FeatureSpec(name="slot_score", type="dense")]
TASKS = [TaskSpec(name="ctr", type="binary", label="c", bias_features=["position", "slot_score"]),
         TaskSpec(name="cvr", type="binary", label="v", mask="c")]


def test_bias_tower_adds_in_training_only_and_is_not_an_encoder_input() -> None:
    torch.manual_seed(0)
    m = MultiTaskRanker(FEATURES, TASKS, ModelConfig(experts=2, expert_dims=[8], tower_dims=[4]))
    assert list(m.bias_towers) == ["ctr"] and m.encoder.out_dim == 4 + 1  # u and p only
    fz = Featurizer(FEATURES, {"u": "int", "position": "int"}, {"p": (0.0, 1.0)}, {"slot_score": np.array([0.0, 1.0, 2.0])}, ["position", "slot_score"])
    assert [f.name for f in fz.categorical] == ["u"] and [f.name for f in fz.dense] == ["p"]
    table = pa.table({"u": [1, 2, 3, 4], "p": [0.5, 1.0, -1.0, 2.0], "position": [1, 2, 3, None], "slot_score": [0.1, 2.0, None, 1.5]})
    batch = fz.transform(table)
    assert batch["cat"].shape == (4, 1) and batch["dense"].shape == (4, 1)
    assert batch["bias:position"].shape == (4,) and batch["bias:position"][3] == 0 and torch.isnan(batch["bias:slot_score"][2])
    served = fz.transform(table.drop(["position", "slot_score"]), bias=False)
    assert not any(k.startswith("bias:") for k in served)
    with torch.no_grad():  # make the tower's contribution visible (it starts at zero)
        m.bias_towers["ctr"].out.bias.fill_(0.7)
        m.bias_towers["ctr"].out.weight.normal_()
    m.train()
    with_tower = m(batch)
    m.eval()
    plain = m(served)
    tower = m.bias_towers["ctr"](batch)
    torch.testing.assert_close(with_tower["ctr"], plain["ctr"] + tower)
    torch.testing.assert_close(with_tower["cvr"], plain["cvr"])  # cvr has no tower
    assert (tower - 0.7 * m.bias_towers["ctr"].gain).abs().max() > 0  # depends on position, not a constant
    # the gain scales the output layer's logit: a 10x learning rate for that layer under Adam
    gain1 = BiasTower([FEATURES[2], FEATURES[3]], ModelConfig(bias_tower_gain=1.0))
    gain1.load_state_dict(m.bias_towers["ctr"].state_dict())
    torch.testing.assert_close(gain1(batch) * ModelConfig().bias_tower_gain, tower)


def test_bias_tower_gradients_flow_to_the_tower_only_through_training() -> None:
    torch.manual_seed(0)
    m = MultiTaskRanker(FEATURES, TASKS, ModelConfig(experts=2, expert_dims=[8], tower_dims=[4]))
    fz = Featurizer(FEATURES, {"u": "int", "position": "int"}, {"p": (0.0, 1.0)}, {"slot_score": np.array([0.0, 1.0])}, ["position", "slot_score"])
    batch = fz.transform(pa.table({"u": [1, 2], "p": [0.5, 1.0], "position": [1, 5], "slot_score": [0.2, 0.9]}))
    m.train()
    m(batch)["ctr"].sum().backward()
    assert m.bias_towers["ctr"].out.weight.grad.abs().sum() > 0


def _bias_logs(root: Path) -> Path:
    """The tiny test logs plus a position column that drives clicks."""
    cfg_path = write_logs(root, rows=2000)
    rng = np.random.default_rng(0)
    for f in sorted(root.glob("*/part-*.parquet")):
        t = pq.read_table(f)
        pos = rng.integers(1, 6, t.num_rows)
        click = t.column("click").to_numpy() * (rng.random(t.num_rows) < 1.0 / pos)
        t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click)).append_column("position", pa.array(pos))
        pq.write_table(t, f)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["features"].append({"name": "position", "type": "categorical", "buckets": 8, "dim": 2})
    raw["tasks"][0]["bias_features"] = ["position"]
    raw["train"]["epochs"] = 1
    cfg_path.write_text(yaml.safe_dump(raw))
    return cfg_path


def test_trained_bundle_serves_without_position_and_matches_the_position_free_model(tmp_path: Path) -> None:
    cfg_path = _bias_logs(tmp_path / "logs")
    out = tmp_path / "bundle"
    Trainer(load_config(cfg_path), progress=False, log=lambda s: None).run(out)
    b = load_bundle(out)
    assert b.featurizer.bias == ["position"] and "ctr" in b.model.bias_towers
    assert b.model.bias_towers["ctr"].out.weight.abs().sum() > 0  # the tower trained
    table = make_table(6, 99).drop(["click", "conversion", "watch_seconds"])
    with torch.inference_mode():
        want = {t: s.numpy() for t, s in b.model.predict(b.featurizer.transform(table, bias=False)).items()}
    items = [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
    items[0]["user_id"] = str(items[0]["user_id"])
    registry = CollectorRegistry()
    with TestClient(create_app(ServingSettings(bundle=out, device="cpu", warmup_rows=4), registry=registry)) as client:
        r = client.post("/predict", json={"items": items})  # no position anywhere
        assert r.status_code == 200, r.text
        for t, w in want.items():
            np.testing.assert_allclose(np.asarray(r.json()["scores"][t]), w, rtol=1e-5, atol=1e-5)
        with_pos = client.post("/predict", json={"items": [{**it, "position": 1} for it in items]})
        assert with_pos.json()["scores"] == r.json()["scores"]  # a sent position changes nothing
        info = client.get("/model").json()
        assert "position" not in [f["name"] for f in info["features"]]
        assert registry.get_sample_value("ranker_feature_missing_total", {"feature": "position"}) is None
    # offline evaluation needs no position column either
    test = pq.read_table(cfg_path.parent / "test").drop(["position"])
    pq.write_table(test, tmp_path / "no_position.parquet")
    from ranker.cli import main

    assert main(["evaluate", "--bundle", str(out), "--data", str(tmp_path / "no_position.parquet"), "--json"]) == 0


def test_synth_position_bias_columns_and_unbiased_test_split(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "s", rows=40_000, seed=2, position_bias=True)
    cfg = load_config(path)
    assert cfg.task("ctr").bias_features == ["position"]
    pos_spec = next(f for f in cfg.features if f.name == "position")
    from ranker.features import _hash_array

    assert len(set(_hash_array(pa.array(range(1, 11)), "int", pos_spec.buckets).tolist())) == 10  # no slots merged
    rates = {}
    for split in ("train", "test"):
        t = pq.read_table(tmp_path / "s" / split)
        assert t.schema.remove_metadata() == POSITION_SCHEMA
        pos, click = t.column("position").to_numpy(), t.column("click").to_numpy()
        assert pos.min() == 1 and pos.max() == 10
        rates[split] = np.array([click[pos <= 2].mean(), click[pos >= 9].mean()])
        assert (t.column("conversion").to_numpy() <= click).all()
    # both splits share the old ranking's relevance tilt (better items sit higher); only train
    # clicks also need examination (1/p), so train/test falls from ~0.75 at slots 1-2 to ~0.1
    ratio = rates["train"] / rates["test"]
    assert ratio[0] > 4 * ratio[1], ratio
    plain = write_synthetic(tmp_path / "p", rows=1_000, seed=2)
    assert "position" not in pq.read_schema(next((tmp_path / "p" / "train").glob("*.parquet"))).names
    assert all(not t.bias_features for t in load_config(plain).tasks)


def test_single_task_baseline_of_compare_does_not_take_another_tasks_position_as_input() -> None:
    from ranker.training.compare import single_task_config

    raw = {**BASE, "tasks": [*BASE["tasks"], {"name": "cvr", "type": "binary", "label": "conv"}]}
    cfg = parse_config(raw)
    assert [f.name for f in single_task_config(cfg, "cvr").features] == ["u", "tags"]
    assert [f.name for f in single_task_config(cfg, "ctr").features] == ["u", "position", "tags"]


def test_synth_oracle_hook_replays_the_written_test_split(tmp_path: Path) -> None:
    from ranker.training.synth import POSITION_ETA, _test_truth, examination

    write_synthetic(tmp_path / "s", rows=3_000, seed=4, position_bias=True)
    t = pq.read_table(tmp_path / "s" / "test")
    truth = _test_truth(3_000, seed=4)
    assert np.array_equal(truth["click"], t.column("click").to_numpy())
    assert np.array_equal(truth["position"], t.column("position").to_numpy())
    # unbiased test clicks follow the hidden relevance: clicked rows have the higher logits
    click = truth["click"].astype(bool)
    assert truth["relevance_logit"][click].mean() > truth["relevance_logit"][~click].mean() + 1.0
    np.testing.assert_allclose(examination(np.array([1, 2, 10])), np.array([1, 2, 10], dtype=float) ** -POSITION_ETA)
