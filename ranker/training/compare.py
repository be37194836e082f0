"""``ranker compare``: does training the tasks together help each of them?

For every seed, trains the multi-task model (once per weighting) and one single-task model per
task with the same data, architecture, widths and epochs, then reports per task the test metric
(val when no test split is configured) single vs multi as mean +- std over seeds, the relative
change, a verdict, and Delta_m (Maninis et al., CVPR 2019; Vandenhende et al., TPAMI 2021):

    Delta_m = 1/T sum_t s_t (M_multi,t - M_single,t) / |M_single,t| x 100%,
    s_t = +1 when higher is better for task t's metric, -1 when lower is better.

Comparison metric per task type: AUC (binary), RMSE (regression; R^2 is unstable as a ratio
near 0). Product tasks (ESMM's ctcvr) have no single-task counterpart and are left out of
Delta_m; a ``loss: false`` factor (ESMM's cvr) is compared with a cvr model trained directly on
its labelled rows, which is exactly the question ESMM answers.

Verdict per task (Welch's t-test), with d the relative change (%) of the seed means and SE its
Welch standard error (sqrt(a + b) / |mean_single|, a = s_single^2 / n_s, b = s_multi^2 / n_m,
sample std over seeds), and t the Student-t 97.5% quantile at floor(nu) degrees of freedom, nu the
Welch-Satterthwaite df (a + b)^2 / (a^2 / (n_s - 1) + b^2 / (n_m - 1)) (between min(n) - 1 and
n_s + n_m - 2: 1 to 2 for two seeds each, so t is 4.30 to 12.71; 2 to 4 for three, 2.78 to 4.30;
few seeds or one noisy side give a poor estimate of the spread, so the bar is high):
``gain`` if d > max(MIN_EFFECT_PCT, t SE), ``negative transfer`` if d < -max(MIN_EFFECT_PCT, t SE),
else ``neutral``. With a single seed there is no spread to judge by: the verdict is
``undetermined`` whatever the change (the recommendation then says train together, with no
evidence either way).

The best variant (for the recommendations and the affinity section) is the one with the highest
Delta_m on val (each run's best-epoch val metrics); every number in the report, its Delta_m
included, is then on test, which took no part in the choice. Without a test split for every compared
task (a task reading its own ``data`` needs its own ``test``) the choice and the report are on
the same split (val) and the best variant's Delta_m is biased upward by the
selection; the report says so and gives the number of comparisons (variants x tasks) behind it.

Stability across retrains: per task, each seed's change against the same seed's single-task
model, the worst of them, and the spread (std over seeds) of multi and single. With
``affinity`` (``--affinity``), every multi-task run carries a lookahead probe
(``ranker.training.affinity``) and the report gains the task-affinity matrix. The report ends
with a recommendation per task (train together, group differently, keep single-task), for the
best variant by Delta_m on val, by RECOMMENDATION_RULE.

Writes REPORT_DIR/report.md, report.json, metrics.png, learning_curves.png, grad_cosine.png,
gates.png (gated trunks), affinity.png (with affinity), and every run's bundle and log under
REPORT_DIR/runs/.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ranker.bundle import json_safe
from ranker.config import RankerConfig
from ranker.errors import RankerError
from ranker.training.affinity import AffinityProbe, pool
from ranker.training.metrics import HIGHER_IS_BETTER
from ranker.training.sources import source_groups
from ranker.training.trainer import Trainer, task_losses
from ranker.training.weighting import check_weighting

COMPARE_METRIC = {"binary": "auc", "regression": "rmse"}
MIN_EFFECT_PCT = 0.1  # relative changes smaller than this are neutral whatever the spread
# Student-t 97.5% quantiles by degrees of freedom (no scipy): every df 1..30, then 40 and 60; a df
# between rows gets the next smaller row's (conservative), beyond 60 the 60 row's (2.000 > 1.960)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000}
SINGLE_WEIGHTING = "static"  # one task: nothing to balance
# a retrain (one seed) losing more than this (%) of its single-task seed's metric is a degradation
WORST_SEED_PCT = 1.0
AFFINITY_Z = 2.0  # an affinity counts as help (hurt) when its mean is this many SEs above (below) 0


@dataclass(frozen=True)
class AffinitySettings:
    """``compare --affinity``: probe every ``every``-th step of each multi-task run with a
    lookahead step of size ``lr`` (None: the run's train.lr)."""

    every: int = 10
    lr: float | None = None


@dataclass(frozen=True)
class Run:
    name: str  # folder under runs/
    kind: str  # "multi" | "single"
    variant: str  # multi: the configuration's name in the report (its weighting, for the CLI)
    task: str | None  # single: its task
    seed: int
    cfg: RankerConfig


def single_task_config(cfg: RankerConfig, task: str) -> RankerConfig:
    """The config restricted to one task (trained with its own loss), everything else equal."""
    spec = cfg.task(task).model_copy(update={"loss": True, "weight": 1.0})
    monitor = cfg.train.monitor if cfg.train.monitor.split(".")[0] == task else "mean"
    train = cfg.train.model_copy(update={"weighting": SINGLE_WEIGHTING, "monitor": monitor})
    # other tasks' bias-tower features (position) must not turn into this model's inputs
    others = set(cfg.bias_feature_names) - set(spec.bias_features)
    features = [f for f in cfg.features if f.name not in others]
    return cfg.model_copy(update={"tasks": [spec], "train": train, "features": features})


def compared_tasks(cfg: RankerConfig) -> list[str]:
    return [t.name for t in cfg.tasks if not t.product]


def untested_tasks(cfg: RankerConfig) -> list[str]:
    """Compared tasks whose source has no test split: with any, the whole report is on val, so
    that every task's change and Delta_m are on one split.

    Example:
        >>> from ranker.config import parse_config
        >>> cfg = parse_config({"data": {"train": "clicks", "val": "clicks_val", "test": "clicks_test"},
        ...     "features": [{"name": "price", "type": "dense"}],
        ...     "tasks": [{"name": "ctr", "type": "binary", "label": "click"},
        ...               {"name": "cvr", "type": "binary", "label": "conversion", "data": {"train": "conv", "val": "conv_val"}}]})
        >>> untested_tasks(cfg)
        ['cvr']
    """
    tested = {t.name for _, data, tasks in source_groups(cfg) if data.test for t in tasks}
    return [t for t in compared_tasks(cfg) if t not in tested]


def _seeded(cfg: RankerConfig, seed: int, name: str) -> RankerConfig:
    """The run's config: its seed, TensorBoard scalars under ``log_dir/<run name>``, and no
    checkpoints (every run would write one folder, the second refusing the first's files,
    and a compare cannot resume a run)."""
    log_dir = str(Path(cfg.train.log_dir) / name) if cfg.train.log_dir else None
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed, "checkpoint": None, "log_dir": log_dir})})


