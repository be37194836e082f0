"""Training at scale: rows/s and peak RSS for 1M, 10M (and 100M) synthetic rows, one epoch each.

    python bench/bench_scale.py [--rows 1000000,10000000,100000000] [--epochs 1] [--batch-size 1024]

Each size trains in a fresh process so its peak RSS (ru_maxrss) is its own, evaluation of the
validation and test splits included. Memory must stay flat as the data grows: the loader
streams record batches and shuffles inside a bounded buffer, and evaluation keeps at most
ranker.training.evaluation's bounded state per task.
Synthetic logs are generated once under bench/out/synth-N and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from ranker.config import load_config
from ranker.training.trainer import Trainer
cfg = load_config(sys.argv[1])
cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": int(sys.argv[3]), "batch_size": int(sys.argv[4]), "progress": False})})
t0 = time.perf_counter()
res = Trainer(cfg, progress=False, log=lambda s: None).run(sys.argv[2])
print(json.dumps({
    "wall_seconds": time.perf_counter() - t0,
    "train_rows_per_second": res.metrics["throughput"]["train_rows_per_second"],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "val_auc_ctr": res.metrics["val"]["ctr"]["auc"],
    "val_auc_max_error": res.metrics["val"]["ctr"].get("auc_max_error", 0.0),
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024, help="larger batches make the 100M run affordable here")
    args = ap.parse_args()
    from ranker.training.synth import write_synthetic

    results = {}
    for n in (int(x) for x in args.rows.split(",")):
        out = ROOT / "bench" / "out" / f"synth-{n}"
        if not (out / "config.yaml").is_file():
            t0 = time.perf_counter()
            write_synthetic(out, rows=n, seed=0)
            print(f"synthesised {n:,} rows in {time.perf_counter() - t0:.1f}s", flush=True)
        p = subprocess.run([sys.executable, "-c", CHILD, str(out / "config.yaml"), str(out / "bundle"), str(args.epochs), str(args.batch_size)],
                           capture_output=True, text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results[n] = r
        print(f"{n:>11,} rows: {r['train_rows_per_second']:>9,.0f} rows/s  peak RSS {r['peak_rss_mib']:,.0f} MiB  "
              f"wall {r['wall_seconds']:.0f}s  val AUC ctr {r['val_auc_ctr']:.4f} (max error {r['val_auc_max_error']:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
