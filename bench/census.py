"""Census-Income (KDD) benchmark: the MMoE paper's real-data experiment, group 1.

Tasks: income (> 50k) and never-married; education and marital status are removed from the
inputs. Rows are split 50/25/25 at random with a fixed seed into train/val/test; the epoch is
chosen on val and test AUC is reported for Shared-Bottom, MMoE and PLE.

    python bench/census.py                      # prepare + train all three, print the table
    python bench/census.py --prepare-only       # just write Parquet + config (used by other benches)

Numeric columns that are whole numbers with few distinct values (age, weeks worked, ...) enter
twice: standardised (log1p for money) and as a categorical, so the model can learn both a trend
and per-value effects, the way trees split them.
"""

from __future__ import annotations

import argparse
import gzip
import json
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
            feats.append({"name": f"{name}_num", "column": name, "type": "dense", "transform": "log1p" if name in MONEY else "none"})
        feats.append({"name": name, "type": "categorical", "buckets": 1000, "dim": 8})
    return feats


def prepare(out: Path, seed: int = 0) -> Path:
    """Write train/val/test Parquet (50/25/25, seeded) and config.yaml; returns the config path."""
    table = read_raw()
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    n_train, n_val = table.num_rows // 2, table.num_rows // 4
    splits = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    for name, idx in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(pa.array(np.sort(idx))), out / name / "part-0.parquet", row_group_size=16_384)
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
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "census"))
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--architectures", default="shared_bottom,mmoe,ple", help="e.g. cross_stitch,shared_bottom+film")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()

    from ranker.config import load_config
    from ranker.training.trainer import Trainer

    out = Path(args.out)
    cfg_path = prepare(out, args.seed)
    print(f"census Parquet + config: {cfg_path}")
    if args.prepare_only:
        return 0
    base = load_config(cfg_path)
    results = {}
    for arch in args.architectures.split(","):
        name, _, option = arch.partition("+")  # "shared_bottom+film": the trunk with FiLM on it
        if option not in ("", "film"):
            ap.error(f"--architectures: unknown option {option!r} in {arch!r} (only +film)")
        model = base.model.model_copy(update={"architecture": name, "film": option == "film"})
        train = base.train if args.epochs is None else base.train.model_copy(update={"epochs": args.epochs})
        cfg = base.model_copy(update={"model": model, "train": train})
        t0 = time.perf_counter()
        res = Trainer(cfg, progress=False, log=lambda s: print("   ", s, file=sys.stderr)).run(out / "bundles" / arch)
        m = res.metrics
        results[arch] = {
            "test_auc_income": m["test"]["income"]["auc"],
            "test_auc_marital": m["test"]["marital"]["auc"],
            "val_auc_income": m["val"]["income"]["auc"],
            "val_auc_marital": m["val"]["marital"]["auc"],
            "best_epoch": m["best_epoch"],
            "train_rows_per_second": m["throughput"]["train_rows_per_second"],
            "wall_seconds": time.perf_counter() - t0,
        }
        r = results[arch]
        print(f"{arch:<14} test AUC income {r['test_auc_income']:.4f}  marital {r['test_auc_marital']:.4f}  "
              f"(val {r['val_auc_income']:.4f}/{r['val_auc_marital']:.4f}, epoch {r['best_epoch']}, "
              f"{r['train_rows_per_second']:,.0f} rows/s, {r['wall_seconds']:.0f}s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