def plan(cfg: RankerConfig, seeds: int, variants: dict[str, RankerConfig]) -> list[Run]:
    """Every run: each multi-task variant and each task's single-task model (built from
    ``cfg``), for seeds train.seed, train.seed + 1, ..."""
    runs = []
    for i in range(seeds):
        seed = cfg.train.seed + i
        for name, c in variants.items():
            run = f"multi-{name}-seed{seed}"
            runs.append(Run(run, "multi", name, None, seed, _seeded(c, seed, run)))
        for t in compared_tasks(cfg):
            run = f"single-{t}-seed{seed}"
            runs.append(Run(run, "single", SINGLE_WEIGHTING, t, seed, _seeded(single_task_config(cfg, t), seed, run)))
    return runs


def weighting_variants(cfg: RankerConfig, weightings: Sequence[str]) -> dict[str, RankerConfig]:
    return {w: cfg.model_copy(update={"train": cfg.train.model_copy(update={"weighting": w})}) for w in weightings}


# ----- statistics --------------------------------------------------------------------------
def t_critical(df: int) -> float:
    """Two-sided 95% Student-t critical value; exact to 3 decimals for df 1..30, 40 and 60, otherwise
    conservative (the next smaller df in the table); inf below 1."""
    known = [d for d in _T975 if d <= df]
    return _T975[max(known)] if known else float("inf")


def summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None}


def welch_df(single: dict, multi: dict) -> float | None:
    """Welch-Satterthwaite degrees of freedom of the difference of the two seed means; None with
    one seed on either side (no spread) or no spread at all (a + b == 0: only the floor matters)."""
    n_s, n_m = len(single["values"]), len(multi["values"])
    if single["std"] is None or multi["std"] is None or n_s < 2 or n_m < 2:
        return None
    a, b = single["std"] ** 2 / n_s, multi["std"] ** 2 / n_m
    if not (math.isfinite(a) and math.isfinite(b)) or a + b == 0:
        return None
    nu = (a + b) ** 2 / (a**2 / (n_s - 1) + b**2 / (n_m - 1))
    # nu lies in [min(n) - 1, n_s + n_m - 2]; clamp against rounding at the ends
    return min(max(nu, min(n_s, n_m) - 1.0), n_s + n_m - 2.0)


