"""``ranker compare``: the report files exist and their numbers agree with each other; the
verdict rule and Delta_m on hand-made numbers; per-epoch diagnostics in the trainer's history."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ranker.cli import main
from ranker.config import load_config
from ranker.training.compare import (
    MIN_EFFECT_PCT,
    delta_m,
    relative_change,
    single_task_config,
    summary,
    t_critical,
)
from ranker.training.diagnostics import EpochProbe
from tests.datagen import write_logs

SEEDS = 2
VARIANTS = ["static", "pcgrad"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_logs(tmp_path_factory.mktemp("clogs"), rows=1600)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"architecture": "mmoe", "experts": 3, "expert_dims": [8], "tower_dims": [4]}
    raw["train"].update({"epochs": 2, "batch_size": 200, "threads": 1, "diagnostics_batches": 2, "patience": 2})
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path_factory.mktemp("report")
    rc = main(["compare", "--config", str(path), "--out", str(out), "--seeds", str(SEEDS),
               "--weightings", ",".join(VARIANTS), "--quiet"])
    assert rc == 0
    return out


def test_compare_writes_every_report_file(report_dir: Path) -> None:
    for name in ("report.md", "report.json", "metrics.png", "learning_curves.png", "grad_cosine.png", "gates.png"):
        data = (report_dir / name).read_bytes()
        assert len(data) > 500, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    bundles = sorted(p.name for p in (report_dir / "runs").iterdir() if p.is_dir())
    assert len(bundles) == SEEDS * (len(VARIANTS) + 3)  # multi per weighting + one single per task
    assert all((report_dir / "runs" / b / "model.safetensors").is_file() for b in bundles)


def test_report_numbers_agree_with_each_other(report_dir: Path) -> None:
    rep = json.loads((report_dir / "report.json").read_text())
    tasks = rep["tasks"]
    assert tasks == ["ctr", "cvr", "watch"] and rep["split"] == "test" and rep["seeds"] == [0, 1]
    assert [r["variant"] for r in rep["multi"]] == VARIANTS
    for t in tasks:
        s = rep["single"][t]
        assert len(s["values"]) == SEEDS and s["mean"] == pytest.approx(np.mean(s["values"]))
        assert s["std"] == pytest.approx(np.std(s["values"], ddof=1))
    for r in rep["multi"]:
        changes = []
        for t in tasks:
            m, s, higher = r["tasks"][t], rep["single"][t], rep["metric"][t]["higher_is_better"]
            assert m["mean"] == pytest.approx(np.mean(m["values"]))
            if rep["metric"][t]["name"] == "auc":
                assert all(0.0 <= v <= 1.0 for v in m["values"] + s["values"])
            else:
                assert rep["metric"][t]["name"] == "rmse" and not higher and all(v > 0 for v in m["values"])
            expected = (1 if higher else -1) * (m["mean"] - s["mean"]) / abs(s["mean"]) * 100
            assert m["change_pct"] == pytest.approx(expected)
            bar = max(MIN_EFFECT_PCT, t_critical(2 * SEEDS - 2) * m["se_pct"])
            assert m["verdict"] == ("gain" if expected > bar else "negative transfer" if expected < -bar else "neutral")
            changes.append(m["change_pct"])
        assert r["delta_m_pct"] == pytest.approx(np.mean(changes))  # Delta_m from the listed numbers
        assert r["worst_task"] == tasks[int(np.argmin(changes))]
        assert r["worst_change_pct"] == pytest.approx(min(changes))
        assert r["rows_per_second"] > 0
        for curve in r["grad_cosine_curves"].values():
            assert len(curve) >= 1 and all(-1.0 <= c <= 1.0 for c in curve)
        assert set(r["grad_cosine_curves"]) == {"ctr/cvr", "ctr/watch", "cvr/watch"}
        for g in r["gates_last"].values():
            assert sum(g["share"]) == pytest.approx(1.0, abs=1e-4) and 0 <= g["entropy"] <= g["max_entropy"] + 1e-6
        assert all(len(c) >= 1 for c in r["curves"].values())
    best = max(rep["multi"], key=lambda r: r["delta_m_pct"])
    assert rep["best"] == best["variant"] and best["best"] and sum(r["best"] for r in rep["multi"]) == 1

    md = (report_dir / "report.md").read_text()
    assert f"★ best by Δm: **{rep['best']}**" in md
    for r in rep["multi"]:
        assert f"{r['delta_m_pct']:+.2f}%" in md
    assert "## Verdict rule" in md and "negative transfer if" in md


@pytest.mark.parametrize(
    ("single", "multi", "higher", "verdict"),
    [
        ([0.70, 0.71, 0.70], [0.75, 0.76, 0.75], True, "gain"),
        ([0.70, 0.71, 0.70], [0.65, 0.66, 0.65], True, "negative transfer"),
        ([0.70, 0.75, 0.65], [0.71, 0.76, 0.66], True, "neutral"),  # +1.4%, but within 2 SE
        ([10.0, 10.1, 9.9], [9.0, 9.1, 8.9], False, "gain"),  # RMSE falls: a gain
        ([0.7000], [0.7004], True, "neutral"),  # one seed: below the floor
        ([0.70], [0.71], True, "gain"),  # one seed: above the floor
    ],
)
def test_verdict_rule(single: list[float], multi: list[float], higher: bool, verdict: str) -> None:
    r = relative_change(summary(single), summary(multi), higher)
    assert r["verdict"] == verdict
    assert math.copysign(1, r["change_pct"]) == (1 if (np.mean(multi) > np.mean(single)) == higher else -1)


def test_t_critical_values() -> None:
    assert t_critical(2) == pytest.approx(4.303) and t_critical(4) == pytest.approx(2.776)
    assert t_critical(11) == pytest.approx(2.228)  # between table rows: the more conservative
    assert t_critical(1000) == pytest.approx(2.0) and t_critical(0) == math.inf


def test_delta_m_is_the_mean_oriented_relative_change() -> None:
    changes = [relative_change(summary([0.8]), summary([0.84]), True)["change_pct"],  # +5%
               relative_change(summary([2.0]), summary([2.2]), False)["change_pct"]]  # RMSE +10% = -10%
    assert changes == pytest.approx([5.0, -10.0])
    assert delta_m(changes) == pytest.approx(-2.5)


def test_single_task_config_keeps_everything_but_the_other_tasks(tmp_path: Path) -> None:
    cfg = load_config(write_logs(tmp_path, rows=200))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"monitor": "ctr.auc", "weighting": "pcgrad"})})
    one = single_task_config(cfg, "watch")
    assert [t.name for t in one.tasks] == ["watch"]
    assert one.model == cfg.model and one.data == cfg.data and one.train.epochs == cfg.train.epochs
    assert one.train.monitor == "mean" and one.train.weighting == "static"
    assert single_task_config(cfg, "ctr").train.monitor == "ctr.auc"


def test_compare_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_logs(tmp_path, rows=200)
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "r"), "--weightings", "static,nope"]) == 2
    assert "unknown weighting 'nope'" in capsys.readouterr().err
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "r"), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_epoch_probe_cosine_norms_and_gates() -> None:
    w = nn.Parameter(torch.ones(2))
    probe = EpochProbe([w], steps=10, batches=3)
    assert sorted(probe.sampled) == [1, 5, 8] and probe.due(5) and not probe.due(0)
    gates = {"a": torch.tensor([[1.0, 0.0], [0.5, 0.5]])}
    probe.record({"a": 3 * w[0], "b": -4 * w[0] + 4 * w[1]}, gates)  # g_a = (3, 0), g_b = (-4, 4)
    d = probe.summary()
    # one step: the summed-gradient and per-step cosines agree, but they are computed by different
    # paths, so only to rounding
    assert d["grad_cosine"]["a/b"] == pytest.approx(-1 / math.sqrt(2))
    assert d["grad_cosine_batch"]["a/b"] == pytest.approx(-1 / math.sqrt(2))
    assert d["grad_norm"] == pytest.approx({"a": 3.0, "b": 4 * math.sqrt(2)})
    assert d["dominance"] == pytest.approx(4 * math.sqrt(2) / 3)
    assert d["gates"]["a"]["share"] == pytest.approx([0.75, 0.25])
    assert d["gates"]["a"]["entropy"] == pytest.approx(math.log(2) / 2)  # rows: 0 and log 2 nats


def test_epoch_probe_cosine_of_summed_gradients_averages_out_noise() -> None:
    w = nn.Parameter(torch.zeros(2))
    probe = EpochProbe([w], steps=2, batches=2)
    # two steps: noise flips sign between steps, the shared component (1, 0) stays
    probe.record({"a": w @ torch.tensor([1.0, 3.0]), "b": w @ torch.tensor([1.0, -3.0])}, {})
    probe.record({"a": w @ torch.tensor([1.0, -3.0]), "b": w @ torch.tensor([1.0, 3.0])}, {})
    d = probe.summary()
    assert d["grad_cosine"]["a/b"] == pytest.approx(1.0)  # the mean gradients agree
    assert d["grad_cosine_batch"]["a/b"] == pytest.approx(-0.8)  # each step's look conflicting
