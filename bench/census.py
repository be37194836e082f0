"""Census-Income (KDD) benchmark: the MMoE paper's real-data experiment, group 1.

Tasks: income (> 50k) and never-married; education and marital status are removed from the
inputs. Rows are split 50/25/25 at random with a fixed seed into train/val/test; the epoch is
chosen on val and test AUC is reported for Shared-Bottom, MMoE and PLE.

    python bench/census.py                      # prepare + train all three, print the table
    python bench/census.py --prepare-only       # just write Parquet + config (used by other benches)
    python bench/census.py --style plain --seeds 0,1,2 --gbdt   # the plain user config vs tuned trees
    python bench/census.py --style init --seeds 0,1,2           # the config `ranker init` writes
    python bench/census.py --style plain --architectures mmoe --encoding periodic --cross-layers 2

Styles of config:
- ``hand`` (the default, the README's first table): numeric columns that are whole numbers with
  few distinct values (age, weeks worked, ...) enter twice, standardised (log1p for money) and as
  a categorical, so the model can learn both a trend and per-value effects, the way trees split
  them.
- ``plain``: what a user lists without feature engineering: strings and codes as categoricals
  (1,000 buckets, dim 16), numbers as ``type: dense`` with no transform, so the library's default
  encoding decides; ``weeks_worked`` is held out of the inputs too (the issue's protocol).
- ``init``: ``ranker init --data train --label income,never_married --exclude weeks_worked``.

``--gbdt`` adds a single-task HistGradientBoosting per task (scikit-learn, a bench-only
dependency) whose grid (learning rate, leaves, L2) is chosen on val, on the same split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT.parent / "shared" / "data" / "census-income" / "census-income.test.gz"

COLUMNS = (
    "age, class_worker, det_ind_code, det_occ_code, education, wage_per_hour, hs_college, "
    "marital_stat, major_ind_code, major_occ_code, race, hisp_origin, sex, union_member, "
    "unemp_reason, full_or_part_emp, capital_gains, capital_losses, stock_dividends, "
    "tax_filer_stat, region_prev_res, state_prev_res, det_hh_fam_stat, det_hh_summ, "
    "instance_weight, mig_chg_msa, mig_chg_reg, mig_move_reg, mig_same, mig_prev_sunbelt, "
    "num_emp, fam_under_18, country_father, country_mother, country_self, citizenship, "
    "own_or_self, vet_question, vet_benefits, weeks_worked, year, income_50k"
).split(", ")
NUMERIC = ["age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked"]
MONEY = {"wage_per_hour", "capital_gains", "capital_losses", "stock_dividends"}
CODES = ["det_ind_code", "det_occ_code", "own_or_self", "vet_benefits", "year"]
DROPPED = {"education", "marital_stat", "instance_weight", "income_50k"}  # inputs removed by the protocol


def read_raw(path: Path = RAW) -> pa.Table:
    """Parse the comma-separated file into typed columns plus the two labels."""
    with gzip.open(path, "rt") as f:
        rows = [line.rstrip().rstrip(".").split(",") for line in f if line.strip()]
    cols = {name: [r[i].strip() for r in rows] for i, name in enumerate(COLUMNS)}
    out: dict[str, pa.Array] = {}
    for name, vals in cols.items():
        if name in DROPPED:
            continue
        if name in NUMERIC or name in CODES:
            out[name] = pa.array([int(float(v)) for v in vals], pa.int64())
        else:
            out[name] = pa.array([None if v == "?" else v for v in vals], pa.string())
    out["income"] = pa.array([int(v.startswith("50000+")) for v in cols["income_50k"]], pa.int64())
    out["never_married"] = pa.array([int(v == "Never married") for v in cols["marital_stat"]], pa.int64())
    return pa.table(out)


def features() -> list[dict]:
    feats: list[dict] = []
    for name in COLUMNS:
        if name in DROPPED:
            continue
        if name in NUMERIC:
            # standardised, as before numeric encodings existed (log1p for money)
            feats.append({"name": f"{name}_num", "column": name, "type": "dense", "transform": "log1p" if name in MONEY else "none",
                          "encoding": "log1p" if name in MONEY else "standard"})
        feats.append({"name": name, "type": "categorical", "buckets": 1000, "dim": 8})
    return feats


HELD_OUT = "weeks_worked"  # the plain and init styles hold it out of the inputs (issue 13's protocol)
LABELS = ("income", "never_married")


def plain_features() -> list[dict]:
    """Columns as a user lists them: strings and codes categorical, numbers plain dense."""
    feats: list[dict] = []
    for name in COLUMNS:
        if name in DROPPED or name == HELD_OUT:
            continue
        if name in NUMERIC:
            feats.append({"name": name, "type": "dense"})
        else:
            feats.append({"name": name, "type": "categorical", "buckets": 1000, "dim": 16})
    return feats


def init_config(out: Path) -> dict:
    """The config ``ranker init`` writes for the census train split."""
    from ranker.cli import main as cli

    path = out / "config.init.yaml"
    rc = cli(["init", "--data", str(out / "train"), "--val", str(out / "val"), "--test", str(out / "test"),
              "--label", ",".join(LABELS), "--exclude", HELD_OUT, "--out", str(path), "--force"])
    if rc != 0:
        raise SystemExit(f"ranker init failed ({rc})")
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {k: str((out / v).resolve()) if not Path(v).is_absolute() else v for k, v in raw["data"].items()}
    return raw


GBDT_LEAVES = (7, 15, 31, 63, 127)
GBDT_L2 = (0.0, 1.0, 10.0)


def _staged_val_auc(clf, x_val, y_val, step: int) -> list[tuple[int, float]]:
    """Val AUC after every ``step`` trees (and after the last) of a fitted booster."""
    from sklearn.metrics import roc_auc_score

    out = []
    n = clf.n_iter_
    for i, p in enumerate(clf.staged_predict_proba(x_val), start=1):
        if i % step == 0 or i == n:
            out.append((i, roc_auc_score(y_val, p[:, 1])))
    return out


def gbdt_inputs(out: Path, splits: tuple[str, ...]) -> tuple[dict[str, pa.Table], dict[str, np.ndarray], np.ndarray]:
    """The trees' inputs of each split (``splits`` starts with train): (tables, (N, F) float64
    matrices, which of the F columns are categorical). Numbers as they are; categoricals as
    ordinal codes from train's values, unseen or missing -> NaN (the trees' own missing branch)."""
    inputs = [c for c in COLUMNS if c not in DROPPED and c != HELD_OUT]
    tables = {s: pq.read_table(out / s / "part-0.parquet") for s in splits}
    codes: dict[str, dict] = {}
    mats: dict[str, np.ndarray] = {}
    for split, t in tables.items():
        cols = []
        for c in inputs:
            v = t.column(c).to_pylist()
            if c in NUMERIC:
                cols.append(np.asarray(v, dtype=np.float64))
            else:
                m = codes.setdefault(c, {x: i for i, x in enumerate(sorted({x for x in tables[splits[0]].column(c).to_pylist() if x is not None}, key=str))})
                cols.append(np.asarray([m.get(x, np.nan) if x is not None else np.nan for x in v], dtype=np.float64))
        mats[split] = np.stack(cols, axis=1)
    return tables, mats, np.array([c not in NUMERIC for c in inputs])


def gbdt(out: Path, seed: int = 0, rates: tuple[float, ...] = (0.05, 0.1, 0.2),
         leaves_grid: tuple[int, ...] = GBDT_LEAVES, l2_grid: tuple[float, ...] = GBDT_L2,
         chunk: int = 100, patience: int = 200) -> dict[str, dict]:
    """Single-task HistGradientBoosting per task, grid chosen on val AUC; test AUC of the best.

    The grid is learning rate x max leaves x L2; for each point trees are added in chunks of
    ``chunk`` (warm start) until val AUC has not improved for ``patience`` trees, and the number
    of trees is chosen on val too, like the networks' epoch. Test is read once, for the best.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    tables, mats, is_cat = gbdt_inputs(out, ("train", "val", "test"))
    results = {}
    for task, label in (("income", "income"), ("marital", "never_married")):
        y = {s: t.column(label).to_numpy() for s, t in tables.items()}
        best = None
        grid = []
        for lr in rates:
            for leaves in leaves_grid:
                for l2 in l2_grid:
                    clf = HistGradientBoostingClassifier(
                        learning_rate=lr, max_leaf_nodes=leaves, l2_regularization=l2, max_iter=chunk,
                        early_stopping=False, categorical_features=is_cat, random_state=seed, warm_start=True)
                    top = (0, -1.0)
                    while True:
                        clf.fit(mats["train"], y["train"])
                        for k, auc in _staged_val_auc(clf, mats["val"], y["val"], step=10):
                            if auc > top[1]:
                                top = (k, auc)
                        if clf.n_iter_ - top[0] >= patience or clf.n_iter_ >= 5000:
                            break
                        clf.set_params(max_iter=clf.n_iter_ + chunk)
                    params = {"learning_rate": lr, "max_leaf_nodes": leaves, "l2_regularization": l2}
                    grid.append({**params, "trees": top[0], "val_auc": top[1]})
                    print(f"  gbdt {task} {params} val AUC {top[1]:.4f} at {top[0]} trees", file=sys.stderr, flush=True)
                    if best is None or top[1] > best[0]:
                        best = (top[1], clf, top[0], params)
        assert best is not None
        val, clf, trees, params = best
        staged = clf.staged_predict_proba(mats["test"])
        for _ in range(trees):
            p_test = next(staged)
        test = roc_auc_score(y["test"], p_test[:, 1])
        results[task] = {"val_auc": val, "test_auc": test, "params": params, "trees": trees, "grid": grid}
        print(f"gbdt {task:<8} test AUC {test:.4f} (val {val:.4f}; {params}, {trees} trees; {len(grid)} grid points)", flush=True)
    return results