def relative_change(single: dict, multi: dict, higher_is_better: bool) -> dict:
    """Oriented relative change (%) of the seed means, its Welch standard error, the Welch-
    Satterthwaite df, the t critical value at floor(df) and the verdict (``undetermined`` when
    either side has a single seed: no spread to judge by)."""
    base = abs(single["mean"])
    sign = 1.0 if higher_is_better else -1.0
    change = sign * (multi["mean"] - single["mean"]) / base * 100 if base > 0 else float("nan")
    n_s, n_m = len(single["values"]), len(multi["values"])
    se = None
    if single["std"] is not None and multi["std"] is not None and base > 0:
        se = math.sqrt(single["std"] ** 2 / n_s + multi["std"] ** 2 / n_m) / base * 100
    df = welch_df(single, multi)
    t = t_critical(math.floor(df + 1e-9)) if df is not None else None
    bar = max(MIN_EFFECT_PCT, t * se) if se is not None and t is not None else MIN_EFFECT_PCT
    if single["std"] is None or multi["std"] is None:
        verdict = "undetermined"
    else:
        verdict = "gain" if change > bar else "negative transfer" if change < -bar else "neutral"
    return {"change_pct": change, "se_pct": se, "df": df, "t": t, "threshold_pct": bar, "verdict": verdict}


def delta_m(changes: Sequence[float]) -> float:
    """Mean oriented relative change (%) over tasks."""
    return float(np.mean(changes))


# ----- running -------------------------------------------------------------------------------
def _metric_of(res_metrics: dict, split: str, task: str, metric: str) -> float:
    v = res_metrics[split][task][metric]
    return float(v) if v is not None else float("nan")


def affinity_probe(cfg: RankerConfig, settings: AffinitySettings) -> AffinityProbe:
    """A lookahead probe scoring each task with the trainer's own loss over its labelled rows."""
    types = {t.name: t.type for t in cfg.tasks if t.loss}
    lr = settings.lr if settings.lr is not None else cfg.train.lr
    return AffinityProbe(lambda m, raw, b: task_losses(m, types, raw, b), lr=lr, every=settings.every)


def run_all(runs: Sequence[Run], out: Path, progress: bool = True, affinity: AffinitySettings | None = None) -> dict[str, dict]:
    """Train every run (bundle + log under out/runs/); returns {run name: metrics}. With
    ``affinity``, every multi-task run is probed and its result carries ``"affinity"``."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    bar = tqdm(runs, desc="compare", unit="run", disable=not progress, file=sys.stderr)
    for run in bar:
        bar.set_postfix_str(run.name)
        log_path = out / "runs" / f"{run.name}.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            trainer = Trainer(run.cfg, progress=False, log=lambda s, f=log: print(s, file=f, flush=True))
            probe = affinity_probe(run.cfg, affinity) if affinity is not None and run.kind == "multi" else None
            if probe is not None:
                trainer.step_hooks.append(probe)
            res = trainer.run(out / "runs" / run.name)
        results[run.name] = {**res.metrics, "wall_seconds": time.perf_counter() - t0}
        if probe is not None:
            results[run.name]["affinity"] = probe.summary()
    return results


# ----- the report ----------------------------------------------------------------------------
def _mean_curves(curves: list[list[float]]) -> list[float]:
    """Per-epoch mean over seeds; runs stopped early contribute to the epochs they reached."""
    n = max((len(c) for c in curves), default=0)
    return [float(np.nanmean([c[e] for c in curves if e < len(c)])) for e in range(n)]


def _mean_over_runs(dicts: list[dict]) -> dict:
    """{key: mean over the dicts that have the key} (a masked task may miss a sampled step)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


def _diagnostics(histories: list[list[dict]]) -> dict:
    """Per-epoch gradient cosines and last-epoch norms, loss weights and gates, over seeds."""
    pairs = list(dict.fromkeys(p for hs in histories for h in hs for p in h["diagnostics"]["grad_cosine"]))
    last = [hs[-1]["diagnostics"] for hs in histories]
    gates = {}
    for t in dict.fromkeys(t for d in last for t in d["gates"]):
        g = [d["gates"][t] for d in last if t in d["gates"]]
        gates[t] = {"share": np.mean([x["share"] for x in g], axis=0).tolist(),
                    "entropy": float(np.mean([x["entropy"] for x in g])), "max_entropy": g[0]["max_entropy"]}
    return {
        "grad_cosine_curves": {
            p: _mean_curves([[h["diagnostics"]["grad_cosine"].get(p, float("nan")) for h in hs] for hs in histories]) for p in pairs
        },
        "grad_norm_last": _mean_over_runs([d["grad_norm"] for d in last]),
        "dominance_last": float(np.mean([d["dominance"] for d in last])),
        "weights_last": _mean_over_runs([hs[-1]["weights"] for hs in histories]),
        "gates_last": gates,
    }


