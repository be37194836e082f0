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
from ranker.config import DataConfig, load_config
from ranker.training.compare import (
    MIN_EFFECT_PCT,
    build_report,
    delta_m,
    plan,
    recommend,
    relative_change,
    render_markdown,
    single_task_config,
    summary,
    t_critical,
    weighting_variants,
)
from ranker.training.diagnostics import EpochProbe
from tests.datagen import write_logs

SEEDS = 2
VARIANTS = ["static", "pcgrad"]


def _t975(df: int) -> float:
    """Student-t 97.5% quantile by integrating the density (Simpson) and bisecting: an
    implementation independent of the module's table."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf_from_0(q: float) -> float:
        x = np.linspace(0.0, q, 20_001)
        f = c * (1 + x**2 / df) ** (-(df + 1) / 2)
        h = x[1] - x[0]
        return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_from_0(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


def _welch(s_std: float, n_s: int, m_std: float, n_m: int) -> float:
    a, b = s_std**2 / n_s, m_std**2 / n_m
    return (a + b) ** 2 / (a**2 / (n_s - 1) + b**2 / (n_m - 1))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_logs(tmp_path_factory.mktemp("clogs"), rows=1600)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"architecture": "mmoe", "experts": 3, "expert_dims": [8], "tower_dims": [4]}
    raw["train"].update({"epochs": 2, "batch_size": 200, "threads": 1, "diagnostics_batches": 2, "patience": 2})
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path_factory.mktemp("report")
    rc = main(["compare", "--config", str(path), "--out", str(out), "--seeds", str(SEEDS),
               "--weightings", ",".join(VARIANTS), "--quiet", "--affinity", "--affinity-every", "3"])
    assert rc == 0
    return out


def test_compare_writes_every_report_file(report_dir: Path) -> None:
    for name in ("report.md", "report.json", "metrics.png", "learning_curves.png", "grad_cosine.png", "gates.png", "affinity.png"):
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
    assert rep["selected_on"] == "val" and rep["selection_is_report_split"] is False
    assert rep["comparisons"] == len(VARIANTS) * len(tasks)
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
            if m["std"] ** 2 + s["std"] ** 2 > 0:  # Welch-Satterthwaite df, t at its floor
                nu = _welch(s["std"], SEEDS, m["std"], SEEDS)
                assert m["df"] == pytest.approx(nu) and SEEDS - 1 - 1e-9 <= nu <= 2 * SEEDS - 2 + 1e-9
                assert m["t"] == pytest.approx(t_critical(math.floor(nu + 1e-9)))
                bar = max(MIN_EFFECT_PCT, m["t"] * m["se_pct"])
            else:
                bar = MIN_EFFECT_PCT
            assert m["threshold_pct"] == pytest.approx(bar)
            assert m["verdict"] == ("gain" if expected > bar else "negative transfer" if expected < -bar else "neutral")
            changes.append(m["change_pct"])
        assert r["delta_m_pct"] == pytest.approx(np.mean(changes))  # Delta_m from the listed numbers
        assert set(r["val_change_pct"]) == set(tasks) and r["delta_m_val_pct"] == pytest.approx(np.mean(list(r["val_change_pct"].values())))
        assert r["worst_task"] == tasks[int(np.argmin(changes))]
        assert r["worst_change_pct"] == pytest.approx(min(changes))
        assert r["rows_per_second"] > 0
        for curve in r["grad_cosine_curves"].values():
            assert len(curve) >= 1 and all(-1.0 <= c <= 1.0 for c in curve)
        assert set(r["grad_cosine_curves"]) == {"ctr/cvr", "ctr/watch", "cvr/watch"}
        for g in r["gates_last"].values():
            assert sum(g["share"]) == pytest.approx(1.0, abs=1e-4) and 0 <= g["entropy"] <= g["max_entropy"] + 1e-6
        assert all(len(c) >= 1 for c in r["curves"].values())
    best = max(rep["multi"], key=lambda r: r["delta_m_val_pct"])  # chosen on val, not on the reported test
    assert rep["best"] == best["variant"] and best["best"] and sum(r["best"] for r in rep["multi"]) == 1

    md = (report_dir / "report.md").read_text()
    assert f"★ best by Δm: **{rep['best']}** (selected on val, every number reported on test)" in md
    assert "selected by Δm on **val**" in md and f"= {rep['comparisons']} verdicts" in md
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
        ([0.7000], [0.7004], True, "undetermined"),  # one seed: no spread, whatever the change
        ([0.70], [0.71], True, "undetermined"),
        ([0.70, 0.70], [0.71, 0.71], True, "gain"),  # no spread at all (a + b = 0): the floor alone
        ([0.70, 0.70], [0.7004, 0.7004], True, "neutral"),
    ],
)
def test_verdict_rule(single: list[float], multi: list[float], higher: bool, verdict: str) -> None:
    r = relative_change(summary(single), summary(multi), higher)
    assert r["verdict"] == verdict
    assert math.copysign(1, r["change_pct"]) == (1 if (np.mean(multi) > np.mean(single)) == higher else -1)


def test_t_critical_values() -> None:
    assert t_critical(2) == pytest.approx(4.303) and t_critical(4) == pytest.approx(2.776)
    for df in range(1, 31):  # every df a Welch-Satterthwaite floor can take with up to 16 seeds a side
        assert t_critical(df) == pytest.approx(_t975(df), abs=6e-4), df
    assert t_critical(35) == pytest.approx(2.042)  # between table rows: the more conservative
    assert t_critical(1000) == pytest.approx(2.0) and t_critical(0) == math.inf


def test_verdict_uses_welch_satterthwaite_df_with_unequal_spreads() -> None:
    """3 seeds, single-task spread 0.004 vs multi-task 0.0002 (the audit's case): the Welch df is
    about 2, not the pooled 4, so a +-1.1% change is within t SE and neutral, where the pooled
    df's smaller t would have called it a gain / negative transfer."""
    single = summary([0.696, 0.700, 0.704])
    for sign, old in ((1, "gain"), (-1, "negative transfer")):
        mean = 0.7 * (1 + sign * 0.011)
        multi = summary([mean - 0.0002, mean, mean + 0.0002])
        assert single["std"] == pytest.approx(0.004) and multi["std"] == pytest.approx(0.0002)
        r = relative_change(single, multi, True)
        assert r["verdict"] == "neutral"
        nu = _welch(0.004, 3, 0.0002, 3)
        assert 2.0 < nu < 2.1 and r["df"] == pytest.approx(nu)
        se = math.sqrt(0.004**2 / 3 + 0.0002**2 / 3) / 0.7 * 100
        assert r["se_pct"] == pytest.approx(se) and r["change_pct"] == pytest.approx(sign * 1.1)
        assert r["t"] == pytest.approx(_t975(2), abs=1e-3)
        assert r["threshold_pct"] == pytest.approx(_t975(2) * se, rel=1e-3)
        pooled_bar = _t975(4) * se  # the old rule: n_s + n_m - 2 = 4 df
        assert abs(r["change_pct"]) > pooled_bar and (r["change_pct"] > 0) == (old == "gain")  # old verdict: ``old``
    # equal spreads: Welch's df is the pooled one and the rule is unchanged
    r = relative_change(summary([0.70, 0.71, 0.70]), summary([0.75, 0.76, 0.75]), True)
    assert r["df"] == pytest.approx(4.0) and r["t"] == pytest.approx(2.776) and r["verdict"] == "gain"


def test_one_seed_is_undetermined_and_recommends_train_together() -> None:
    tasks = ["a", "b"]
    row = {"tasks": {}}
    for t, (s, m) in zip(tasks, ((0.70, 0.60), (0.70, 0.80)), strict=True):  # -14% and +14%: one seed says nothing
        r = relative_change(summary([s]), summary([m]), True)
        assert r["verdict"] == "undetermined" and r["df"] is None and r["se_pct"] is None
        assert r["threshold_pct"] == MIN_EFFECT_PCT and r["change_pct"] == pytest.approx((m - s) / s * 100)
        row["tasks"][t] = {**r, "worst_seed_change_pct": r["change_pct"]}
    aff = {"matrix": {i: dict.fromkeys(tasks, -1e-3) for i in tasks}, "se": {i: dict.fromkeys(tasks, 1e-5) for i in tasks}}
    for affinity in (None, aff):  # not keep single-task, even where the one seed lost 14% and nothing helps
        rec = recommend(row, tasks, affinity)
        for t in tasks:
            assert rec[t]["action"] == "train together" and "no evidence either way" in rec[t]["reason"]


def _fake_results(cfg, runs, val_pct: dict[str, float], test_pct: dict[str, float]) -> dict[str, dict]:
    """Run results by hand: single-task models at a base metric (seed jitter), each multi-task
    variant better by val_pct / test_pct (%, oriented) on val / test."""
    base = {"ctr": 0.70, "cvr": 0.65, "watch": 2.0}
    metric = {"ctr": "auc", "cvr": "auc", "watch": "rmse"}
    jitter = {0: -0.002, 1: 0.0, 2: 0.002}
    diag = {"grad_cosine": {}, "gates": {}, "grad_norm": {}, "dominance": 1.0}

    def metrics(seed: int, pct: float) -> dict:
        out = {}
        for t, b in base.items():
            v = b + jitter[seed] if metric[t] == "auc" else b * (1 + jitter[seed])
            v *= 1 + pct / 100 if metric[t] == "auc" else 1 - pct / 100
            out[t] = {metric[t]: v}
        return out

    results = {}
    for r in runs:
        seed = r.seed - cfg.train.seed
        val_m = metrics(seed, 0.0 if r.kind == "single" else val_pct[r.variant])
        test_m = metrics(seed, 0.0 if r.kind == "single" else test_pct[r.variant])
        results[r.name] = {"val": val_m, "test": test_m, "throughput": {"train_rows_per_second": 1000.0}, "best_epoch": 1,
                           "history": [{"val": val_m, "diagnostics": diag, "weights": {}}]}
    return results


def test_runs_write_no_shared_checkpoints_and_log_apart(tmp_path: Path) -> None:
    """A config with train.checkpoint made every run write one folder: the second run was
    refused (the first's checkpoints; compare cannot --resume) after the first had trained."""
    cfg = load_config(write_logs(tmp_path, rows=200, train={"checkpoint": {"dir": "ck", "every_steps": 1}, "log_dir": "tb"}))
    runs = plan(cfg, 2, weighting_variants(cfg, ["static"]))
    assert all(r.cfg.train.checkpoint is None for r in runs)
    assert len({r.cfg.train.log_dir for r in runs}) == len(runs) == 2 * (1 + 3)
    assert all(Path(r.cfg.train.log_dir) == Path(cfg.train.log_dir) / r.name for r in runs)


def test_best_variant_is_chosen_on_val_and_reported_on_test(tmp_path: Path) -> None:
    cfg = load_config(write_logs(tmp_path, rows=200))
    runs = plan(cfg, 3, weighting_variants(cfg, ["static", "pcgrad"]))
    # static is best on val (+1% vs 0%) but worst on test (-1% vs +2%): the choice must not see test
    results = _fake_results(cfg, runs, val_pct={"static": 1.0, "pcgrad": 0.0}, test_pct={"static": -1.0, "pcgrad": 2.0})
    rep = build_report(cfg, runs, results)
    by = {r["variant"]: r for r in rep["multi"]}
    assert rep["best"] == "static" and by["static"]["best"] and not by["pcgrad"]["best"]
    assert rep["split"] == "test" and rep["selected_on"] == "val" and rep["selection_is_report_split"] is False
    assert rep["comparisons"] == 2 * 3
    assert by["static"]["delta_m_val_pct"] == pytest.approx(1.0) and by["pcgrad"]["delta_m_val_pct"] == pytest.approx(0.0)
    # every reported number stays on test
    assert by["static"]["delta_m_pct"] == pytest.approx(-1.0) and by["pcgrad"]["delta_m_pct"] == pytest.approx(2.0)
    assert all(by["static"]["tasks"][t]["change_pct"] == pytest.approx(-1.0) for t in rep["tasks"])
    assert all(by["static"]["val_change_pct"][t] == pytest.approx(1.0) for t in rep["tasks"])
    assert rep["single"]["ctr"]["mean"] == pytest.approx(0.70)
    # recommendations are the chosen variant's (on its test verdicts)
    assert rep["recommendations"] == recommend(by["static"], rep["tasks"], None)
    md = render_markdown(rep, [])
    assert "★ best by Δm: **static** (selected on val, every number reported on test)" in md
    assert "| Δm on val (selection) |" in md and "= 6 verdicts" in md
    assert "by Δm on val" in rep["recommendation_rule"]

    # no test split: selected and reported on the same split, and the report says so
    no_test = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test": None})})
    rep = build_report(no_test, runs, results)
    assert rep["split"] == "val" and rep["selected_on"] == "val" and rep["selection_is_report_split"] is True
    assert rep["best"] == "static" and next(r for r in rep["multi"] if r["best"])["delta_m_pct"] == pytest.approx(1.0)
    md = render_markdown(rep, [])
    assert "selected and reported on the same split (val)" in md and "biased upward" in md
    assert "Δm on val (selection)" not in md and "(no test split configured)" in md

    # a task reading its own data without a test split has no test metrics (the trainer reports
    # test for the sources that have one): the whole report moves to val and names the task
    own = DataConfig(train=cfg.data.train, val=cfg.data.val)
    cvr_own = cfg.model_copy(update={"tasks": [t.model_copy(update={"data": own}) if t.name == "cvr" else t for t in cfg.tasks]})
    for res in results.values():
        del res["test"]["cvr"]
    rep = build_report(cvr_own, runs, results)
    assert rep["split"] == "val" and rep["untested_tasks"] == ["cvr"] and rep["selection_is_report_split"] is True
    assert rep["multi"][0]["tasks"]["cvr"]["change_pct"] == pytest.approx(1.0)  # static's val change
    assert "(no test split for cvr)" in render_markdown(rep, [])


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
    assert "ranker: error: --weightings: unknown weighting 'nope'" in capsys.readouterr().err
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "r"), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "r"), "--affinity-every", "5"]) == 2  # was ignored
    assert "ranker: error: --affinity-every: applies with --affinity only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["synth", "--out", str(tmp_path / "s"), "--rows", "5"]) == 2
    assert capsys.readouterr().err.startswith("ranker: error: --rows: ")


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



