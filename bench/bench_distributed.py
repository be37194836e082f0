"""Scale-out costs on the census MMoE of bench_train_speed.py: checkpoints and processes.

    python bench/bench_distributed.py [--epochs 2] [--every-steps 20] [--nproc 1,2]

Prints
- (c) the cost of one checkpoint (model, AdamW state, weighting, RNG, cursor; written
  atomically with fsync) from the trainer's own log, and its share of the epoch when taken
  every ``--every-steps`` steps;
- (d) training rows/s of 1 process with all cores against N torchrun processes (gloo) sharing
  them, each with cores/N threads: the same config, the same global batch.

Each run is a fresh ``python -m ranker train`` (or torchrun) process, as a user would start it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import census  # noqa: E402
from bench_train_speed import speed_config  # noqa: E402

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def run(cmd: list[str], threads: int) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout), p.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every-steps", type=int, default=20)
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--data", default=str(census.ROOT / "bench" / "out" / "census"))
    args = ap.parse_args()
    out = Path(args.data)
    if not (out / "config.yaml").is_file():
        census.prepare(out)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as td:
        raw = speed_config(out)
        raw["train"].update(epochs=args.epochs, diagnostics_batches=0)
        plain = Path(td) / "plain.yaml"
        plain.write_text(yaml.safe_dump(raw))
        raw["train"]["checkpoint"] = {"dir": str(Path(td) / "ck"), "every_steps": args.every_steps, "keep": 2}
        ckpt = Path(td) / "ckpt.yaml"
        ckpt.write_text(yaml.safe_dump(raw))
        base = [sys.executable, "-m", "ranker", "train", "--json", "--quiet"]

        # (c) checkpoint cost
        m_plain, _ = run([*base, "--config", str(plain), "--out", str(Path(td) / "a")], cores)
        m_ck, err = run([*base, "--config", str(ckpt), "--out", str(Path(td) / "b")], cores)
        costs = [float(x) for x in re.findall(r"checkpoint \S+ \(([\d.]+)s\)", err)]
        size = max((p.stat().st_size for p in (Path(td) / "ck").glob("step-*.pt")), default=0)
        rows = m_plain["throughput"]["train_rows_per_second"]
        epoch_s = 99_762 * 0.5 / rows  # census train split
        steps_per_epoch = -(-49_881 // 1024)
        per_epoch = sum(costs) / max(len(costs), 1) * steps_per_epoch / args.every_steps
        print(f"(c) checkpoint: {len(costs)} written, mean {1000 * sum(costs) / max(len(costs), 1):.1f} ms, "
              f"max {1000 * max(costs, default=0):.1f} ms, {size / 2**20:.1f} MiB each; epoch {epoch_s:.2f}s without; "
              f"every {args.every_steps} steps = {per_epoch / epoch_s:.1%} of an epoch "
              f"(trainer rows/s {rows:,.0f} without, {m_ck['throughput']['train_rows_per_second']:,.0f} with)")

        # (d) 1 process vs N processes on the same cores
        for n in (int(x) for x in args.nproc.split(",")):
            threads = max(1, cores // n)
            cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={n}", "-m", "ranker", "train", "--json", "--quiet",
                   "--config", str(plain), "--out", str(Path(td) / f"n{n}")]
            m, _ = run(cmd, threads)
            print(f"(d) {n} process(es) x {threads} thread(s): {m['throughput']['train_rows_per_second']:,.0f} rows/s, "
                  f"val AUC income {m['val']['income']['auc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
