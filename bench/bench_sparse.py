"""Training-step cost against embedding-table size: fused AdamW over every row against
``train.sparse_embeddings`` (row-sparse gradients, SparseAdam on the rows a step looked up).

    python bench/bench_sparse.py [--buckets 1000,65536,262144,1048576] [--rounds 5] [--threads 2]
    python bench/bench_sparse.py --weighting pcgrad   # a gradient method on the shared parameters
    python bench/bench_sparse.py --probe --buckets 1048576   # the diagnostics probe on sparse tables

The model is the synthetic schema's shape: two identifier tables (user, item; dim 32) of
``--buckets`` rows each, six small categoricals (100 buckets, dim 16), one dense feature, MMoE
8 x [128, 64], three tasks; 1,024-row batches with ids drawn uniformly from the tables. With
``--weighting`` the backward is that method's (``ranker.training.weighting``), as in the
trainer: a gradient method takes every task's gradient on the encoder and trunk. Each
round times 30 steps (forward, backward, optimiser) of each setting, interleaved; the median
over rounds is printed. ``--probe`` times the per-epoch diagnostics probe (``EpochProbe.record``,
each task's gradient on the shared parameters) on sparse tables, with the tables' task
gradients kept as rows against taken densely, and the size of the state it checkpoints.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
import torch.nn.functional as F

from ranker.config import FeatureSpec, ModelConfig, TaskSpec
from ranker.model import MultiTaskRanker
from ranker.training.diagnostics import EpochProbe
from ranker.training.optim import build_optimizer, row_sparse
from ranker.training.weighting import StepContext, build_weighting

TASKS = [TaskSpec(name=n, type="binary", label=n) for n in ("ctr", "cvr", "like")]


def probe(buckets: int, batch: int, steps: int = 8) -> None:
    """The diagnostics probe over ``steps`` batches (the default ``train.diagnostics_batches``)."""
    torch.manual_seed(0)
    feats = [FeatureSpec(name=n, type="categorical", buckets=buckets, dim=32) for n in ("user_id", "item_id")]
    feats += [FeatureSpec(name=f"c{k}", type="categorical", buckets=100, dim=16) for k in range(6)]
    feats += [FeatureSpec(name="price", type="dense", encoding="standard")]
    model = MultiTaskRanker(feats, TASKS, ModelConfig())
    tables = model.encoder.sparse_tables()
    shared = list(model.encoder.parameters()) + list(model.trunk.parameters())
    data = [({"cat": torch.cat([torch.randint(0, buckets, (batch, 2)), torch.randint(0, 100, (batch, 6))], 1),
              "dense": torch.randn(batch, 1)}, torch.randint(0, 2, (batch,)).float()) for _ in range(steps)]
    for name, kept in (("taken densely", []), ("kept as rows", tables)):
        p = EpochProbe(shared, steps=steps, batches=steps, tables=kept)
        times = []
        for x, y in data:
            out = model(x)
            t0 = time.perf_counter()
            p.record({t.name: F.binary_cross_entropy_with_logits(out[t.name], y) for t in TASKS}, {})
            times.append((time.perf_counter() - t0) * 1e3)
        buf = io.BytesIO()
        torch.save(p.state(), buf)
        print(f"| {buckets:,} | table gradients {name} | {statistics.median(times):.0f} ms per sampled step | "
              f"{buf.tell() / 2**20:.1f} MiB of probe state | grad cos {p.summary()['grad_cosine']} |", flush=True)


def setup(buckets: int, sparse: bool, batch: int, weighting: str = "static", weight_decay: float = 1e-5):
    torch.manual_seed(0)
    feats = [FeatureSpec(name=n, type="categorical", buckets=buckets, dim=32) for n in ("user_id", "item_id")]
    feats += [FeatureSpec(name=f"c{k}", type="categorical", buckets=100, dim=16) for k in range(6)]
    feats += [FeatureSpec(name="price", type="dense", encoding="standard")]
    model = MultiTaskRanker(feats, TASKS, ModelConfig())
    tables = model.encoder.sparse_tables() if sparse else []
    opt = build_optimizer(list(model.parameters()), tables, lr=1e-3, weight_decay=weight_decay)
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
    ap.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW's, and the tables' lazy decay")
    ap.add_argument("--probe", action="store_true", help="time the diagnostics probe instead of the step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        for buckets in (int(b) for b in args.buckets.split(",")):
            probe(buckets, args.batch)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, weighting {args.weighting}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| buckets per id table | parameters | AdamW ms/step | sparse ms/step | speed-up |\n|---|---|---|---|---|")
    for buckets in (int(b) for b in args.buckets.split(",")):
        steps = {s: setup(buckets, s, args.batch, args.weighting, args.weight_decay) for s in (False, True)}
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
