"""Training-step cost against embedding-table size: fused AdamW over every row against
``train.sparse_embeddings`` (row-sparse gradients, SparseAdam on the rows a step looked up).

    python bench/bench_sparse.py [--buckets 1000,65536,262144,1048576] [--rounds 5] [--threads 2]
    python bench/bench_sparse.py --weighting pcgrad   # a gradient method on the shared parameters

The model is the synthetic schema's shape: two identifier tables (user, item; dim 32) of
``--buckets`` rows each, six small categoricals (100 buckets, dim 16), one dense feature, MMoE
8 x [128, 64], three tasks; 1,024-row batches with ids drawn uniformly from the tables. With
``--weighting`` the backward is that method's (``ranker.training.weighting``), as in the
trainer: a gradient method takes every task's gradient on the encoder and trunk. Each
round times 30 steps (forward, backward, optimiser) of each setting, interleaved; the median
over rounds is printed. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ranker.config import FeatureSpec, ModelConfig, TaskSpec
from ranker.model import MultiTaskRanker
from ranker.training.optim import build_optimizer, row_sparse
from ranker.training.weighting import StepContext, build_weighting

TASKS = [TaskSpec(name=n, type="binary", label=n) for n in ("ctr", "cvr", "like")]


def setup(buckets: int, sparse: bool, batch: int, weighting: str = "static"):
    torch.manual_seed(0)
    feats = [FeatureSpec(name=n, type="categorical", buckets=buckets, dim=32) for n in ("user_id", "item_id")]
    feats += [FeatureSpec(name=f"c{k}", type="categorical", buckets=100, dim=16) for k in range(6)]
    feats += [FeatureSpec(name="price", type="dense", encoding="standard")]
    model = MultiTaskRanker(feats, TASKS, ModelConfig())
    tables = model.encoder.sparse_tables() if sparse else []
    opt = build_optimizer(list(model.parameters()), tables, lr=1e-3, weight_decay=1e-5)
    ids = torch.cat([torch.randint(0, buckets, (batch, 2)), torch.randint(0, 100, (batch, 6))], 1)
    data = {"cat": ids, "dense": torch.randn(batch, 1)}
    labels = torch.randint(0, 2, (batch,)).float()
    method = build_weighting(weighting, TASKS)
    shared = list(model.encoder.parameters()) + list(model.trunk.parameters())
    specific = [p for p in model.parameters() if all(p is not q for q in shared)]

    def step() -> None:
        out = model(data)
        losses = {t.name: F.binary_cross_entropy_with_logits(out[t.name], labels) for t in TASKS}
        method.backward(losses, StepContext(shared=shared, specific=specific, rep=model.last_encoding, tables=tables))
        row_sparse(tables)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", default="1000,65536,262144,1048576")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weighting", default="static", help="e.g. pcgrad, cagrad (gradient methods on the parameters)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, weighting {args.weighting}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| buckets per id table | parameters | AdamW ms/step | sparse ms/step | speed-up |\n|---|---|---|---|---|")
    for buckets in (int(b) for b in args.buckets.split(",")):
        steps = {s: setup(buckets, s, args.batch, args.weighting) for s in (False, True)}
        for fn in steps.values():  # warm-up
            for _ in range(3):
                fn()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for s, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[s].append((time.perf_counter() - t0) / args.steps * 1e3)
        dense, sparse = statistics.median(times[False]), statistics.median(times[True])
        params = 2 * (buckets + 1) * 32
        print(f"| {buckets:,} | {params / 1e6:.1f} M in the id tables | {dense:.1f} | {sparse:.1f} | {dense / sparse:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
