"""Task balancing and negative transfer: architectures and weighting methods vs single-task.

Synthetic logs (``ranker.training.synth``) at task correlation 1.0, 0.5 and 0.0; for each:
single-task models (one plain MLP per task, the MMoE paper's "Single-Task" baseline) vs
Shared-Bottom, MMoE, PLE, cross-stitch and Shared-Bottom with FiLM (static weights), and every
weighting method on MMoE. Then the
Census-Income benchmark (``bench/census.py``): the same architectures vs single-task.
Prints per-task test metric, Delta_m and training rows/s; writes one ``ranker compare``-style
report per data set (report.md, report.json, plots) under --out.

    python bench/bench_balancing.py                 # everything (~10-15 min on 2 cores)
    python bench/bench_balancing.py --skip-census --correlations 0.5 --seeds 1

The check from the MMoE paper (Ma et al., KDD 2018, fig. 4): as the task correlation falls,
Shared-Bottom should lose more than MMoE. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import yaml

from ranker.config import RankerConfig, load_config
from ranker.training.compare import build_report, plan, run_all, write_report
from ranker.training.synth import write_synthetic
from ranker.training.weighting import WEIGHTINGS

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = ("shared_bottom", "mmoe", "ple", "cross_stitch")


def _with(cfg: RankerConfig, model: dict | None = None, train: dict | None = None) -> RankerConfig:
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update=model or {}),
        "train": cfg.train.model_copy(update=train or {}),
    })


def variants(base: RankerConfig, weightings: list[str]) -> dict[str, RankerConfig]:
    """The architectures with static weights, then MMoE with every other weighting method."""
    out = {arch: _with(base, {"architecture": arch}, {"weighting": "static"}) for arch in ARCHITECTURES}
    out["shared_bottom+film"] = _with(base, {"architecture": "shared_bottom", "film": True}, {"weighting": "static"})
    for w in weightings:
        if w != "static":
            out[f"mmoe+{w}"] = _with(base, {"architecture": "mmoe"}, {"weighting": w})
    return out


def run_dataset(name: str, base: RankerConfig, single_arch: str, weightings: list[str], seeds: int, out: Path) -> dict:
    """Train every variant and the single-task baselines; write and return the report."""
    vs = variants(base, weightings)
    runs = plan(_with(base, {"architecture": single_arch}), seeds, vs)
    t0 = time.perf_counter()
    results = run_all(runs, out / name, progress=True)
    rep = build_report(_with(base, {"architecture": single_arch}), runs, results, name, variant_kind="model")
    rep["wall_seconds"] = time.perf_counter() - t0
    write_report(rep, out / name)
    return rep


def print_table(rep: dict) -> None:
    tasks = rep["tasks"]
    head = f"{'model':<18}" + "".join(f"{t + ' ' + rep['metric'][t]['name']:>22}" for t in tasks) + f"{'Δm':>9}{'rows/s':>10}"
    print(head)
    print("-" * len(head))
    s = rep["single"]
    print(f"{'single-task':<18}" + "".join(f"{s[t]['mean']:>13.4f} ± {s[t]['std'] or 0:.4f}" for t in tasks)
          + f"{'':>9}{min(s[t]['rows_per_second'] for t in tasks):>10,.0f}")
    for r in rep["multi"]:
        mark = "*" if r["best"] else " "
        cells = "".join(f"{r['tasks'][t]['mean']:>8.4f} ({r['tasks'][t]['change_pct']:+5.2f}%)" + " " * 4 for t in tasks)
        print(f"{r['variant'] + mark:<18}{cells}{r['delta_m_pct']:>+8.2f}%{r['rows_per_second']:>10,.0f}")
    print(f"(* best Δm; change vs single-task, oriented so + is better; {len(rep['seeds'])} seeds; "
          f"{rep['wall_seconds']:.0f}s)\n")


def synthetic(args: argparse.Namespace, weightings: list[str], out: Path) -> dict[str, dict]:
    reports = {}
    for p in args.correlations:
        data = out / "data" / f"synth-p{p:g}"
        cfg_path = write_synthetic(data, rows=args.rows, seed=0, task_correlation=p)
        raw = yaml.safe_load(cfg_path.read_text())
        # small enough for 2 cores: narrower experts, a short schedule, single-threaded runs
        raw["model"].update({"experts": 4, "expert_dims": [64, 32], "tower_dims": [16], "shared_experts": 2, "specific_experts": 1})
        raw["train"].update({"epochs": args.epochs, "batch_size": 512, "lr": 0.002, "threads": 1, "progress": False,
                             "diagnostics_batches": 2, "patience": 2})
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"== synthetic, task correlation {p:g}: {args.rows:,} rows (80/10/10) ==", flush=True)
        rep = run_dataset(f"synth-p{p:g}", load_config(cfg_path), "shared_bottom", weightings, args.seeds, out)
        print_table(rep)
        reports[f"{p:g}"] = rep
    return reports


def census(args: argparse.Namespace, weightings: list[str], out: Path) -> dict | None:
    path = ROOT / "bench" / "census.py"
    spec = importlib.util.spec_from_file_location("census_bench", path)
    if spec is None or spec.loader is None or not path.is_file():
        print("bench/census.py not found: census skipped")
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg_path = mod.prepare(out / "data" / "census")
    raw = yaml.safe_load(Path(cfg_path).read_text())
    raw["train"].update({"epochs": args.census_epochs, "patience": 3, "threads": 1, "progress": False, "diagnostics_batches": 2})
    Path(cfg_path).write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"== census-income (income, never-married), {args.census_seeds} seeds ==", flush=True)
    rep = run_dataset("census", load_config(cfg_path), "shared_bottom", weightings, args.census_seeds, out)
    print_table(rep)
    return rep


def mmoe_paper_check(reports: dict[str, dict]) -> None:
    """Delta_m of each architecture per correlation, and how much it falls from the highest."""
    if len(reports) < 2:
        return
    ps = sorted(reports, key=float, reverse=True)
    print("MMoE paper check: Δm vs single-task by task correlation")
    print(f"{'model':<15}" + "".join(f"{'p=' + p:>10}" for p in ps) + f"{'drop':>10}")
    for arch in ARCHITECTURES:
        dm = [next(r["delta_m_pct"] for r in reports[p]["multi"] if r["variant"] == arch) for p in ps]
        print(f"{arch:<15}" + "".join(f"{v:>+9.2f}%" for v in dm) + f"{dm[-1] - dm[0]:>+9.2f}%")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "balancing"))
    ap.add_argument("--rows", type=int, default=100_000, help="synthetic rows per correlation")
    ap.add_argument("--correlations", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.5, 0.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--weightings", default=",".join(WEIGHTINGS), help="methods run on MMoE")
    ap.add_argument("--census-seeds", type=int, default=2)
    ap.add_argument("--census-epochs", type=int, default=6)
    ap.add_argument("--census-weightings", default="static,uncertainty,pcgrad,famo")
    ap.add_argument("--skip-census", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    reports = synthetic(args, args.weightings.split(","), out)
    mmoe_paper_check(reports)
    results = {"synthetic": {p: r for p, r in reports.items()}}
    if not args.skip_census:
        results["census"] = census(args, args.census_weightings.split(","), out)
    summary = {
        name: {r["variant"]: {"delta_m_pct": r["delta_m_pct"], "rows_per_second": r["rows_per_second"],
                              **{t: v["mean"] for t, v in r["tasks"].items()}} for r in rep["multi"]}
        for name, rep in [*(("synth-p" + p, r) for p, r in reports.items()), ("census", results.get("census"))] if rep
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - t0:.0f}s; reports under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
