"""The CUDA paths, checked against the CPU on one machine with a GPU (`bench/device_check.sh`
runs this first, then the GPU benchmarks). The test suite never needs a GPU; this script is
what a session lent one runs, and it prints PASS/FAIL per check and the figures it measured.

    python bench/device_check.py [--rows 100000] [--out DIR]

Checks, each against the same run on the CPU:
- training on CUDA in fp32, bf16 autocast, and with sparse embeddings (SparseAdam on the
  tables): val AUC per binary task within a tolerance of the CPU run (fp32 tight, bf16 looser),
  losses finite, rows/s printed;
- serving on CUDA (`load_model(device="cuda")`: pinned host staging, CUDA-event stage timer):
  the same request's scores as the CPU model's (fp32, tolerance 1e-4), stage times positive;
- request merging on CUDA (`batch_window_ms`): 16 concurrent requests from threads give the
  scores each gets alone, and at least one forward merged several requests.

Exit status 0 when every check passed, 1 otherwise, 2 when torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ranker.config import load_config  # noqa: E402
from ranker.serving.predictor import load_model  # noqa: E402
from ranker.serving.settings import ServingSettings  # noqa: E402
from ranker.training.synth import write_synthetic  # noqa: E402
from ranker.training.trainer import Trainer  # noqa: E402

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def train(cfg_path: Path, out: Path, **train: object) -> tuple[dict, float]:
    cfg = load_config(cfg_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2, "progress": False, "seed": 0, **train})})
    t = time.perf_counter()
    res = Trainer(cfg, progress=False, log=lambda _s: None).run(out)
    return res.metrics, time.perf_counter() - t


def val_aucs(metrics: dict) -> dict[str, float]:
    return {t: m["auc"] for t, m in metrics["val"].items() if "auc" in m}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="synthetic rows (train/val/test split by the generator)")
    p.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--device", default="cuda", help="the device under test (cpu runs the script's own code path anywhere)")
    a = p.parse_args()
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("device_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else dev}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    work = a.out or Path(tempfile.mkdtemp(prefix="device-check-"))
    cfg_path = write_synthetic(work / "data", rows=a.rows, seed=0)

    # ---- training: the CPU run is the reference
    runs: dict[str, tuple[dict, float]] = {}
    for name, kw in (("cpu", {"device": "cpu"}), ("cuda fp32", {"device": dev}), ("cuda bf16", {"device": dev, "precision": "bf16"}),
                     ("cuda sparse", {"device": dev, "sparse_embeddings": True})):
        try:
            runs[name] = train(cfg_path, work / name.replace(" ", "-"), **kw)
        except Exception as e:  # a failing path is a finding, not the end of the check
            check(f"train {name}", False, f"{type(e).__name__}: {e}")
            continue
        m, secs = runs[name]
        print(f"     train {name}: val {json.dumps({t: round(v, 4) for t, v in val_aucs(m).items()})}, "
              f"{m['throughput'].get('train_rows_per_second', float('nan')):,.0f} rows/s, {secs:.1f}s", flush=True)
    if "cpu" in runs:
        ref = val_aucs(runs["cpu"][0])
        # a reference that learnt nothing would let any device pass: it must rank clicks
        check("train cpu reference", ref[next(iter(ref))] > 0.6, f"val AUC {json.dumps({t: round(v, 4) for t, v in ref.items()})} (first binary task must be > 0.6)")
        for name, tol in (("cuda fp32", 0.01), ("cuda bf16", 0.02), ("cuda sparse", 0.02)):
            if name in runs:
                got = val_aucs(runs[name][0])
                worst = max(abs(got[t] - ref[t]) for t in ref)
                finite = all(np.isfinite(v) for v in got.values())
                check(f"train {name}", finite and worst <= tol, f"val AUC max |diff| vs CPU {worst:.4f} (tolerance {tol})")

    # ---- serving: the CPU bundle's scores are the reference
    bundle = work / "cpu"
    if not bundle.exists():
        check("serve", False, "no CPU bundle to serve")
        return 1
    import pyarrow.parquet as pq

    data = sorted((work / "data" / "test").glob("*.parquet"))[0]
    rows = pq.read_table(data).slice(0, 1000).to_pylist()
    body = json.dumps({"items": rows}, default=str).encode()
    cpu = load_model(bundle, ServingSettings(bundle=bundle, device="cpu"))
    gpu = load_model(bundle, ServingSettings(bundle=bundle, device=dev))
    tasks = cpu.task_names
    ref_scores = cpu.predict(body, tasks).scores
    pred = gpu.predict(body, tasks)
    diff = max(float(np.max(np.abs(pred.scores[t] - ref_scores[t]))) for t in tasks)
    check("serve cuda scores", diff <= 1e-4, f"max |diff| vs CPU {diff:.2e} over {len(rows)} candidates, tasks {','.join(tasks)}")
    check("serve cuda stage timer", pred.shared_seconds > 0 and all(pred.head_seconds[t] > 0 for t in tasks),
          f"encoder+trunk {pred.shared_seconds * 1e3:.3f} ms, heads " + ", ".join(f"{t} {pred.head_seconds[t] * 1e3:.3f} ms" for t in tasks))
    for n in (1000, 10_000):
        big = json.dumps({"items": (rows * (n // len(rows) + 1))[:n]}, default=str).encode()
        gpu.predict(big, tasks)
        times = []
        for _ in range(20):
            times.append(gpu.predict(big, tasks).shared_seconds)
        print(f"     serve cuda: {n:,} candidates, encoder+trunk median {np.median(times) * 1e3:.3f} ms", flush=True)

    # ---- request merging on CUDA
    merged = load_model(bundle, ServingSettings(bundle=bundle, device=dev, batch_window_ms=20, concurrency=16))
    bodies = [json.dumps({"items": rows[i * 50 : (i + 1) * 50]}, default=str).encode() for i in range(16)]
    alone = [cpu.predict(b, tasks).scores for b in bodies]
    out: list = [None] * 16
    start = threading.Barrier(16)

    def one(i: int) -> None:
        start.wait()
        out[i] = merged.predict(bodies[i], tasks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    diff = max(float(np.max(np.abs(o.scores[t] - s[t]))) for o, s in zip(out, alone, strict=True) for t in tasks)
    most = max(o.merged_requests for o in out)
    check("serve cuda merged", diff <= 1e-4 and most > 1, f"16 concurrent requests: max |diff| vs alone {diff:.2e}, most merged into one forward {most}")
    merged.close()

    print(f"\n{len(FAILED)} failed: {', '.join(FAILED)}" if FAILED else "\nall checks passed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