def test_epoch_probe_on_row_sparse_tables_matches_dense_tables() -> None:
    """With ``train.sparse_embeddings`` the probe keeps the tables' task gradients as rows:
    the same cosines and norms as dense tables, and its checkpointed sums stay row-sparse."""
    from ranker.config import FeatureSpec, ModelConfig, TaskSpec
    from ranker.model import MultiTaskRanker

    feats = [FeatureSpec(name="u", type="categorical", buckets=50, dim=4), FeatureSpec(name="p", type="dense", encoding="standard")]
    tasks = [TaskSpec(name=n, type="binary", label=n) for n in ("a", "b", "c")]
    gen = torch.Generator().manual_seed(0)
    batches = [({"cat": torch.randint(0, 50, (16, 1), generator=gen), "dense": torch.randn(16, 1, generator=gen)},
                torch.randint(0, 2, (16,), generator=gen).float()) for _ in range(2)]
    out = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = MultiTaskRanker(feats, tasks, ModelConfig(experts=2, expert_dims=[8], tower_dims=[4]))
        tables = model.encoder.sparse_tables() if sparse else []
        shared = list(model.encoder.parameters()) + list(model.trunk.parameters())
        probe = EpochProbe(shared, steps=2, batches=2, tables=tables)
        for batch, y in batches:
            raw = model(batch)
            probe.record({t: nn.functional.binary_cross_entropy_with_logits(raw[t], y if t != "b" else 1 - y) for t in raw}, {})
        out[sparse] = probe.summary()
        if not sparse:  # the tables' part counts: without them every task's norm is smaller
            weights = [t.weight for t in model.encoder.tables]
            bare = EpochProbe([p for p in shared if all(p is not w for w in weights)], steps=1, batches=1)
            raw = model(batches[0][0])
            bare.record({t: nn.functional.binary_cross_entropy_with_logits(raw[t], batches[0][1]) for t in raw}, {})
            first = EpochProbe(shared, steps=1, batches=1)
            first.record({t: nn.functional.binary_cross_entropy_with_logits(raw[t], batches[0][1]) for t in raw}, {})
            assert all(bare.summary()["grad_norm"][t] < 0.999 * first.summary()["grad_norm"][t] for t in raw)
        if sparse:
            state = probe.state()
            assert all(g.is_sparse and g._nnz() <= 32 for parts in state["table_sums"].values() for g in parts)
            again = EpochProbe(shared, steps=2, batches=2, tables=tables)
            again.set_state(state)
            assert again.summary()["grad_cosine"] == out[True]["grad_cosine"]
    for key in ("grad_cosine", "grad_cosine_batch", "grad_norm"):
        assert out[True][key].keys() == out[False][key].keys()
        for k, v in out[False][key].items():
            assert out[True][key][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (key, k)


def test_report_stability_affinity_and_recommendation(report_dir: Path) -> None:
    from ranker.training.compare import AFFINITY_Z, WORST_SEED_PCT

    rep = json.loads((report_dir / "report.json").read_text())
    tasks = rep["tasks"]
    for r in rep["multi"]:
        for t in tasks:
            m, s = r["tasks"][t], rep["single"][t]
            sign = 1 if rep["metric"][t]["higher_is_better"] else -1
            per_seed = [sign * (mv - sv) / abs(sv) * 100 for mv, sv in zip(m["values"], s["values"], strict=True)]
            assert m["seed_change_pct"] == pytest.approx(per_seed)
            assert m["worst_seed_change_pct"] == pytest.approx(min(per_seed))
            assert m["spread_pct"] == pytest.approx(np.std(m["values"], ddof=1) / abs(s["mean"]) * 100)
        a = r["affinity"]
        # 2 epochs of 1600/200 = 8 steps (patience 2: no early stop), steps 0, 3, ..., 15 probed, per seed
        assert a["runs"] == SEEDS and a["steps"] == SEEDS * math.ceil(2 * 8 / 3) and a["every"] == 3
        assert set(a["matrix"]) == set(tasks)
        for i in tasks:
            assert a["matrix"][i][i] > 0  # a small step on a task's own gradient lowers its own loss
    aff = rep["affinity"]
    assert aff["variant"] == rep["best"] and aff["matrix"] == next(r for r in rep["multi"] if r["best"])["affinity"]["matrix"]
    assert set(aff["by_variant"]) == set(VARIANTS)
    best = next(r for r in rep["multi"] if r["best"])
    for t, rec in rep["recommendations"].items():
        m = best["tasks"][t]
        degraded = m["verdict"] == "negative transfer" or m["worst_seed_change_pct"] < -WORST_SEED_PCT
        if not degraded:
            assert rec["action"] == "train together"
        else:
            helps = [j for j in tasks if j != t and aff["matrix"][j][t] > AFFINITY_Z * aff["se"][j][t]]
            want = "group differently" if helps and len(helps) < len(tasks) - 1 else "keep single-task"
            assert rec["action"] == want and (rec["with"] == helps if want == "group differently" else True)
    md = (report_dir / "report.md").read_text()
    assert "## Stability across retrains" in md and "## Task affinity (lookahead)" in md
    assert md.rstrip().splitlines()[-1] == rep["recommendation_rule"]  # the report ends with the rule
    assert md.index("## Recommendation") > md.index("## Plots")


def test_recommendation_rule_on_hand_made_numbers() -> None:
    def row(verdicts: dict[str, tuple[str, float]]) -> dict:
        return {"tasks": {t: {"verdict": v, "change_pct": w, "worst_seed_change_pct": w} for t, (v, w) in verdicts.items()}}

    tasks = ["a", "b", "c"]
    z = {"a": {"a": 1e-3, "b": 5e-4, "c": -5e-4}, "b": {"a": 4e-4, "b": 1e-3, "c": 1e-5}, "c": {"a": -3e-4, "b": 0.0, "c": 1e-3}}
    se = {i: dict.fromkeys(tasks, 1e-5) for i in tasks}
    aff = {"matrix": z, "se": se}
    rec = recommend(row({"a": ("gain", 1.0), "b": ("neutral", -3.0), "c": ("negative transfer", -2.0)}), tasks, aff)
    assert rec["a"]["action"] == "train together"
    assert rec["b"] == {**rec["b"], "action": "group differently", "with": ["a"]}  # a seed lost 3%; a helps b, c does not
    assert rec["c"]["action"] == "keep single-task"  # nobody helps c (a hurts it)
    assert recommend(row({"a": ("negative transfer", -2.0), "b": ("gain", 1.0), "c": ("gain", 1.0)}), tasks, None)["a"]["action"] == "keep single-task"
    rec = recommend(row({"a": ("undetermined", -2.0), "b": ("undetermined", 1.0), "c": ("undetermined", -5.0)}), tasks, aff)
    assert all(r["action"] == "train together" for r in rec.values())  # one seed: no evidence either way


def test_affinity_probe_leaves_training_untouched_and_sees_identical_tasks_help(tmp_path: Path) -> None:
    """Two tasks on one label share everything useful: they help each other; on an independent
    label they do not. The probed run's weights equal the unprobed run's bit for bit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranker.config import parse_config
    from ranker.training.compare import AffinitySettings, affinity_probe
    from ranker.training.trainer import Trainer

    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 600)):
        x = rng.normal(size=(n, 4))
        y = (x @ np.array([1.0, -1.0, 0.5, 0.0]) + rng.normal(0, 0.3, n) > 0).astype(np.int64)
        other = (rng.random(n) < 0.5).astype(np.int64)  # independent of everything
        cols = {f"x{k}": x[:, k] for k in range(4)} | {"y": y, "y_copy": y.copy(), "noise": other}
        (tmp_path / split).mkdir()
        pq.write_table(pa.table(cols), tmp_path / split / "p.parquet")

    def run(second: str, probe: bool, out: str) -> dict | None:
        cfg = parse_config({
            "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")},
            "features": [{"name": f"x{k}", "type": "dense"} for k in range(4)],
            "tasks": [{"name": "a", "type": "binary", "label": "y"}, {"name": "b", "type": "binary", "label": second}],
            "model": {"architecture": "shared_bottom", "expert_dims": [16], "tower_dims": [8]},
            "train": {"epochs": 2, "batch_size": 100, "lr": 0.01, "weighting": "static", "threads": 1, "progress": False,
                      "diagnostics_batches": 0},
        })
        tr = Trainer(cfg, progress=False, log=lambda s: None)
        p = affinity_probe(cfg, AffinitySettings(every=1, lr=0.05)) if probe else None
        if p is not None:
            tr.step_hooks.append(p)
        tr.run(tmp_path / out)
        return p.summary() if p is not None else None

    same = run("y_copy", True, "same")
    indep = run("noise", True, "indep")
    run("y_copy", False, "plain")
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert same is not None and indep is not None and same["steps"] == 60
    sym = {k: (s["matrix"]["a"]["b"] + s["matrix"]["b"]["a"]) / 2 for k, s in (("same", same), ("indep", indep))}
    assert sym["same"] > 0 and sym["same"] > 5 * abs(sym["indep"])


def test_affinity_is_higher_for_correlated_tasks_on_synthetic_logs(tmp_path: Path) -> None:
    """The MMoE paper's synthetic data: ctr and watch share one hidden direction at correlation
    1.0 and none at 0.0; their mutual lookahead affinity is higher in the first case."""
    from ranker.training.compare import AffinitySettings, affinity_probe
    from ranker.training.synth import write_synthetic
    from ranker.training.trainer import Trainer

    sym = {}
    for p in (1.0, 0.0):
        path = write_synthetic(tmp_path / f"p{p:g}", rows=20_000, seed=0, task_correlation=p)
        raw = yaml.safe_load(path.read_text())
        # standardised numbers, as when this was measured: with the quantile-bin default the
        # ctr/watch signal (1e-6) falls inside the noise of this small run
        raw["features"] = [{**f, "encoding": "standard"} if f["type"] == "dense" and "transform" not in f else f for f in raw["features"]]
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        cfg = load_config(path)
        cfg = cfg.model_copy(update={
            "model": cfg.model.model_copy(update={"experts": 4, "expert_dims": [64, 32], "tower_dims": [16]}),
            "train": cfg.train.model_copy(update={"epochs": 2, "batch_size": 512, "lr": 0.002, "threads": 1, "weighting": "static",
                                                  "diagnostics_batches": 0, "progress": False}),
        })
        tr = Trainer(cfg, progress=False, log=lambda s: None)
        probe = affinity_probe(cfg, AffinitySettings(every=1))
        tr.step_hooks.append(probe)
        tr.run(tmp_path / f"b{p:g}")
        z = probe.summary()["matrix"]
        sym[p] = (z["ctr"]["watch"] + z["watch"]["ctr"]) / 2
    assert sym[1.0] > 0 and sym[1.0] > sym[0.0]


def test_affinity_pooled_over_seeds_counts_the_seeds_spread() -> None:
    """Many steps agreeing within each seed but seeds disagreeing: the pooled SE is at least
    the seeds' std / sqrt(seeds), not the far smaller one of all steps taken as one run."""
    from ranker.training.affinity import pool

    def summary(m: float) -> dict:
        return {"steps": 100, "tasks": ["a", "b"], "matrix": {"a": {"b": m}, "b": {"a": m}},
                "se": {"a": {"b": 1e-6}, "b": {"a": 1e-6}}, "count": {"a": {"b": 100}, "b": {"a": 100}}}

    seeds = [1e-3, 9e-4, 1e-6]
    got = pool([summary(m) for m in seeds])
    want = float(np.std(seeds, ddof=1) / np.sqrt(3))
    assert got["matrix"]["a"]["b"] == pytest.approx(np.mean(seeds))
    assert got["se"]["a"]["b"] == pytest.approx(want, rel=1e-9)
    one = pool([summary(5e-4)])  # one run: its steps' SE
    assert one["se"]["a"]["b"] == pytest.approx(1e-6, rel=1e-6)
