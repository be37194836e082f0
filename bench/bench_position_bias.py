"""Position-bias towers on synthetic logs: test AUC against true relevance with and without one.

    python bench/bench_position_bias.py [--rows 500000] [--seeds 0,1,2] [--epochs 4]

``ranker synth --position-bias`` logs: train/val clicks need examination, (1 / position) ** eta
(the position-based click model), and the slot comes from an old ranking that mixes relevance
with a hidden per-category promotion; the test split's clicks are relevance draws with no
position effect. Three models on the same data:
- ``tower``: the synth config, ctr with ``bias_features: [position]`` (served without position);
- ``no position``: the same model never told the position (the uncorrected model);
- ``position as input``: position an ordinary feature in training; served as it must be, with
  position unknown (missing), which is what a model that needs position gets at request time.

Also printed: the oracle's ceiling (ranking test rows by their hidden relevance) and what the
logged slot's examination costs it; for each tower bundle, its learned logit per slot against
the generator's -eta log(position), and a check that its served scores do not depend on
position (scored with the logged position, with it shuffled and with the column dropped).
Prints test AUC per model (ctr's is against relevance) and mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ranker.config import parse_config
from ranker.training.data import Loader, ParquetSource
from ranker.training.metrics import task_metrics
from ranker.training.synth import POSITION_ETA, POSITIONS, _test_truth, examination, write_synthetic
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


def _tower_checks(bundle_dir: Path, test: str, rows: int = 20_000) -> dict:
    """The tower's learned logit per slot (relative to slot 1), and the largest change in served
    ctr scores when position is shuffled or dropped (0 when serving is position-free)."""
    import torch

    from ranker.bundle import load_bundle

    b = load_bundle(bundle_dir)
    t = pq.read_table(test).slice(0, rows)
    slots = pa.array(np.arange(1, POSITIONS + 1, dtype=np.int64))
    probe = t.slice(0, POSITIONS).set_column(t.schema.get_field_index("position"), "position", slots)
    shuffled = t.set_column(t.schema.get_field_index("position"), "position",
                            pa.array(np.random.default_rng(0).permutation(t.column("position").to_numpy())))
    b.model.eval()
    with torch.inference_mode():
        tower = b.model.bias_towers["ctr"](b.featurizer.transform(probe)).numpy()
        served = [b.model.predict(b.featurizer.transform(x), ["ctr"])["ctr"].numpy() for x in (t, shuffled)]
        dropped = b.model.predict(b.featurizer.transform(t.drop(["position"]), bias=False), ["ctr"])["ctr"].numpy()
    learned = tower - tower[0]
    truth = -POSITION_ETA * np.log(np.arange(1, POSITIONS + 1))
    return {"tower_logit_vs_slot1": learned.round(3).tolist(), "truth_vs_slot1": truth.round(3).tolist(),
            "max_served_change": float(max(np.abs(served[1] - served[0]).max(), np.abs(dropped - served[0]).max()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--monitor", default="ctr.auc", help="train.monitor: how each model's epoch is chosen on val")
    ap.add_argument("--variants", default="tower,no position,position as input")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "position_bias"))
    args = ap.parse_args()
    out = Path(args.out)
    cfg_path = write_synthetic(out / "data", rows=args.rows, seed=0, position_bias=True)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"] = {k: str(out / "data" / v) for k, v in raw["data"].items()}
    # the epoch is chosen on each model's own val ctr AUC against the logged (biased) clicks, as a
    # user without unbiased data would; choosing on watch R^2 instead (a task examination does not
    # gate) stopped ctr at epochs 1-4 at random and the epoch then decided more than the tower
    raw["train"].update(epochs=args.epochs, progress=False, threads=args.threads, diagnostics_batches=0,
                        monitor=args.monitor)
    truth = _test_truth(args.rows, seed=0)
    test_clicks = pq.read_table(out / "data" / "test", columns=["click"]).column("click").to_numpy()
    assert (truth["click"] == test_clicks).all(), "the oracle hook must replay the written test split"
    logged = truth["relevance_logit"] + np.log(examination(truth["position"]))
    oracle = {"relevance": task_metrics("binary", test_clicks, truth["relevance_logit"])["auc"],
              "relevance x examination of the logged slot": task_metrics("binary", test_clicks, logged)["auc"]}
    print(f"{args.rows:,} rows; test clicks are unbiased relevance (rate {test_clicks.mean():.3f}); "
          f"examination (1/position)^{POSITION_ETA:g}")
    train_clicks = pq.read_table(out / "data" / "train", columns=["click"]).column("click").to_numpy()
    print(f"train: {len(train_clicks):,} rows, {int(train_clicks.sum()):,} logged clicks (rate {train_clicks.mean():.4f})")
    for k, v in oracle.items():
        print(f"oracle test AUC, ranking by {k}: {v:.4f}")
    results: dict = {"oracle": oracle, "rows": args.rows, "epochs": args.epochs}
    variants = _variants(raw)
    for name in [v for v in args.variants.split(",") if v]:
        variant = variants[name]
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = parse_config({**variant, "train": {**variant["train"], "seed": seed}}, name)
            with tempfile.TemporaryDirectory() as td:
                res = Trainer(cfg, progress=False, log=lambda s: None).run(Path(td) / "b")
                test = res.metrics["test"]
                ctr = _served_auc(Path(td) / "b", raw["data"]["test"]) if name == "position as input" else test["ctr"]["auc"]
                checks = _tower_checks(Path(td) / "b", raw["data"]["test"]) if name == "tower" else {}
            row = {"ctr_auc_relevance": ctr, "cvr_auc": test["cvr"]["auc"], "watch_r2": test["watch"].get("r2", float("nan")),
                   "val_ctr_auc_logged": res.metrics["val"]["ctr"]["auc"], "best_epoch": res.metrics["best_epoch"], **checks}
            results.setdefault(name, []).append(row)
            print(f"{name:<18} seed {seed}: test ctr AUC vs relevance {ctr:.4f} | cvr {row['cvr_auc']:.4f} | "
                  f"val ctr AUC on logged clicks {row['val_ctr_auc_logged']:.4f} | epoch {row['best_epoch']}", flush=True)
            if checks:
                print(f"{'':<18} tower logit per slot - slot 1: {checks['tower_logit_vs_slot1']}"
                      f" (generator: {checks['truth_vs_slot1']}); served ctr change with position shuffled or"
                      f" dropped: {checks['max_served_change']:.2g}", flush=True)
    print("\nmean ± std over seeds (test ctr AUC against relevance):")
    for name, rows in results.items():
        if not isinstance(rows, list):
            continue
        a = np.array([r["ctr_auc_relevance"] for r in rows])
        print(f"  {name:<18} {a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}  ({', '.join(f'{x:.4f}' for x in a)})")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
