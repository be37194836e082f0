"""The featurizer's fit pass (dense moments and quantile sketches, label checks, regression
target statistics) on 1 process against N torchrun processes that share it.

    python bench/bench_fit.py [--rows 2000000] [--nproc 1,2] [--data DIR]

Writes ``ranker synth`` logs (``--rows`` rows; train is half of them, in files of row groups),
then times ``Trainer.fit_featurizer`` alone: in one process it reads every train row; under
torchrun each rank reads its share of the row groups and the ranks merge what they kept.
Prints seconds per run (the slowest rank's), rows each rank read, and how far the result is
from one process's: features whose bin edges differ (they may once a rank holds more values
than the sketch keeps, each run within the sketch's rank bound) and the moments' relative gap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def worker(config: str, out: str) -> int:
    """One rank: fit the featurizer and write the time and the result (rank 0)."""
    import torch

    from ranker.config import load_config
    from ranker.training.distributed import Collective
    from ranker.training.sources import task_sources
    from ranker.training.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(load_config(config), progress=False, log=lambda s: print(s, file=sys.stderr))
    trainer.ranks = Collective.from_env("cpu")
    trainer.ranks.barrier()
    t0 = time.perf_counter()
    fz, target = trainer.fit_featurizer(task_sources(trainer.cfg))
    took = trainer.ranks.gather_objects(time.perf_counter() - t0)
    if trainer.ranks.is_main:
        Path(out).write_text(json.dumps({"seconds": max(took), "featurizer": fz.state(), "target": target}))
    trainer.ranks.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent / "out" / "fit"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    data = Path(args.data) / f"rows{args.rows}"
    if not (data / "config.yaml").is_file():
        subprocess.run([sys.executable, "-m", "ranker", "synth", "--out", str(data), "--rows", str(args.rows), "--quiet"], check=True)
    cfg = data / "config.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = None
    for n in (int(x) for x in args.nproc.split(",")):
        times = []
        for _ in range(args.rounds):
            out = data / f"fit-{n}.json"
            me = [str(Path(__file__).resolve()), "--worker", str(cfg), str(out)]
            cmd = [sys.executable, *me] if n == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={n}", *me]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            res = json.loads(out.read_text())
            times.append(res["seconds"])
            line = next((x for x in p.stderr.splitlines() if "featurizer fitted on" in x), "featurizer (no log line)")
        first = first or res
        ea, eb = res["featurizer"]["edges"], first["featurizer"]["edges"]
        moved = sum(len(ea[k]) != len(v) or any(x != y for x, y in zip(ea[k], v)) for k, v in eb.items())
        drift = max((abs(a - b) / max(abs(b), 1e-12) for k, v in first["featurizer"]["dense_stats"].items()
                     for a, b in zip(res["featurizer"]["dense_stats"][k], v, strict=True)), default=0.0)
        print(f"{n} process(es): fit {sorted(times)[len(times) // 2]:.2f} s (median of {args.rounds}; "
              f"{', '.join(f'{t:.2f}' for t in times)}); {line.split('featurizer ')[1]}; "
              f"bin edges of {moved}/{len(eb)} features differ from 1 process's, moments rel diff {drift:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
