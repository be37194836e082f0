"""Training speed on CPU: MMoE, 8 experts [128, 64], towers [32], embedding dim 16, batch 1024,
on the census train split — beside the machine's measured fp32 matmul rate.

    python bench/bench_train_speed.py [--epochs 3] [--threads N] [--encoding piecewise_linear] [--precision fp32|bf16|fp16] [--device cpu|cuda]

``--encoding`` puts every dense feature on that encoding (no transform); without it the census
config's standardisation (log1p for money) is kept, which is what the trainer did before
numeric encodings existed, so the two runs compare the default encoding with the old path.

Prints:
- the fp32 GEMM rate on the model's own first-layer shape and on a square 2048 GEMM;
- the model's training FLOPs per row (forward matmul MACs x 2 FLOPs x 3 for forward+backward);
- rows/s of the real trainer (data streaming + featurizing + steps, as ``metrics.json`` reports)
  and of the optimisation step alone on pre-featurized batches;
- the share of the matmul-bound ceiling (GEMM rate / FLOPs per row) each reaches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import census  # noqa: E402

from ranker.config import parse_config  # noqa: E402
from ranker.model import MultiTaskRanker  # noqa: E402
from ranker.model.layers import ExpertBank  # noqa: E402
from ranker.training.data import Loader  # noqa: E402
from ranker.training.sources import task_sources  # noqa: E402
from ranker.training.trainer import Trainer, task_losses  # noqa: E402
from ranker.training.weighting import StepContext, build_weighting  # noqa: E402


def gemm_rate(m: int, k: int, n: int, seconds: float = 2.0, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def forward_macs_per_row(model: MultiTaskRanker) -> int:
    """Multiply-accumulates of every Linear and expert layer for one row, all tasks."""
    macs = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            macs += mod.in_features * mod.out_features
        elif isinstance(mod, ExpertBank):
            macs += mod.w0.numel() + sum(w.numel() for w in mod.ws)
    return macs


def speed_config(out: Path, encoding: str | None = None) -> dict:
    """The census config with each column once and every embedding 16 wide (the goal's spec)."""
    raw = yaml.safe_load((out / "config.yaml").read_text())
    feats = []
    for f in census.features():
        if f["type"] == "categorical" and f["name"] in census.NUMERIC:
            continue  # numeric columns enter once, as dense
        if f["type"] == "dense" and encoding:
            f = {"name": f["name"], "column": f["column"], "type": "dense", "encoding": encoding}
        feats.append({**f, "dim": 16} if f["type"] == "categorical" else f)
    raw["features"] = feats
    raw["data"] = {k: str(out / v) for k, v in raw["data"].items()}
    raw["model"] = {"architecture": "mmoe", "experts": 8, "expert_dims": [128, 64], "tower_dims": [32]}
    raw["train"].update(batch_size=1024, weighting="static", progress=False, patience=100)
    return raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--encoding", default=None, help="every dense feature on this encoding (default: the census standardisation)")
    ap.add_argument("--data", default=str(census.ROOT / "bench" / "out" / "census"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the full trainer runs")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.data)
    if not (out / "config.yaml").is_file():
        census.prepare(out)
    raw = speed_config(out, args.encoding)
    raw["train"].update(epochs=args.epochs, device=args.device, precision=args.precision)
    cfg = parse_config(raw)

    model = MultiTaskRanker(cfg.features, cfg.tasks, cfg.model)
    in_dim = model.encoder.out_dim
    flops_row = 6 * forward_macs_per_row(model)
    rate_model = gemm_rate(1024, in_dim, 8 * 128)
    rate_square = gemm_rate(2048, 2048, 2048)
    if args.precision == "bf16":
        print(f"bf16 GEMM rate: {gemm_rate(1024, in_dim, 8 * 128, dtype=torch.bfloat16):.1f} GFLOP/s (1024x{in_dim}x1024)")
    print(f"threads {torch.get_num_threads()}; encoder width {in_dim}; params {sum(p.numel() for p in model.parameters()):,}")
    print(f"fp32 GEMM rate: {rate_model:.1f} GFLOP/s (1024x{in_dim}x1024), {rate_square:.1f} GFLOP/s (2048^3)")
    print(f"training FLOPs per row: {flops_row / 1e6:.2f} MFLOP -> matmul-bound ceiling "
          f"{rate_model * 1e9 / flops_row:,.0f} rows/s at the model-shape rate")

    # 1) the optimisation step alone, on batches featurized up front
    trainer = Trainer(cfg, progress=False, log=lambda s: None)
    sources = task_sources(cfg)
    featurizer, _ = trainer.fit_featurizer(sources)
    train_src = sources[0].train
    batches = list(Loader(train_src, featurizer, cfg.tasks, 1024, cfg.train.shuffle_buffer)(seed=0))
    batches = [b for b in batches if len(b["cat"]) == 1024]
    weighting = build_weighting("static", cfg.tasks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.train.weight_decay, fused=True)
    types = {t.name: t.type for t in cfg.tasks}
    ctx = StepContext(shared=[])

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(b: dict[str, torch.Tensor]) -> None:
        with autocast:
            raw_out = model(b)
            losses = task_losses(model, types, raw_out, b)
        weighting.backward(losses, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:5]:
        step(b)
    t0 = time.perf_counter()
    n = 0
    for _ in range(2):
        for b in batches:
            step(b)
            n += len(b["cat"])
    step_rate = n / (time.perf_counter() - t0)

    # 2) the real trainer end to end (streaming, featurizing, shuffling, steps)
    with tempfile.TemporaryDirectory() as td:
        res = Trainer(cfg, progress=False, log=lambda s: None).run(Path(td) / "b")
    trainer_rate = res.metrics["throughput"]["train_rows_per_second"]
    ceiling = rate_model * 1e9 / flops_row
    print(f"step only     : {step_rate:9,.0f} rows/s  ({step_rate * flops_row / 1e9:6.1f} GFLOP/s, {step_rate / ceiling:5.1%} of ceiling)")
    print(f"full trainer  : {trainer_rate:9,.0f} rows/s  ({trainer_rate * flops_row / 1e9:6.1f} GFLOP/s, {trainer_rate / ceiling:5.1%} of ceiling)")
    print(f"val AUC after {args.epochs} epochs: income {res.metrics['val']['income']['auc']:.4f}, marital {res.metrics['val']['marital']['auc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