def build_report(cfg: RankerConfig, runs: Sequence[Run], results: dict[str, dict], source: str = "", variant_kind: str = "weighting") -> dict:
    untested = untested_tasks(cfg)
    split = "val" if untested else "test"  # every reported number
    select = "val"  # the best variant is chosen by its Delta_m here (best-epoch val metrics)
    types = {t.name: t.type for t in cfg.tasks}
    tasks = compared_tasks(cfg)
    metric = {t: COMPARE_METRIC[types[t]] for t in tasks}
    higher = {t: bool(HIGHER_IS_BETTER[metric[t]]) for t in tasks}
    seeds = sorted({r.seed for r in runs})
    variants = list(dict.fromkeys(r.variant for r in runs if r.kind == "multi"))

    def runs_of(kind: str, key: str) -> list[Run]:
        return [r for r in runs if r.kind == kind and (r.task if kind == "single" else r.variant) == key]

    single, single_sel, single_curves = {}, {}, {}
    for t in tasks:
        rs = runs_of("single", t)
        single[t] = summary([_metric_of(results[r.name], split, t, metric[t]) for r in rs])
        single_sel[t] = summary([_metric_of(results[r.name], select, t, metric[t]) for r in rs])
        single[t]["rows_per_second"] = float(np.mean([results[r.name]["throughput"]["train_rows_per_second"] for r in rs]))
        single_curves[t] = _mean_curves([[h["val"][t][metric[t]] for h in results[r.name]["history"]] for r in rs])

    for t in tasks:
        single[t]["spread_pct"] = _spread_pct(single[t]["values"], single[t]["mean"])
    sign = {t: 1.0 if higher[t] else -1.0 for t in tasks}
    rows = []
    for v in variants:
        rs = runs_of("multi", v)
        per_task = {}
        for t in tasks:
            m = summary([_metric_of(results[r.name], split, t, metric[t]) for r in rs])
            per_task[t] = {**m, **relative_change(single[t], m, higher[t])}
            # stability across retrains: multi seed i vs single seed i, and the seeds' spread
            seed_changes = [sign[t] * (mv - sv) / abs(sv) * 100 if sv else float("nan")
                            for mv, sv in zip(m["values"], single[t]["values"], strict=True)]
            per_task[t]["seed_change_pct"] = seed_changes
            per_task[t]["worst_seed_change_pct"] = float(np.nanmin(seed_changes)) if np.isfinite(seed_changes).any() else float("nan")
            per_task[t]["spread_pct"] = _spread_pct(m["values"], single[t]["mean"])
        changes = [per_task[t]["change_pct"] for t in tasks]
        # the selection's numbers: the same oriented change, on val
        sel_changes = {t: relative_change(single_sel[t], summary([_metric_of(results[r.name], select, t, metric[t]) for r in rs]),
                                          higher[t])["change_pct"] for t in tasks}
        # per-seed Delta_m (multi seed i vs single seed i) for its spread
        seed_dm = [delta_m([per_task[t]["seed_change_pct"][i] for t in tasks]) for i in range(len(seeds))]
        worst = min(tasks, key=lambda t: per_task[t]["change_pct"])
        histories = [results[r.name]["history"] for r in rs]
        rows.append({
            "variant": v,
            "architecture": rs[0].cfg.model.architecture,
            "weighting": rs[0].cfg.train.weighting,
            "tasks": per_task,
            "delta_m_pct": delta_m(changes),
            "delta_m_seed_std_pct": float(np.std(seed_dm, ddof=1)) if len(seed_dm) > 1 else None,
            "delta_m_val_pct": delta_m(list(sel_changes.values())),  # what selects the best variant
            "val_change_pct": sel_changes,
            "worst_task": worst,
            "worst_change_pct": per_task[worst]["change_pct"],
            "rows_per_second": float(np.mean([results[r.name]["throughput"]["train_rows_per_second"] for r in rs])),
            "curves": {t: _mean_curves([[h["val"][t][metric[t]] for h in hs] for hs in histories]) for t in tasks},
            **_diagnostics(histories),
        })
        probed = [results[r.name]["affinity"] for r in rs if "affinity" in results[r.name]]
        if probed:
            rows[-1]["affinity"] = {**pool(probed), "lr": probed[0]["lr"], "every": probed[0]["every"],
                                    "by_seed": [p["matrix"] for p in probed]}  # each seed's own mean, for the spread over seeds
    # chosen on val, reported on test: picking the max of several noisy Delta_m on the split it is
    # reported on would bias the reported best upward
    best = max(rows, key=lambda r: r["delta_m_val_pct"] if math.isfinite(r["delta_m_val_pct"]) else -math.inf)
    for r in rows:
        r["best"] = r is best
    extra: dict[str, Any] = {}
    if "affinity" in best:
        a = best["affinity"]
        extra["affinity"] = {
            "variant": best["variant"], "tasks": a["tasks"], "matrix": a["matrix"], "se": a["se"], "steps": a["steps"],
            "lr": a["lr"], "every": a["every"], "by_variant": {r["variant"]: r["affinity"]["matrix"] for r in rows if "affinity" in r},
            "rule": AFFINITY_RULE,
        }
    return {
        "config": source,
        "split": split,
        "selected_on": select,
        "selection_is_report_split": select == split,
        "untested_tasks": untested,  # compared tasks without a test split: the reason for val
        "comparisons": len(rows) * len(tasks),  # verdicts made (variants x tasks), each at 5%
        "seeds": seeds,
        "architecture": cfg.model.architecture,
        "epochs": cfg.train.epochs,
        "tasks": tasks,
        "variant_kind": variant_kind,
        "metric": {t: {"name": metric[t], "higher_is_better": higher[t]} for t in tasks},
        "verdict_rule": VERDICT_RULE + (
            f" Here: {len(seeds)} seeds per side, so df between {len(seeds) - 1} and {2 * len(seeds) - 2} "
            f"(t {t_critical(2 * len(seeds) - 2):.2f} to {t_critical(len(seeds) - 1):.2f})." if len(seeds) > 1 else
            " Here: one seed, so every verdict is undetermined."
        ),
        "single_weighting": SINGLE_WEIGHTING,
        "single": {t: {**single[t], "curve": single_curves[t]} for t in tasks},
        "multi": rows,
        "best": best["variant"],
        "excluded_from_delta_m": [t.name for t in cfg.tasks if t.product],
        **extra,
        "recommendation_rule": RECOMMENDATION_RULE,
        "recommendations": recommend(best, tasks, extra.get("affinity")),
    }


