"""Task affinity by lookahead (``ranker compare --affinity``) on the MMoE paper's synthetic data.

For each task correlation (default 1.0 and 0.0) writes synthetic data, runs ``compare`` with the
affinity probe (multi-task and single-task models over --seeds seeds) and prints the pooled
affinity matrix, the symmetric affinity of each task pair, (Z_ij + Z_ji) / 2, and the per-task
recommendation. The check (the goal of issue 15): a pair's affinity is higher at correlation 1.0
than at 0.0. Figures only, not a test.

--data paper (default) is the MMoE paper's data as written there (Ma et al., KDD 2018, section
5.2): x ~ N(0, I_d) with d = 100, two regression tasks y_k = w_k . x + sum_{i<=10} sin(alpha_i
w_k . x + beta_i) + eps, eps ~ N(0, 0.01), w_1 = u_1, w_2 = P u_1 + sqrt(1 - P^2) u_2 for
orthogonal unit vectors u_1, u_2 (c = 1); alpha_i, beta_i, which the paper leaves open, are drawn
once from N(0, 1). --data logs uses ``ranker synth``'s impression logs instead (the same recipe
grafted onto ctr, cvr and watch labels, cvr on clicked rows only).

    python bench/bench_affinity.py                          # paper data, 100k rows, mmoe, 2 seeds
    python bench/bench_affinity.py --data logs --seeds 3    # ranker synth's impression logs
    python bench/bench_affinity.py --architecture shared_bottom --rows 50000 --seeds 1
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ranker.config import load_config
from ranker.training.compare import AffinitySettings, compare
from ranker.training.synth import write_synthetic

ROOT = Path(__file__).resolve().parent.parent
PAPER_DIM, PAPER_SINES = 100, 10


def write_paper(root: Path, rows: int, p: float, seed: int = 0) -> Path:
    """The MMoE paper's two-task regression data at task correlation ``p`` (80/10/10 Parquet
    splits and a config); returns the config path."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((PAPER_DIM, 2)))  # two orthogonal unit vectors
    w = np.stack([u[:, 0], p * u[:, 0] + np.sqrt(1 - p * p) * u[:, 1]])  # (2, d), c = 1
    alpha, beta = rng.standard_normal(PAPER_SINES), rng.standard_normal(PAPER_SINES)
    x = rng.standard_normal((rows, PAPER_DIM))
    z = x @ w.T  # (rows, 2)
    y = z + np.sin(alpha * z[:, :, None] + beta).sum(-1) + rng.normal(0, 0.1, z.shape)  # variance 0.01
    cols = {f"x{i}": x[:, i].astype(np.float32) for i in range(PAPER_DIM)} | {"y1": y[:, 0], "y2": y[:, 1]}
    table = pa.table(cols)
    cut = [0, int(rows * 0.8), int(rows * 0.9), rows]
    for k, split in enumerate(("train", "val", "test")):
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(cut[k], cut[k + 1] - cut[k]), root / split / "part-0.parquet", row_group_size=20_000)
    conf = {"data": {"train": "train", "val": "val", "test": "test"},
            "features": [{"name": f"x{i}", "type": "dense"} for i in range(PAPER_DIM)],
            "tasks": [{"name": "y1", "type": "regression", "label": "y1"}, {"name": "y2", "type": "regression", "label": "y2"}],
            "model": {}, "train": {}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "affinity"))
    ap.add_argument("--data", choices=["paper", "logs"], default="paper")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--correlations", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.0])
    ap.add_argument("--architecture", default="mmoe")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=5, help="probe one step in this many")
    ap.add_argument("--lookahead-lr", type=float, default=None, help="default: train.lr")
    args = ap.parse_args()

    out = Path(args.out)
    sym: dict[float, dict[str, float]] = {}
    per_seed: dict[float, dict[str, np.ndarray]] = {}
    for p in args.correlations:
        if args.data == "paper":
            path = write_paper(out / "paper" / f"p{p:g}", rows=args.rows, p=p)
        else:
            path = write_synthetic(out / "data" / f"p{p:g}", rows=args.rows, seed=0, task_correlation=p)
        raw = yaml.safe_load(path.read_text())
        raw["model"].update({"architecture": args.architecture, "experts": 4, "expert_dims": [64, 32], "tower_dims": [16]})
        raw["train"].update({"epochs": args.epochs, "batch_size": 512, "lr": 0.002, "threads": 1, "progress": False,
                             "diagnostics_batches": 0, "weighting": "static", "patience": 2})
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        t0 = time.perf_counter()
        rep = compare(load_config(path), out / f"{args.data}-p{p:g}", seeds=args.seeds, progress=False, source=str(path),
                      affinity=AffinitySettings(every=args.every, lr=args.lookahead_lr))
        a = rep["affinity"]
        names = a["tasks"]
        print(f"== task correlation {p:g}: {args.architecture}, {args.rows:,} rows, {args.seeds} seeds, {a['steps']} probed steps, "
              f"lookahead lr {a['lr']:g}, {time.perf_counter() - t0:.0f}s ==")
        print("step on \\ loss of " + "".join(f"{j:>22}" for j in names))
        for i in names:
            print(f"{i:<18}" + "".join(f"{a['matrix'][i][j]:>+12.2e} ± {a['se'][i][j]:.1e}" for j in names))
        sym[p] = {f"{i}/{j}": (a["matrix"][i][j] + a["matrix"][j][i]) / 2 for i, j in combinations(names, 2)}
        print("symmetric: " + ", ".join(f"{k} {v:+.2e}" for k, v in sym[p].items()))
        seeds = next(r for r in rep["multi"] if r["variant"] == a["variant"])["affinity"]["by_seed"]  # its runs, one per seed
        per_seed[p] = {f"{i}/{j}": np.array([(z[i][j] + z[j][i]) / 2 for z in seeds]) for i, j in combinations(names, 2)}
        print("symmetric per seed: " + ", ".join(f"{k} " + "/".join(f"{x:+.2e}" for x in v) for k, v in per_seed[p].items()))
        print("compare: " + ", ".join(f"{t} {v['verdict']} ({v['change_pct']:+.2f}%, worst seed {v['worst_seed_change_pct']:+.2f}%)"
                                      for t, v in rep["multi"][0]["tasks"].items()))
        print("recommendation: " + ", ".join(f"{t} {r['action']}" for t, r in rep["recommendations"].items()) + "\n", flush=True)
    if len(sym) >= 2:
        hi, lo = max(sym), min(sym)
        print(f"pair affinity, correlation {hi:g} vs {lo:g}:")
        def over_seeds(v: np.ndarray) -> str:
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
            return f"{v.mean():+.2e} ± {se:.1e}"

        print(f"pair affinity (pooled steps; mean ± SE over {args.seeds} seeds' own means):")
        for k in sym[hi]:
            print(f"  {k:<12} {sym[hi][k]:+.2e} vs {sym[lo][k]:+.2e}  ({over_seeds(per_seed[hi][k])} vs {over_seeds(per_seed[lo][k])})  "
                  f"{'higher' if sym[hi][k] > sym[lo][k] else 'NOT higher'} in {int((per_seed[hi][k] > per_seed[lo][k]).sum())} of {args.seeds} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
