"""Position-bias towers on synthetic logs: test AUC against true relevance with and without one.

    python bench/bench_position_bias.py [--rows 300000] [--seeds 0,1] [--epochs 3]

``ranker synth --position-bias`` logs: train/val clicks depend on the slot an old, partly
relevance-blind ranking put each item in (examination 1 / position); the test split's clicks are
relevance draws with no position effect. Three models on the same data:
- ``tower``: the synth config, ctr with ``bias_features: [position]`` (served without position);
- ``no position``: the same model never told the position;
- ``position as input``: position an ordinary feature in training; served as it must be, with
  position unknown (missing), which is what a model that needs position gets at request time.
Prints test AUC per task (ctr's is against relevance) and mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from ranker.config import parse_config
from ranker.training.data import Loader, ParquetSource
from ranker.training.metrics import task_metrics
from ranker.training.synth import write_synthetic
from ranker.training.trainer import EVAL_BATCH, Trainer

ROOT = Path(__file__).resolve().parent.parent


def _variants(raw: dict) -> dict[str, dict]:
    tower = raw
    feats = [f for f in raw["features"] if f["name"] != "position"]
    tasks = [{k: v for k, v in t.items() if k != "bias_features"} for t in raw["tasks"]]
    return {
        "tower": tower,
        "no position": {**raw, "features": feats, "tasks": tasks},
        "position as input": {**raw, "tasks": tasks},
    }


def _served_auc(bundle_dir: Path, test: str) -> float:
    """ctr test AUC of a bundle whose ``position`` input is unknown, as at request time."""
    import torch

    from ranker.bundle import load_bundle

    b = load_bundle(bundle_dir)
    j = [f.name for f in b.featurizer.categorical].index("position")
    scores, labels = [], []
    with torch.inference_mode():
        for batch in Loader(ParquetSource(test, "test", []), b.featurizer, b.config.tasks, EVAL_BATCH)():
            batch["cat"][:, j] = 0  # the missing bucket
            scores.append(b.model.predict(batch, ["ctr"])["ctr"].numpy())
            labels.append(batch["label:ctr"].numpy())
    return task_metrics("binary", np.concatenate(labels), np.concatenate(scores))["auc"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "position_bias"))
    args = ap.parse_args()
    out = Path(args.out)
    cfg_path = write_synthetic(out / "data", rows=args.rows, seed=0, position_bias=True)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"] = {k: str(out / "data" / v) for k, v in raw["data"].items()}
    raw["train"].update(epochs=args.epochs, progress=False, threads=args.threads, diagnostics_batches=0)
    test_clicks = pq.read_table(out / "data" / "test", columns=["click"]).column("click").to_numpy()
    print(f"{args.rows:,} rows; test clicks are unbiased relevance (rate {test_clicks.mean():.3f})")
    results: dict[str, list[dict]] = {}
    for name, variant in _variants(raw).items():
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = parse_config({**variant, "train": {**variant["train"], "seed": seed}}, name)
            with tempfile.TemporaryDirectory() as td:
                res = Trainer(cfg, progress=False, log=lambda s: None).run(Path(td) / "b")
                test = res.metrics["test"]
                ctr = _served_auc(Path(td) / "b", raw["data"]["test"]) if name == "position as input" else test["ctr"]["auc"]
            row = {"ctr_auc_relevance": ctr, "cvr_auc": test["cvr"]["auc"], "watch_r2": test["watch"].get("r2", float("nan")),
                   "val_ctr_auc_logged": res.metrics["val"]["ctr"]["auc"]}
            results.setdefault(name, []).append(row)
            print(f"{name:<18} seed {seed}: test ctr AUC vs relevance {ctr:.4f} | cvr {row['cvr_auc']:.4f} | "
                  f"val ctr AUC on logged clicks {row['val_ctr_auc_logged']:.4f}", flush=True)
    print("\nmean ± std over seeds (test ctr AUC against relevance):")
    for name, rows in results.items():
        a = np.array([r["ctr_auc_relevance"] for r in rows])
        print(f"  {name:<18} {a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