VERDICT_RULE = (
    "Welch's t-test on the seed means. d = oriented relative change (%) of the seed means; "
    "SE = sqrt(a + b)/|mean_single| x 100, a = s_single^2/n_s, b = s_multi^2/n_m (Welch standard error, sample std over seeds); "
    "t = Student-t 97.5% quantile at floor(ν) degrees of freedom, ν = (a + b)^2 / (a^2/(n_s - 1) + b^2/(n_m - 1)) "
    "(Welch–Satterthwaite; per task in report.json as df and t). "
    f"gain if d > max({MIN_EFFECT_PCT}%, t SE); negative transfer if d < -max({MIN_EFFECT_PCT}%, t SE); else neutral "
    f"(no spread at all, a + b = 0: the {MIN_EFFECT_PCT}% floor alone). "
    "One seed: no spread to judge by, the verdict is undetermined whatever the change."
)
AFFINITY_RULE = (
    "Z[i][j] = 1 - L_j(after one SGD step of size lr on task i's loss alone, shared parameters only) / L_j(before), "
    "on the same batch, averaged over the sampled steps of every seed's multi-task run (Fifty et al., NeurIPS 2021). "
    f"i helps j if Z[i][j] > {AFFINITY_Z:g} SE, hurts j if Z[i][j] < -{AFFINITY_Z:g} SE, else no measurable effect."
)
RECOMMENDATION_RULE = (
    "For each task, on the best multi-task variant by Δm on val: **train together** if its verdict is not negative transfer "
    f"and no seed lost more than {WORST_SEED_PCT:g}% against the same seed's single-task model; otherwise, with "
    "affinity measured, **group differently** (with the tasks that help it) when some but not all other tasks help it, "
    "and **keep single-task** when none do, or all do (then the loss is not gradient conflict: capacity or balancing); "
    "without affinity, **keep single-task**. An undetermined verdict (one seed) is no evidence either way: "
    "**train together** (the configuration as given), to be checked with more seeds."
)


def _spread_pct(values: Sequence[float], base: float) -> float | None:
    """Sample std over seeds as % of |base| (None with one seed)."""
    if len(values) < 2 or not base:
        return None
    return float(np.std(values, ddof=1)) / abs(base) * 100


def recommend(row: dict, tasks: Sequence[str], affinity: dict | None) -> dict[str, dict]:
    """Per task: {"action", "with", "reason"} by RECOMMENDATION_RULE."""
    out: dict[str, dict] = {}
    for t in tasks:
        m = row["tasks"][t]
        worst = m["worst_seed_change_pct"]
        degraded = m["verdict"] == "negative transfer" or (math.isfinite(worst) and worst < -WORST_SEED_PCT)
        reason = f"{m['verdict']} ({_fmt(m['change_pct'], pct=True)}), worst seed {_fmt(worst, pct=True)}"
        if m["verdict"] == "undetermined":  # one seed: its change alone says nothing either way
            out[t] = {"action": "train together", "with": [x for x in tasks if x != t],
                      "reason": f"undetermined ({_fmt(m['change_pct'], pct=True)}): one seed, no evidence either way; "
                                "rerun with --seeds 3 or more"}
            continue
        if not degraded:
            out[t] = {"action": "train together", "with": [x for x in tasks if x != t], "reason": reason}
            continue
        others = [x for x in tasks if x != t]
        if affinity is None or t not in affinity["matrix"]:
            out[t] = {"action": "keep single-task", "with": [], "reason": reason + "; no affinity measured"}
            continue
        z, se = affinity["matrix"], affinity["se"]
        helps = [j for j in others if j in z and math.isfinite(z[j][t]) and math.isfinite(se[j][t]) and z[j][t] > AFFINITY_Z * se[j][t]]
        if helps and len(helps) < len(others):
            out[t] = {"action": "group differently", "with": helps, "reason": reason + f"; helped by {', '.join(helps)}"}
        else:
            why = "no other task helps it" if not helps else "every other task helps it: not gradient conflict, try capacity or weighting"
            out[t] = {"action": "keep single-task", "with": [], "reason": reason + f"; {why}"}
    return out