def prepare(out: Path, seed: int = 0) -> Path:
    """Write train/val/test Parquet (50/25/25, seeded) and config.yaml; returns the config path."""
    table = read_raw()
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    n_train, n_val = table.num_rows // 2, table.num_rows // 4
    splits = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    for name, idx in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        # written aside and renamed: a run already reading this file keeps the whole old one
        tmp = out / name / f".part-0.parquet.{os.getpid()}"
        pq.write_table(table.take(pa.array(np.sort(idx))), tmp, row_group_size=16_384)
        os.replace(tmp, out / name / "part-0.parquet")
    cfg = {
        "data": {"train": "train", "val": "val", "test": "test"},
        "features": features(),
        "tasks": [
            {"name": "income", "type": "binary", "label": "income"},
            {"name": "marital", "type": "binary", "label": "never_married"},
        ],
        "model": {"architecture": "mmoe", "experts": 8, "expert_dims": [128, 64], "tower_dims": [32]},
        "train": {"batch_size": 1024, "epochs": 30, "lr": 0.001, "weighting": "static", "seed": 0, "patience": 5},
    }
    path = out / "config.yaml"
    tmp = out / f".config.yaml.{os.getpid()}"
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "census"))
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--architectures", default="shared_bottom,mmoe,ple", help="e.g. cross_stitch,shared_bottom+film")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--style", choices=("hand", "plain", "init"), default="hand")
    ap.add_argument("--encoding", default=None, help="plain style: this encoding on every dense feature")
    ap.add_argument("--cross-layers", type=int, default=None)
    ap.add_argument("--cross-rank", type=int, default=None)
    ap.add_argument("--seeds", default="0", help="comma-separated model seeds (the split stays --seed)")
    ap.add_argument("--gbdt", action="store_true", help="also the tuned HistGradientBoosting per task")
    ap.add_argument("--gbdt-rates", default="0.05,0.1,0.2", help="learning rates of the GBDT grid")
    ap.add_argument("--gbdt-only", action="store_true", help="only the GBDT (implies --gbdt)")
    ap.add_argument("--dense", default="", help="KEY=VALUE,... set on every dense feature (e.g. bins=64,dim=16)")
    ap.add_argument("--model", default="", help="KEY=VALUE,... model settings (e.g. dropout=0.1)")
    ap.add_argument("--train", default="", help="KEY=VALUE,... train settings (e.g. weight_decay=0.01)")
    ap.add_argument("--tag", default=None, help="name of this run in results (default: derived)")
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (1 is fastest on a busy machine)")
    args = ap.parse_args()

    from ranker.config import parse_config
    from ranker.training.trainer import Trainer

    out = Path(args.out)
    cfg_path = prepare(out, args.seed)
    print(f"census Parquet + config: {cfg_path}")
    if args.prepare_only:
        return 0
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"] = {k: str(out / v) for k, v in raw["data"].items()}
    if args.style == "plain":
        raw["features"] = plain_features()
    elif args.style == "init":
        init = init_config(out)
        raw = {**init, "train": {**init.get("train", {}), **{k: v for k, v in raw["train"].items() if k in ("seed",)}}}
    if args.encoding:
        raw["features"] = [{**f, "encoding": args.encoding} if f["type"] == "dense" and "transform" not in f else f for f in raw["features"]]
    if args.cross_layers is not None:
        raw["model"] = {**raw.get("model", {}), "cross_layers": args.cross_layers}
    if args.cross_rank is not None:
        raw["model"] = {**raw.get("model", {}), "cross_rank": args.cross_rank}
    def pairs(text: str) -> dict:
        """``a=1,b.c=x``: values parsed as YAML; a dotted key sets a key of a section."""
        out: dict = {}
        for k, _, v in (kv.partition("=") for kv in text.split(",") if kv):
            *sections, key = k.split(".")
            node = out
            for s in sections:
                node = node.setdefault(s, {})
            node[key] = yaml.safe_load(v)
        return out

    if args.dense:
        raw["features"] = [{**f, **pairs(args.dense)} if f["type"] == "dense" and "transform" not in f else f for f in raw["features"]]
    raw["model"] = {**raw.get("model", {}), **pairs(args.model)}
    raw["train"] = {**raw.get("train", {}), **pairs(args.train)}
    base = parse_config(raw, f"census {args.style} config")
    tag = args.tag or "-".join(x for x in (args.style, args.encoding, f"cross{args.cross_layers}" if args.cross_layers else None,
                                          f"rank{args.cross_rank}" if args.cross_rank else None) if x)
    results: dict = {}
    if args.gbdt or args.gbdt_only:
        results["gbdt"] = gbdt(out, rates=tuple(float(r) for r in args.gbdt_rates.split(",")))
        if args.gbdt_only:
            (out / "results-gbdt.json").write_text(json.dumps(results, indent=2))
            return 0
    archs = [a for a in args.architectures.split(",") if a]
    runs = [(arch, int(seed)) for arch in archs for seed in args.seeds.split(",")]
    for arch, seed in runs:
        name, _, option = arch.partition("+")  # "shared_bottom+film": the trunk with FiLM on it
        if option not in ("", "film"):
            ap.error(f"--architectures: unknown option {option!r} in {arch!r} (only +film)")
        model = base.model.model_copy(update={"architecture": name, "film": option == "film"})
        over = {"epochs": args.epochs, "patience": args.patience, "threads": args.threads}
        train = base.train.model_copy(update={"seed": seed, "progress": False, "diagnostics_batches": 0,
                                              **{k: v for k, v in over.items() if v}})
        cfg = base.model_copy(update={"model": model, "train": train})
        t0 = time.perf_counter()
        res = Trainer(cfg, progress=False, log=lambda s: print("   ", s, file=sys.stderr)).run(out / "bundles" / f"{tag}-{arch}-{seed}")
        m = res.metrics
        name = {t.label: t.name for t in cfg.tasks}  # init names the marital task after its label
        inc, mar = name["income"], name["never_married"]
        results[f"{arch}/{seed}"] = {
            "test_auc_income": m["test"][inc]["auc"],
            "test_auc_marital": m["test"][mar]["auc"],
            "val_auc_income": m["val"][inc]["auc"],
            "val_auc_marital": m["val"][mar]["auc"],
            "best_epoch": m["best_epoch"],
            "train_rows_per_second": m["throughput"]["train_rows_per_second"],
            "wall_seconds": time.perf_counter() - t0,
        }
        r = results[f"{arch}/{seed}"]
        print(f"{tag} {arch:<14} seed {seed} test AUC income {r['test_auc_income']:.4f}  marital {r['test_auc_marital']:.4f}  "
              f"(val {r['val_auc_income']:.4f}/{r['val_auc_marital']:.4f}, epoch {r['best_epoch']}, "
              f"{r['train_rows_per_second']:,.0f} rows/s, {r['wall_seconds']:.0f}s)", flush=True)
    for arch in archs:
        runs = [v for k, v in results.items() if k.startswith(f"{arch}/")]
        inc = np.array([r["test_auc_income"] for r in runs])
        mar = np.array([r["test_auc_marital"] for r in runs])
        print(f"{tag} {arch:<14} mean ± std over {len(runs)} seeds: income {inc.mean():.4f} ± {inc.std(ddof=1) if len(runs) > 1 else 0:.4f}"
              f"  marital {mar.mean():.4f} ± {mar.std(ddof=1) if len(runs) > 1 else 0:.4f}", flush=True)
    (out / f"results-{tag}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
