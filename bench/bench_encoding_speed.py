"""Training cost of the default numeric encoding against the old standardised path, measured
interleaved so that a busy machine slows both sides alike.

    python bench/bench_encoding_speed.py [--rounds 5] [--threads 1] [--encoding piecewise_linear] [--bins N]
    python bench/bench_encoding_speed.py --baseline-encoding piecewise_linear --feature-dropout 0.1
    python bench/bench_encoding_speed.py --baseline-encoding piecewise_linear --cross-layers 2 [--cross-rank R]

The model and data are bench_train_speed's (census train split, MMoE 8 x [128, 64], towers [32],
embedding dim 16, batch 1024). Side A is every dense feature standardised (log1p for money), as
the trainer did before encodings existed (or on ``--baseline-encoding``); side B puts them on
``--encoding``, with ``--feature-dropout`` as its ``model.feature_dropout`` and ``--cross-layers`` /
``--cross-rank`` as its DCN-v2 cross layers. Each round times,
A then B, (1) featurizing every train record batch and (2) 20 optimisation steps on
pre-featurized batches. Prints rows/s per side and the median over rounds of B's time / A's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import census  # noqa: E402
from bench_train_speed import speed_config  # noqa: E402

from ranker.config import parse_config  # noqa: E402
from ranker.features import Featurizer  # noqa: E402
from ranker.model import MultiTaskRanker  # noqa: E402
from ranker.training.trainer import task_losses  # noqa: E402
from ranker.training.weighting import StepContext, build_weighting  # noqa: E402

STEPS = 20


def side(out: Path, encoding: str | None, bins: int | None = None, feature_dropout: float = 0.0,
         cross_layers: int = 0, cross_rank: int | None = None) -> dict:
    raw = speed_config(out, encoding)
    raw["model"] = {**raw["model"], "feature_dropout": feature_dropout, "cross_layers": cross_layers, "cross_rank": cross_rank}
    if bins is not None:  # bins of every embedded dense feature
        raw["features"] = [{**f, "bins": bins} if f["type"] == "dense" and "encoding" in f else f for f in raw["features"]]
    cfg = parse_config(raw)
    train = pq.ParquetFile(out / "train" / "part-0.parquet")
    batches = list(train.iter_batches(batch_size=65_536, columns=[f.source for f in cfg.features]))
    fz = Featurizer.fit(cfg.features, train.schema_arrow, batches, "train")
    labels = pq.read_table(out / "train" / "part-0.parquet", columns=["income", "never_married"])
    feats = fz.transform(pq.read_table(out / "train" / "part-0.parquet"))
    steps = []
    for i in range(STEPS):
        b = {k: v[i * 1024 : (i + 1) * 1024] for k, v in feats.items()}
        b["label:income"] = torch.tensor(labels.column("income").to_numpy()[i * 1024 : (i + 1) * 1024], dtype=torch.float32)
        b["label:marital"] = torch.tensor(labels.column("never_married").to_numpy()[i * 1024 : (i + 1) * 1024], dtype=torch.float32)
        steps.append(b)
    torch.manual_seed(0)
    model = MultiTaskRanker(cfg.features, cfg.tasks, cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return {"cfg": cfg, "fz": fz, "batches": batches, "steps": steps, "model": model, "opt": opt,
            "weighting": build_weighting("static", cfg.tasks), "width": model.encoder.out_dim}


def featurize_seconds(s: dict) -> float:
    t0 = time.perf_counter()
    for rb in s["batches"]:
        s["fz"].transform(rb)
    return time.perf_counter() - t0


def step_seconds(s: dict) -> float:
    types = {t.name: t.type for t in s["cfg"].tasks}
    model, opt, ctx = s["model"], s["opt"], StepContext(shared=[])
    model.train()
    t0 = time.perf_counter()
    for b in s["steps"]:
        s["weighting"].backward(task_losses(model, types, model(b), b), ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoding", default="piecewise_linear")
    ap.add_argument("--bins", type=int, default=None, help="side B's bins per dense feature (default: the encoding's default)")
    ap.add_argument("--baseline-encoding", default=None, help="side A's encoding (default: the old standardisation)")
    ap.add_argument("--feature-dropout", type=float, default=0.0, help="side B's model.feature_dropout")
    ap.add_argument("--cross-layers", type=int, default=0, help="side B's model.cross_layers")
    ap.add_argument("--cross-rank", type=int, default=None, help="side B's model.cross_rank (default: full rank)")
    ap.add_argument("--data", default=str(census.ROOT / "bench" / "out" / "census"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.data)
    if not (out / "config.yaml").is_file():
        census.prepare(out)
    a, b = side(out, args.baseline_encoding), side(out, args.encoding, args.bins, args.feature_dropout, args.cross_layers, args.cross_rank)
    name_a = args.baseline_encoding or "standard"
    name_b = args.encoding + (f"+fd{args.feature_dropout:g}" if args.feature_dropout else "")
    name_b += (f"+cross{args.cross_layers}" + (f"r{args.cross_rank}" if args.cross_rank else "")) if args.cross_layers else ""
    rows = sum(rb.num_rows for rb in a["batches"])
    step_seconds(a), step_seconds(b)  # warm-up
    times: dict[str, list[float]] = {"fa": [], "fb": [], "sa": [], "sb": []}
    for _ in range(args.rounds):
        times["fa"].append(featurize_seconds(a))
        times["fb"].append(featurize_seconds(b))
        times["sa"].append(step_seconds(a))
        times["sb"].append(step_seconds(b))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio_f = statistics.median(fb / fa for fa, fb in zip(times["fa"], times["fb"], strict=True))
    ratio_s = statistics.median(sb / sa for sa, sb in zip(times["sa"], times["sb"], strict=True))
    n_step = STEPS * 1024
    print(f"threads {torch.get_num_threads()}; encoder width A {a['width']} / B {b['width']}; {args.rounds} interleaved rounds")
    print(f"featurize  A {name_a} {rows / med['fa']:10,.0f} rows/s | B {name_b} {rows / med['fb']:10,.0f} rows/s | B/A time {ratio_f:.3f}")
    print(f"train step A {name_a} {n_step / med['sa']:10,.0f} rows/s | B {name_b} {n_step / med['sb']:10,.0f} rows/s | B/A time {ratio_s:.3f}")
    # the trainer featurizes in a background thread, overlapped with steps; a step-bound
    # estimate of the whole loop is the slower of the two per row
    per_row_a = max(med["fa"] / rows, med["sa"] / n_step)
    per_row_b = max(med["fb"] / rows, med["sb"] / n_step)
    print(f"estimated trainer rows/s (max of the two stages): A {1 / per_row_a:,.0f} | B {1 / per_row_b:,.0f} | "
          f"B/A throughput {per_row_a / per_row_b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