def _fmt(v: float | None, std: float | None = None, pct: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    s = f"{v:+.2f}%" if pct else f"{v:.4f}"
    if std is not None:
        s += f" ± {std:.2f}" if pct else f" ± {std:.4f}"
    return s


def _selection_line(rep: dict) -> str:
    """Which split chose the best variant and which one the numbers are on."""
    if rep["selected_on"] != rep["split"]:
        return (f"- best variant: selected by Δm on **{rep['selected_on']}** (best-epoch metrics); every number below is on "
                f"**{rep['split']}**, which took no part in the choice")
    missing = rep.get("untested_tasks") or []
    some = 0 < len(missing) < len(rep["tasks"])
    why = f"no test split for {', '.join(missing)}" if some else "no test split configured"
    return (f"- best variant: selected by Δm on **{rep['selected_on']}**, the split reported here too ({why}): the best "
            "variant's Δm is biased upward by the choice; configure a test split for every task for an unbiased one")


def render_markdown(rep: dict, plots: Sequence[str]) -> str:
    tasks, metric = rep["tasks"], rep["metric"]
    metric_desc = ", ".join(
        f"{t} {m['name'].upper()} ({'higher' if m['higher_is_better'] else 'lower'} is better)" for t, m in metric.items()
    )
    lines = [
        "# Multi-task vs single-task",
        "",
        f"- config: `{rep['config']}`",
        f"- architecture: {', '.join(dict.fromkeys(r['architecture'] for r in rep['multi']))}, up to {rep['epochs']} epochs (best epoch on val), seeds: {', '.join(map(str, rep['seeds']))}",
        f"- metric: {metric_desc}, on the **{rep['split']}** split",
        _selection_line(rep),
        f"- comparisons: {len(rep['multi'])} variant(s) x {len(tasks)} tasks = {rep['comparisons']} verdicts, each at the 5% level: "
        f"with no effect anywhere up to about {0.05 * rep['comparisons']:.1f} of them would still read gain or negative transfer",
        f"- single-task baselines: one {rep['architecture']} model per task, same widths and epochs, weighting `{rep['single_weighting']}`",
    ]
    if rep["excluded_from_delta_m"]:
        lines.append(f"- no single-task counterpart, left out of Δm: {', '.join(rep['excluded_from_delta_m'])}")
    lines += ["", "## Summary", ""]
    separate = rep["selected_on"] != rep["split"]
    sel_head = f" Δm on {rep['selected_on']} (selection) |" if separate else ""
    lines.append(f"| {rep['variant_kind']} | Δm |{sel_head} worst task | " + " | ".join(tasks) + " | train rows/s |")
    lines.append("|---|---|" + ("---|" if separate else "") + "---|" + "---|" * len(tasks) + "---|")
    for r in rep["multi"]:
        mark = " ★" if r["best"] and len(rep["multi"]) > 1 else ""
        cells = [f"{_fmt(r['tasks'][t]['change_pct'], pct=True)} ({r['tasks'][t]['verdict']})" for t in tasks]
        sel_cell = f" {_fmt(r['delta_m_val_pct'], pct=True)} |" if separate else ""
        lines.append(
            f"| {r['variant']}{mark} | {_fmt(r['delta_m_pct'], r['delta_m_seed_std_pct'], pct=True)} |{sel_cell} "
            f"{r['worst_task']} {_fmt(r['worst_change_pct'], pct=True)} | " + " | ".join(cells) + f" | {r['rows_per_second']:,.0f} |"
        )
    if len(rep["multi"]) > 1:
        where = (f"selected on {rep['selected_on']}, every number reported on {rep['split']}" if separate else
                 f"selected and reported on the same split ({rep['split']}): its Δm is biased upward by the choice")
        lines.append(f"\n★ best by Δm: **{rep['best']}** ({where})")
    lines += ["", "Δm = mean over tasks of the oriented relative change of the seed means (± the std of per-seed Δm).", ""]
    for r in rep["multi"]:
        lines += [f"## Per task — {rep['variant_kind']} `{r['variant']}`", ""]
        lines.append("| task | metric | single (mean ± std) | multi (mean ± std) | change | threshold | verdict |")
        lines.append("|---|---|---|---|---|---|---|")
        for t in tasks:
            s, m = rep["single"][t], r["tasks"][t]
            lines.append(
                f"| {t} | {metric[t]['name']} | {_fmt(s['mean'], s['std'])} | {_fmt(m['mean'], m['std'])} | "
                f"{_fmt(m['change_pct'], pct=True)} | ±{m['threshold_pct']:.2f}% | {m['verdict']} |"
            )
        lines.append("")
        lines.append(f"Worst task: **{r['worst_task']}** ({_fmt(r['worst_change_pct'], pct=True)}).")
        diag = []
        if r["grad_cosine_curves"]:
            diag.append("gradient cosine (last epoch): " + ", ".join(f"{p} {c[-1]:+.3f}" for p, c in r["grad_cosine_curves"].items() if c))
        if r["grad_norm_last"]:
            diag.append("gradient norm: " + ", ".join(f"{t} {v:.3g}" for t, v in r["grad_norm_last"].items()) + f" (dominance {r['dominance_last']:.2f}x)")
        if r["weights_last"]:
            diag.append("mean loss weight (last epoch): " + ", ".join(f"{t} {v:.3f}" for t, v in r["weights_last"].items()))
        if r["gates_last"]:
            diag.append("gate entropy: " + ", ".join(f"{t} {g['entropy']:.2f}/{g['max_entropy']:.2f}" for t, g in r["gates_last"].items()))
        lines += [f"- {d}" for d in diag] + [""]
    lines += ["## Verdict rule", "", rep["verdict_rule"], ""]
    lines += ["## Stability across retrains", "",
              "Per seed: the multi-task model's oriented change against the single-task model of the same seed; "
              "spread: sample std of the metric over seeds, % of the single-task mean.", ""]
    lines.append(f"| {rep['variant_kind']} | task | per-seed change | worst seed | spread multi | spread single |")
    lines.append("|---|---|---|---|---|---|")
    for r in rep["multi"]:
        for t in tasks:
            m = r["tasks"][t]
            per_seed = ", ".join(_fmt(c, pct=True) for c in m["seed_change_pct"])
            spread = [_fmt(x, pct=True).lstrip("+") if x is not None else "n/a" for x in (m["spread_pct"], rep["single"][t]["spread_pct"])]
            lines.append(f"| {r['variant']} | {t} | {per_seed} | {_fmt(m['worst_seed_change_pct'], pct=True)} | {spread[0]} | {spread[1]} |")
    lines.append("")
    if "affinity" in rep:
        a = rep["affinity"]
        names = a["tasks"]
        lines += ["## Task affinity (lookahead)", "",
                  f"Variant `{a['variant']}`, {a['steps']} sampled steps (one in {a['every']}, lookahead step {a['lr']:g}). "
                  "Row i = the task whose gradient the step follows, column j = the task whose loss is measured.", ""]
        lines.append("| step on \\ loss of | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for i in names:
            cells = [f"{a['matrix'][i][j]:+.2e} ± {a['se'][i][j]:.1e}" if a["matrix"][i][j] is not None and math.isfinite(a["matrix"][i][j]) else "n/a"
                     for j in names]
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
        lines += ["", a["rule"], ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Recommendation", "", "| task | recommendation | why |", "|---|---|---|"]
    for t, rec in rep["recommendations"].items():
        action = rec["action"] + (f" (with {', '.join(rec['with'])})" if rec["action"] == "group differently" else "")
        lines.append(f"| {t} | **{action}** | {rec['reason']} |")
    lines += ["", rep["recommendation_rule"], ""]
    return "\n".join(lines)


def plot(rep: dict, out: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = rep["tasks"], rep["multi"]
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    def per_variant(ax: Any, curves: list[list[float]]) -> None:
        """One line per multi-task variant (``curves`` in row order) over epochs."""
        for r, c in zip(rows, curves, strict=True):
            ax.plot(range(1, len(c) + 1), c, marker=".", label=r["variant"])
        ax.set_xlabel("epoch")

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        names = ["single"] + [r["variant"] for r in rows]
        means = [rep["single"][t]["mean"]] + [r["tasks"][t]["mean"] for r in rows]
        stds = [rep["single"][t]["std"] or 0.0] + [r["tasks"][t]["std"] or 0.0 for r in rows]
        ax.bar(range(len(names)), means, yerr=stds, color=["grey"] + ["C0"] * len(rows), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        lo, hi = min(m - s for m, s in zip(means, stds, strict=True)), max(m + s for m, s in zip(means, stds, strict=True))
        pad = (hi - lo) * 0.5 + 1e-6
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{t} {rep['metric'][t]['name']} ({rep['split']})", fontsize=9)
    save(fig, "metrics.png")

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        c = rep["single"][t]["curve"]
        ax.plot(range(1, len(c) + 1), c, "k--", label="single")
        per_variant(ax, [r["curves"][t] for r in rows])
        ax.set_title(f"{t} val {rep['metric'][t]['name']}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    save(fig, "learning_curves.png")

    pairs = sorted({p for r in rows for p in r["grad_cosine_curves"]})
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs) + 1, 3.2), squeeze=False)
        for ax, p in zip(axes[0], pairs, strict=True):
            per_variant(ax, [r["grad_cosine_curves"].get(p, []) for r in rows])
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_ylim(-1, 1)
            ax.set_title(f"grad cosine {p}", fontsize=9)
        axes[0][0].legend(fontsize=7)
        save(fig, "grad_cosine.png")

    gated = [r for r in rows if r["gates_last"]]
    if gated:
        fig, axes = plt.subplots(1, len(gated), figsize=(3.5 * len(gated) + 1, 0.5 * len(tasks) + 2), squeeze=False)
        for ax, r in zip(axes[0], gated, strict=True):
            names = list(r["gates_last"])
            share = np.array([r["gates_last"][t]["share"] for t in names])  # (T, E)
            im = ax.imshow(share, vmin=0, vmax=max(float(share.max()), 1e-6), cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("expert")
            ax.set_title(f"gate share ({r['variant']})", fontsize=9)
            fig.colorbar(im, ax=ax)
        save(fig, "gates.png")

    probed = [r for r in rows if "affinity" in r]
    if probed:
        fig, axes = plt.subplots(1, len(probed), figsize=(1.1 * len(tasks) * len(probed) + 2.5, 1.0 * len(tasks) + 1.8), squeeze=False)
        for ax, r in zip(axes[0], probed, strict=True):
            names = r["affinity"]["tasks"]
            z = np.array([[r["affinity"]["matrix"][i][j] for j in names] for i in names], dtype=np.float64)  # (T, T)
            # the colour scale is the off-diagonal one: self-affinities are ~100x larger and would
            # wash out every cross-task entry (the diagonal saturates; its numbers are printed)
            off = z[~np.eye(len(names), dtype=bool)]
            lim = float(np.nanmax(np.abs(off))) if np.isfinite(off).any() and np.nanmax(np.abs(off)) > 0 else 1.0
            im = ax.imshow(z, cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_yticks(range(len(names)), names)
            for (i, j), v in np.ndenumerate(z):
                dark = math.isfinite(v) and abs(v) > 0.6 * lim
                ax.text(j, i, f"{v:.1e}" if math.isfinite(v) else "n/a", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
            ax.set_xlabel("loss of task j")
            ax.set_ylabel("step on task i")
            ax.set_title(f"affinity Z[i][j] ({r['variant']}; colour: off-diagonal scale)", fontsize=8)
            fig.colorbar(im, ax=ax)
        save(fig, "affinity.png")
    return written


def compare(
    cfg: RankerConfig, out: str | Path, seeds: int = 3, weightings: Sequence[str] | None = None,
    progress: bool = True, source: str = "", affinity: AffinitySettings | None = None,
) -> dict:
    """Train, compare and write the report; returns the report dict (as in report.json).

    Args:
        cfg: the multi-task config (its data, architecture and epochs are used for every run).
        out: report folder.
        seeds: seeds per configuration (train.seed, train.seed + 1, ...).
        weightings: multi-task weighting methods to compare (default: the config's).
        progress: a tqdm bar over runs.
        source: where the config came from, for the report.
        affinity: probe every multi-task run for lookahead task affinity (``--affinity``).
    """
    if seeds < 1:
        raise RankerError(f"--seeds: must be at least 1, got {seeds}")
    weightings = list(dict.fromkeys(weightings or [cfg.train.weighting]))
    for w in weightings:
        check_weighting(w)
    if len(compared_tasks(cfg)) < 2:
        raise RankerError("tasks: compare needs at least two tasks with their own label")
    out = Path(out)
    runs = plan(cfg, seeds, weighting_variants(cfg, weightings))
    if affinity is not None and (affinity.every < 1 or (affinity.lr is not None and not affinity.lr > 0)):
        raise RankerError("--affinity-every must be at least 1 and --affinity-lr positive")
    rep = build_report(cfg, runs, run_all(runs, out, progress, affinity), source)
    write_report(rep, out)
    return rep


def write_report(rep: dict, out: Path) -> None:
    """report.json, report.md and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(rep, out)
    (out / "report.json").write_text(json.dumps(json_safe(rep), indent=2, allow_nan=False))
    (out / "report.md").write_text(render_markdown(rep, plots))
