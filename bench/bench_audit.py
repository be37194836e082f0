"""``ranker audit`` on real and synthetic data: clean where it should be, loud on injected leaks,
memory flat in the number of rows.

1. Census-Income (``bench/census.py``'s Parquet and config): the table, expected clean.
2. Synthetic logs (``ranker synth``, --rows rows): expected clean; then the same logs with two
   injected leaks, ``ctcvr`` = click x conversion (torch-rechub issue #56: CVR AUC 1.0) and a
   1%-noisy copy of ``watch_seconds``, expected as errors naming (cvr, ctcvr) and (watch, watch_copy).
3. Peak memory (max RSS of a child process running the audit) on --rows and --big-rows
   synthetic rows: streaming should keep it flat.

    python bench/bench_audit.py                      # ~2-4 min on 2 shared cores
    python bench/bench_audit.py --big-rows 0         # skip the memory run
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ranker.audit import audit, render_table
from ranker.config import load_config
from ranker.training.synth import write_synthetic

ROOT = Path(__file__).resolve().parent.parent


def timed_audit(path: Path, title: str) -> list:
    t0 = time.perf_counter()
    findings = audit(load_config(path))
    print(f"== {title} ({time.perf_counter() - t0:.1f}s) ==")
    print(render_table(findings) + "\n", flush=True)
    return findings


def inject_leaks(cfg_path: Path, out: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for f in sorted((cfg_path.parent / split).glob("*.parquet")):
            t = pq.read_table(f)
            watch = t["watch_seconds"].to_numpy() * np.exp(rng.normal(0, 0.01, t.num_rows))
            t = t.append_column("ctcvr", pc.multiply(t["click"], t["conversion"])).append_column("watch_copy", pa.array(watch))
            pq.write_table(t, out / split / f.name, row_group_size=50_000)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["features"] += [{"name": "ctcvr", "type": "categorical", "buckets": 4, "dim": 2},
                        {"name": "watch_copy", "type": "dense", "transform": "log1p"}]
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def child_rss_mib(cfg: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of an audit in a fresh process. The peak is the child's own
    VmHWM: getrusage's ru_maxrss survives exec on Linux and would report this (large) parent's."""
    code = ("import sys; from ranker.audit import audit; from ranker.config import load_config; audit(load_config(sys.argv[1])); "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(cfg)], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, int(res.stdout.split()[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "audit"))
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--big-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    out = Path(args.out)

    spec = importlib.util.spec_from_file_location("census_bench", ROOT / "bench" / "census.py")
    if spec is not None and spec.loader is not None and (ROOT.parent / "shared" / "data" / "census-income").is_dir():
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        timed_audit(mod.prepare(out / "census"), "census-income")
    else:
        print("census data not found: skipped\n")

    synth = write_synthetic(out / f"synth-{args.rows}", rows=args.rows, seed=0)
    timed_audit(synth, f"synthetic logs, {args.rows:,} rows")
    leaky = inject_leaks(synth, out / f"synth-{args.rows}-leaky")
    found = timed_audit(leaky, "synthetic logs with ctcvr and watch_copy injected")
    errors = sorted((f.task, f.feature) for f in found if f.severity == "error")
    print(f"errors (task, feature): {errors}\n")

    if args.big_rows:
        big = write_synthetic(out / f"synth-{args.big_rows}", rows=args.big_rows, seed=0)
        for n, cfg in ((args.rows, synth), (args.big_rows, big)):
            wall, rss = child_rss_mib(cfg)
            print(f"audit of {n:>9,} rows: {wall:6.1f}s wall, peak RSS {rss:,.0f} MiB (machine shared; wall is indicative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
