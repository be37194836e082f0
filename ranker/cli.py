"""ranker command line: init | synth | train | evaluate | serve | compare.

User errors print one line ("ranker: error: ...") and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ranker.errors import RankerError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        raise RankerError(f"{self.prog}: {message}")


def _cmd_synth(a: argparse.Namespace) -> None:
    from ranker.training.synth import write_synthetic

    try:
        path = write_synthetic(a.out, rows=a.rows, seed=a.seed, task_correlation=a.task_correlation, progress=not a.quiet,
                               position_bias=a.position_bias)
    except RankerError as e:  # the library names its arguments; here they are flags
        arg, sep, rest = str(e).partition(": ")
        flags = {"rows": "--rows", "seed": "--seed", "task_correlation": "--task-correlation", "out_dir": "--out"}
        raise RankerError(f"{flags[arg]}: {rest}" if sep and arg in flags else str(e)) from None
    print(f"wrote {a.rows:,} rows of synthetic logs and their config to {path}")


def _cmd_init(a: argparse.Namespace) -> None:
    from ranker.init_config import infer_config, write_init_config

    labels = [c.strip() for c in a.label.split(",") if c.strip()]
    exclude = [c.strip() for c in (a.exclude or "").split(",") if c.strip()]
    if a.sample_rows < 1:
        raise RankerError(f"--sample-rows: must be at least 1, got {a.sample_rows}")
    cfg, header = infer_config(a.data, labels, a.out, val=a.val, test=a.test, exclude=exclude, sample_rows=a.sample_rows)
    path = write_init_config(a.out, cfg, header, force=a.force)
    for line in header[1:]:
        if "WARNING" in line:
            print(f"ranker: {line.strip()}", file=sys.stderr)
    print(f"wrote {path} ({len(cfg['features'])} features, {len(cfg['tasks'])} tasks); train with: ranker train --config {path} --out bundle")


def _print_json(obj: object) -> None:
    """Strict JSON on stdout: an undefined figure (NaN: an AUC over one class) is null."""
    from ranker.bundle import json_safe

    print(json.dumps(json_safe(obj), indent=2, allow_nan=False))


def _cmd_train(a: argparse.Namespace) -> None:
    from ranker.config import load_config
    from ranker.training.trainer import Trainer, format_metrics

    cfg = load_config(a.config)
    trainer = Trainer(cfg, progress=False if a.quiet else None)
    result = trainer.run(a.out, resume=a.resume)
    if not trainer.ranks.is_main:  # under torchrun rank 0 alone reports
        return
    if a.json:
        _print_json({"bundle": str(result.bundle), "version": result.version, **result.metrics})
        return
    m = result.metrics
    print(f"best epoch {m['best_epoch']}; training throughput {m['throughput']['train_rows_per_second']:,.0f} rows/s")
    for split in ("val", "test"):
        if m[split]:
            print(f"{split}:")
            print("\n".join(format_metrics(m[split])))
    print(f"bundle: {result.bundle.resolve()} (version {result.version})")


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from ranker.bundle import load_bundle
    from ranker.training.data import Loader, ParquetSource, label_columns
    from ranker.training.monitoring import FeedbackFigures
    from ranker.training.trainer import EVAL_BATCH, evaluate, format_metrics

    b = load_bundle(a.bundle)
    featurizer = b.featurizer.without_bias()  # scores are bias-free: position columns not needed
    src = ParquetSource(a.data, "--data", featurizer.columns)
    src.check_files(featurizer)
    # the tasks whose label (and mask) columns every file has; the others are skipped, named
    present = set.intersection(*(set(schema.names) for schema in src.schemas))
    skipped: dict[str, str] = {}
    for t in b.config.tasks:
        lacking = [c for c in label_columns([t]) if c not in present] if t.label else [f for f in t.product if f in skipped]
        if lacking:
            skipped[t.name] = f"no column {lacking[0]!r}" if t.label else f"its factor {lacking[0]!r} is skipped"
    tasks = [t for t in b.config.tasks if t.name not in skipped]
    if not tasks:
        raise RankerError(f"--data: {a.data} holds none of the bundle's label columns ({', '.join(label_columns(b.config.tasks))})")
    feedback = FeedbackFigures(tasks, b.reference)  # the figures the production feedback rules compute
    res = evaluate(b.model, Loader(src, featurizer, tasks, EVAL_BATCH), tasks, observe=feedback.add)
    mon = feedback.figures()
    if a.json:
        _print_json({"bundle": str(b.path), "version": b.version, "data": a.data, "metrics": res.metrics, "monitoring": mon,
                     "skipped": skipped})
    else:
        print(f"{a.data} on bundle {b.version}:")
        for name, why in skipped.items():
            print(f"  {name:<12} skipped: {why}")
        print("\n".join(format_metrics(res.metrics)))
        print("as the feedback rules compute them (calibration = sum score / sum label, NE, AUC on the reference bins):")
        print("\n".join(format_metrics(mon)))


def _cmd_compare(a: argparse.Namespace) -> None:
    from ranker.config import load_config
    from ranker.training.compare import AffinitySettings, compare
    from ranker.training.weighting import check_weighting

    weightings = [w.strip() for w in a.weightings.split(",") if w.strip()] if a.weightings else None
    for w in weightings or ():
        check_weighting(w, "--weightings")
    if not a.affinity and (a.affinity_every is not None or a.affinity_lr is not None):
        flag = "--affinity-every" if a.affinity_every is not None else "--affinity-lr"
        raise RankerError(f"{flag}: applies with --affinity only")
    affinity = AffinitySettings(every=10 if a.affinity_every is None else a.affinity_every, lr=a.affinity_lr) if a.affinity else None
    rep = compare(load_config(a.config), a.out, seeds=a.seeds, weightings=weightings, progress=not a.quiet, source=a.config,
                  affinity=affinity)
    for r in rep["multi"]:
        mark = " (best)" if r["best"] and len(rep["multi"]) > 1 else ""
        print(f"{r['variant']}{mark}: delta_m {r['delta_m_pct']:+.2f}%, worst {r['worst_task']} {r['worst_change_pct']:+.2f}%, "
              + ", ".join(f"{t} {v['verdict']}" for t, v in r["tasks"].items()))
    if "affinity" in rep:
        z = rep["affinity"]["matrix"]
        print("affinity (step on row, loss of column): " + "; ".join(
            f"{i}->{j} {z[i][j]:+.2e}" for i in z for j in z[i] if i != j))
    print("recommendation: " + ", ".join(f"{t} {r['action']}" for t, r in rep["recommendations"].items()))
    if len(rep["seeds"]) == 1:
        print("warning: one seed: no spread to judge by, so every verdict is undetermined; "
              "use --seeds 3 or more", file=sys.stderr)
    print(f"report: {Path(a.out).resolve() / 'report.md'}")


def _cmd_audit(a: argparse.Namespace) -> int:
    from ranker.audit import audit, render_table, to_json
    from ranker.config import load_config

    cfg = load_config(a.config)
    findings = audit(cfg, time_column=a.time_column or cfg.audit.time_column)
    print(json.dumps(to_json(findings), indent=2) if a.json else render_table(findings))
    return 3 if a.strict and any(f.severity == "error" for f in findings) else 0


def _cmd_serve(a: argparse.Namespace) -> None:
    from ranker.serving import ServingSettings
    from ranker.serving.workers import configure_logging, serve

    settings = ServingSettings.from_env(
        bundle=a.bundle, host=a.host, port=a.port, device=a.device,
        max_items=a.max_items, max_body_bytes=a.max_body_bytes, concurrency=a.concurrency, max_queue=a.max_queue,
        batch_window_ms=a.batch_window_ms, workers=a.workers,
    )
    configure_logging()
    serve(settings, log_level=a.log_level, access_log=a.access_log)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ranker", description="Multi-task recommendation ranking: train, evaluate, serve.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    i = sub.add_parser("init", help="write a working config.yaml from a Parquet schema and a sample of rows")
    i.add_argument("--data", required=True, help="training Parquet: file, folder or glob")
    i.add_argument("--label", required=True, help="label column(s), comma-separated: one task each")
    i.add_argument("--out", required=True, help="config file to write")
    i.add_argument("--val", default=None, help="validation Parquet (default: a val/ sibling of a train* path)")
    i.add_argument("--test", default=None, help="test Parquet (default: a test/ sibling of a train* path)")
    i.add_argument("--exclude", default=None, help="columns to leave out, comma-separated (ids, weights, leaks)")
    i.add_argument("--sample-rows", type=int, default=100_000, help="rows read to infer types and cardinalities")
    i.add_argument("--force", action="store_true", help="replace an existing --out file")
    i.set_defaults(func=_cmd_init)

    s = sub.add_parser("synth", help="write synthetic impression logs and a matching config.yaml")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--rows", type=int, default=200_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--task-correlation", type=float, default=0.5, help="cosine between task weight vectors")
    s.add_argument("--position-bias", action="store_true",
                   help="add a position column from a biased old ranking (test split: unbiased clicks)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_synth)

    t = sub.add_parser("train", help="train a multi-task model and write a bundle")
    t.add_argument("--config", required=True, help="YAML config")
    t.add_argument("--out", required=True, help="bundle folder to write")
    t.add_argument("--json", action="store_true", help="print metrics as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.checkpoint.dir, if any")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="per-task metrics of a bundle on labelled Parquet")
    e.add_argument("--bundle", required=True)
    e.add_argument("--data", required=True, help="Parquet file, folder or glob with the label columns")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    v = sub.add_parser("serve", help="serve a bundle over HTTP (POST /predict, GET /metrics)")
    v.add_argument("--bundle", required=True, help="bundle folder")
    v.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="auto: CUDA when available")
    v.add_argument("--max-items", type=int, default=None, help="candidates per request (default 10000)")
    v.add_argument("--max-body-bytes", type=int, default=None, help="request body limit (default 16 MiB)")
    v.add_argument("--concurrency", type=int, default=None, help="requests scored at once (default min(4, cores))")
    v.add_argument("--max-queue", type=int, default=None, help="requests allowed to wait for a worker before 503 (default 256)")
    v.add_argument("--workers", type=int, default=None,
                   help="worker processes on the one port, metrics summed across them (default 1)")
    v.add_argument("--batch-window-ms", type=float, default=None,
                   help="merge concurrent requests into one forward, waiting at most this long for others (default 0: off; for GPUs)")
    v.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    v.add_argument("--access-log", action="store_true", help="log every request")
    v.set_defaults(func=_cmd_serve)

    c = sub.add_parser("compare", help="multi-task vs single-task per task over seeds: report.md, report.json, plots")
    c.add_argument("--config", required=True, help="YAML config of the multi-task model")
    c.add_argument("--out", required=True, help="report folder (runs/ holds every run's bundle)")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--weightings", default=None, help="comma-separated weighting methods (default: the config's)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--affinity", action="store_true", help="measure lookahead task affinity during the multi-task runs")
    c.add_argument("--affinity-every", type=int, default=None, help="probe one training step in this many (default 10)")
    c.add_argument("--affinity-lr", type=float, default=None, help="lookahead step size (default: train.lr)")
    c.set_defaults(func=_cmd_compare)

    u = sub.add_parser("audit", help="check the data before training: label leakage, task correlations, label counts, time skew")
    u.add_argument("--config", required=True, help="YAML config (its data, features and tasks)")
    u.add_argument("--json", action="store_true", help='print {"findings": [...]} as JSON')
    u.add_argument("--strict", action="store_true", help="exit 3 when any finding is an error")
    u.add_argument("--time-column", default=None, help="column of event times for the temporal checks (overrides audit.time_column)")
    u.set_defaults(func=_cmd_audit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rc = args.func(args)
    except RankerError as e:
        print(f"ranker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
