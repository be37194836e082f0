"""Multi-source training on per-task logs vs single-source training on the same rows.

Writes synthetic logs (``ranker synth``), then cuts every split into a click log (all
impressions, no conversion column: ctr and watch read it) and a conversion log (clicked rows
only, no click column: cvr reads it, unmasked). Trains the original single-source config and the
two-source config under each --strategies sampling rule and each --mixes way of applying it
(``train.task_sampling.mix``: rows = every batch mixes both logs at the rates, batches = every
batch is one log's), --seeds seeds each, and prints val AUC per task with the gap to
single-source training. cvr is measured on the same rows either way
(the clicked val rows); ctr and watch on every val row. The goal of issue 15: multi-source val
AUC within 0.01 of single-source. Figures only, not a test.

    python bench/bench_sources.py                               # 400k rows, 2 seeds
    python bench/bench_sources.py --rows 100000 --seeds 1 --strategies proportional --mixes rows
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ranker.config import load_config
from ranker.training.synth import write_synthetic
from ranker.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = {"proportional": {"strategy": "proportional"}, "uniform": {"strategy": "uniform"},
              "temperature": {"strategy": "temperature", "temperature": 2.0}}


def split_logs(root: Path) -> None:
    """clicks/<split>/ and conv/<split>/ beside the synthetic splits, row group by row group."""
    for split in ("train", "val", "test"):
        for kind in ("clicks", "conv"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        for f in sorted((root / split).glob("*.parquet")):
            pf = pq.ParquetFile(f)
            clicks = conv = None
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g)
                c = t.drop_columns(["conversion"])
                v = t.filter(pc.equal(t["click"], 1)).drop_columns(["click"])
                clicks = clicks or pq.ParquetWriter(root / "clicks" / split / f.name, c.schema)
                conv = conv or pq.ParquetWriter(root / "conv" / split / f.name, v.schema)
                clicks.write_table(c, row_group_size=50_000)
                conv.write_table(v, row_group_size=50_000)
            for w in (clicks, conv):
                if w is not None:
                    w.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "sources"))
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strategies", default="proportional,temperature,uniform")
    ap.add_argument("--mixes", default="rows,batches")
    ap.add_argument("--reuse", action="store_true", help="take the metrics of runs already in --out instead of training them again")
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()
    STRATEGIES["temperature"]["temperature"] = args.temperature

    out = Path(args.out)
    if args.reuse and (out / "data" / "config.yaml").exists():
        path = out / "data" / "config.yaml"
    else:
        path = write_synthetic(out / "data", rows=args.rows, seed=0, task_correlation=0.5)
        split_logs(out / "data")
    raw = yaml.safe_load(path.read_text())
    raw["model"].update({"architecture": "mmoe", "experts": 4, "expert_dims": [32, 16], "tower_dims": [16]})
    raw["train"].update({"epochs": args.epochs, "batch_size": 1024, "lr": 0.002, "threads": args.threads, "progress": False,
                         "diagnostics_batches": 0, "weighting": "uncertainty", "patience": args.epochs})
    runs: dict[str, dict] = {"single": raw}
    for mix in [m.strip() for m in args.mixes.split(",") if m.strip()]:
        for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
            multi = json.loads(json.dumps(raw))
            multi["data"] = {"train": "clicks/train", "val": "clicks/val", "test": "clicks/test"}
            for t in multi["tasks"]:
                if t["name"] == "cvr":
                    t.pop("mask", None)
                    t["data"] = {"train": "conv/train", "val": "conv/val", "test": "conv/test"}
            multi["train"]["task_sampling"] = {**STRATEGIES[strategy], "mix": mix}
            runs[f"{strategy}-{mix}"] = multi

    results: dict[str, list[dict]] = {}
    for name, conf in runs.items():
        for seed in range(args.seeds):
            conf = {**conf, "train": {**conf["train"], "seed": seed}}
            p = out / "data" / f"{name}-{seed}.yaml"
            p.write_text(yaml.safe_dump(conf, sort_keys=False))
            t0 = time.perf_counter()
            done = out / f"{name}-{seed}" / "metrics.json"
            if args.reuse and done.exists():  # a finished run of the same settings: its bundle's metrics
                m = json.loads(done.read_text())
            else:
                m = Trainer(load_config(p), progress=False, log=lambda s: None).run(out / f"{name}-{seed}").metrics
            m["seconds"] = time.perf_counter() - t0
            results.setdefault(name, []).append(m)
            srcs = m["history"][-1].get("sources", {})
            print(f"{name} seed {seed}: " + "  ".join(f"{t} auc {m['val'][t]['auc']:.4f}" for t in ("ctr", "cvr"))
                  + f"  watch r2 {m['val']['watch']['r2']:.4f}  cvr rows {m['val']['cvr']['count']:,}  "
                  + f"{m['seconds']:.0f}s  " + ", ".join(f"{k} {v['batches']}x{v.get('rows', '')}" for k, v in srcs.items()), flush=True)

    def mean(name: str, task: str, metric: str) -> tuple[float, float]:
        v = np.array([m["val"][task][metric] for m in results[name]])
        return float(v.mean()), float(v.std())

    def value(m: dict, task: str, metric: str, peak: bool) -> float:
        return max(h["val"][task][metric] for h in m["history"]) if peak else m["val"][task][metric]

    def gap(name: str, task: str, metric: str, peak: bool = False) -> tuple[float, float]:
        """Mean and standard error over seeds of (multi - single) with the same seed; ``peak``:
        each run's best epoch for that task instead of the bundle's."""
        d = np.array([value(a, task, metric, peak) - value(b, task, metric, peak)
                      for a, b in zip(results[name], results["single"], strict=True)])
        return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")

    print(f"\n== {args.rows:,} synthetic rows (P = 0.5), mmoe, {args.epochs} epochs, {args.seeds} seeds; val, mean ± std; "
          "Δ = multi - single, paired by seed, mean ± SE ==")
    print(f"{'run':<22}{'ctr auc':>17}{'cvr auc':>17}{'watch r2':>17}{'Δctr':>17}{'Δcvr':>17}{'Δwatch':>17}  steps/epoch")
    for name in runs:
        cells = [mean(name, t, k) for t, k in (("ctr", "auc"), ("cvr", "auc"), ("watch", "r2"))]
        gaps = [gap(name, t, k) for t, k in (("ctr", "auc"), ("cvr", "auc"), ("watch", "r2"))] if name != "single" else []
        h = results[name][0]["history"][-1].get("sources", {})
        steps = " + ".join(f"{v['batches']}x{v.get('rows', '')}" for v in h.values())
        print(f"{name:<22}" + "".join(f"{m:>8.4f} ± {s:.4f}" for m, s in cells)
              + "".join(f"{m:>+8.4f} ± {s:.4f}" for m, s in gaps) + ("" if gaps else " " * 51) + f"  {steps}")
    # the same gaps at each task's best val epoch (its peak over the epochs), apart from which
    # epoch the mean monitor kept: how close each task can get, not what the bundle holds
    print("\nat each task's own best val epoch (peak over epochs), Δ paired by seed, mean ± SE:")
    for name in runs:
        if name != "single":
            cells = [gap(name, t, k, peak=True) for t, k in (("ctr", "auc"), ("cvr", "auc"), ("watch", "r2"))]
            print(f"{name:<22}" + "".join(f"  Δ{t} {m:+.4f} ± {s:.4f}" for t, (m, s) in zip(("ctr", "cvr", "watch"), cells, strict=True)))
    print()
    for name in runs:
        if name != "single":
            d = {t: gap(name, t, "auc")[0] for t in ("ctr", "cvr")}
            below = min(d.values())  # multi-source above single-source is no shortfall
            print(f"{name:<22} Δ val AUC ctr {d['ctr']:+.4f}, cvr {d['cvr']:+.4f}: "
                  + ("within 0.01 of single-source" if below >= -0.01 else f"{-below:.4f} below single-source (goal: within 0.01)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
