"""Serving benchmark: `ranker serve` under load on loopback, against a plain per-item server.

    python bench/bench_serving.py                    # train a synthetic-default model (1 epoch), run all
    python bench/bench_serving.py --schema census    # the Census-Income schema (26 string + 12 int
                                                     # categoricals, 7 dense), MMoE 8x[128,64], 1 epoch
    python bench/bench_serving.py --bundle DIR       # benchmark an existing bundle
    python bench/bench_serving.py --formats rows,columns,arrow --workers 1,2
    python bench/bench_serving.py --torch-threads 2  # intra-op threads of every side
    python bench/bench_serving.py --device cuda --concurrency 1,8,64 --serve-args '--batch-window-ms 2'

Body formats: ``rows`` (row-wise JSON, per-user columns in ``context``), ``columns``
(column-wise JSON, same context) and ``arrow`` (an Arrow IPC stream, strings dictionary-encoded
as a columnar client would send them, answered as an Arrow stream). ``--workers`` runs
`ranker serve --workers N` for each N.

What it runs, all on this machine:
- in-process: featurize+forward and forward alone on the same 1,000 rows (median of N); with
  ``--device cuda`` the forward is the served one (host batch to the GPU through pinned
  staging, the heads, scores back on the host);
- `ranker serve` (a real process) and a baseline server (a real process, same uvicorn and
  FastAPI): 1,000-candidate requests at concurrency 1 and 8 (``--concurrency``), ``?tasks=ctr`` and all tasks;
  p50/p99 latency and candidates/s from the load generator (``hey`` when installed: a Go
  client stealing less CPU from the servers; otherwise an async httpx client);
- the baseline is the plain way to write the endpoint: a pydantic model per item, a Python
  loop building each item's features (the same stable hashes and standardisation, checked to
  give the same scores), every head run, FastAPI's response_model serialisation.

Both servers get the same torch thread count. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONTEXT_COLUMNS = ("user_id", "device", "user_activity", "hour")  # the synthetic logs' per-user columns


# ---------------------------------------------------------------- the baseline server


def baseline_app(bundle_dir: str) -> Any:
    """The plain per-item implementation of POST /predict (same contract, same scores)."""
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel, create_model

    from ranker.bundle import load_bundle
    from ranker.features import hash_str

    b = load_bundle(bundle_dir)
    model, f = b.model.eval(), b.featurizer
    mask64 = 2**64 - 1

    def splitmix64(v: int) -> int:  # ranker.features.hash_int64, one Python int at a time
        z = ((v & mask64) + 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    def bucket(v: Any, kind: str, buckets: int) -> int:
        if v is None:
            return 0
        h = splitmix64(int(v)) if kind == "int" else hash_str(v)
        return h % buckets + 1

    def standardise(v: float | None, name: str, transform: str) -> float:
        if v is None or not math.isfinite(v):
            return 0.0
        if transform == "log1p":
            v = math.copysign(math.log1p(abs(v)), v)
        mean, std = f.dense_stats[name]
        return (v - mean) / std

    def py_type(spec: Any) -> Any:
        if spec.type == "dense":
            return float
        value = int | str if f.kinds[spec.name] == "int" else str
        return list[value] if spec.type == "multi_hot" else value  # type: ignore[valid-type]

    Item = create_model("Item", **{s.source: (py_type(s) | None, None) for s in f.features})  # type: ignore[call-overload]

    class Request(BaseModel):
        context: Item = Item()  # type: ignore[valid-type]
        items: list[Item]  # type: ignore[valid-type]

    class Response(BaseModel):
        model_version: str
        scores: dict[str, list[float]]

    app = FastAPI()

    def predict(req: Request, tasks: str | None = None) -> Response:
        ctx = req.context.model_dump(exclude_none=True)
        cat, dense, bags = [], [], {s.name: [] for s in f.multi_hot}
        for item in req.items:  # the per-item loop this benchmark measures against
            row = {**ctx, **item.model_dump(exclude_none=True)}
            cat.append([bucket(row.get(s.source), f.kinds[s.name], s.buckets) for s in f.categorical])
            dense.append([standardise(row.get(s.source), s.name, s.transform) for s in f.dense])
            for s in f.multi_hot:
                values = row.get(s.source)
                bags[s.name].append([bucket(v, f.kinds[s.name], s.buckets) for v in values] if values else [0])
        n = len(req.items)
        batch = {
            "cat": torch.tensor(cat, dtype=torch.long).reshape(n, len(f.categorical)),
            "dense": torch.tensor(dense, dtype=torch.float32).reshape(n, len(f.dense)),
        }
        for s in f.multi_hot:
            width = max(len(r) for r in bags[s.name])
            batch[f"bag:{s.name}"] = torch.tensor([r + [s.buckets + 1] * (width - len(r)) for r in bags[s.name]], dtype=torch.long)
        with torch.no_grad():
            out = model.predict(batch)  # every head, whatever was asked
        names = tasks.split(",") if tasks else list(out)
        return Response(model_version=b.version, scores={t: out[t].tolist() for t in names})

    # the models are local, so FastAPI cannot resolve the string annotations of postponed evaluation
    predict.__annotations__ = {"req": Request, "tasks": str | None, "return": Response}
    app.post("/predict", response_model=Response)(predict)
    return app


# ---------------------------------------------------------------- set-up


def train_default_bundle(work: Path, rows: int, model: dict[str, Any] | None = None) -> Path:
    """The synthetic generator's default config (MMoE 8 experts [128, 64], towers [32], 9
    features with a multi-hot, 3 tasks), trained for one epoch; ``model`` overrides model
    settings (e.g. wider experts, to see how the serving overhead compares with a costlier forward)."""
    from ranker.config import load_config
    from ranker.training.synth import write_synthetic
    from ranker.training.trainer import Trainer

    cfg_path = write_synthetic(work / "data", rows=rows, seed=0)
    cfg = load_config(cfg_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1, "progress": False}),
                                 "model": cfg.model.model_validate({**cfg.model.model_dump(), **(model or {})})})
    Trainer(cfg, progress=False, log=lambda _s: None).run(work / "bundle")
    return work / "bundle"


def request_rows(bundle_dir: Path, data: Path | None, items: int) -> tuple[Any, bytes]:
    """(Arrow table the server builds, JSON body): per-user columns go in ``context``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranker.bundle import load_bundle
    from ranker.serving.parsing import RequestParser

    b = load_bundle(bundle_dir)
    cols = list(dict.fromkeys(b.featurizer.columns))
    if data is not None:
        table = pq.read_table(data, columns=cols).slice(0, items)
    else:  # no data at hand: random rows of the right types
        rng = np.random.default_rng(0)
        arrays = {}
        for s in b.featurizer.features:
            kind = b.featurizer.kinds.get(s.name)
            scalar = (lambda i: int(rng.integers(1, 2**62))) if kind == "int" else (lambda i: f"v{rng.integers(0, 500)}")
            if s.type == "dense":
                arrays[s.source] = pa.array(rng.lognormal(1, 1, items))
            elif s.type == "multi_hot":
                arrays[s.source] = pa.array([[scalar(i) for _ in range(int(rng.integers(0, 5)))] for i in range(items)])
            else:
                arrays[s.source] = pa.array([scalar(i) for i in range(items)])
        table = pa.table(arrays)
    rows = table.to_pylist()
    ctx = {k: rows[0][k] for k in CONTEXT_COLUMNS if k in cols}
    body = json.dumps({"context": ctx, "items": [{k: v for k, v in r.items() if k not in ctx} for r in rows]}).encode()
    return RequestParser(b.featurizer, max(items, 1)).parse(body), body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    import httpx

    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise TimeoutError(f"{url} not ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- measuring


def median_ms(fn: Any, n: int, idle: float = 0.0) -> float:
    """Median wall time of ``fn``; ``idle`` seconds of sleep before each run mimic the gap a
    server thread sleeps between requests (on a shared box a thread that sleeps loses its core
    and caches, and a tight loop never does)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        if idle:
            time.sleep(idle)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


class InProcess:
    """The model's own time on the request's rows, in this process: featurize+forward and
    forward alone, per task selection (median of ``n`` runs)."""

    def __init__(self, bundle_dir: Path, table: Any, body: bytes, device: str = "cpu") -> None:
        from ranker.bundle import load_bundle
        from ranker.serving.predictor import load_model
        from ranker.serving.settings import ServingSettings

        self.b = load_bundle(bundle_dir)
        self.table, self.body, self.device = table, body, device
        self.batch = self.b.featurizer.transform(table)
        # the server's whole per-request work minus HTTP: JSON parse, featurize, forward, encode
        self.loaded = load_model(bundle_dir, ServingSettings(bundle=bundle_dir, device=device), warm=False)

    def measure(self, tasks: list[str] | None, n: int, fmt: str = "rows", body: bytes | None = None) -> dict[str, float]:
        import torch

        from ranker.serving.formats import JSON_WIRE, WireFormat

        b, table, batch, loaded = self.b, self.table, self.batch, self.loaded
        names = tasks or loaded.task_names
        wire = WireFormat(True, True) if fmt == "arrow" else JSON_WIRE
        payload = body if body is not None else self.body
        if self.device == "cpu":
            def forward(x: Any) -> Any:
                return b.model.predict(x, tasks)
        else:  # the served forward: host batch -> device (pinned staging), heads, scores back on the host
            def forward(x: Any) -> Any:
                return loaded.forward(x, names)
        with torch.inference_mode():
            return {
                "server work": median_ms(lambda: loaded.predict(payload, names, wire), n),
                "featurize+forward": median_ms(lambda: forward(b.featurizer.transform(table)), n),
                "forward": median_ms(lambda: forward(batch), n),
            }


def load_hey(url: str, body_file: Path, concurrency: int, requests: int, ctype: str = "application/json", accept: str = "application/json") -> tuple[np.ndarray, float, int]:
    """(latencies s, wall s, failures) from hey's per-request CSV."""
    res = subprocess.run(
        ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", ctype, "-H", f"Accept: {accept}", "-D", str(body_file), "-o", "csv", url],
        capture_output=True, text=True, check=True,
    )
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    lat = np.array([float(r["response-time"]) for r in rows])
    ends = np.array([float(r["offset"]) + float(r["response-time"]) for r in rows])
    starts = np.array([float(r["offset"]) for r in rows])
    failed = sum(r["status-code"] != "200" for r in rows)
    return lat, float(ends.max() - starts.min()), failed


def load_httpx(url: str, body: bytes, concurrency: int, requests: int, ctype: str = "application/json", accept: str = "application/json") -> tuple[np.ndarray, float, int]:
    import httpx

    async def run() -> tuple[list[float], float, int]:
        lat: list[float] = []
        failed = 0
        left = requests
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60, headers={"content-type": ctype, "accept": accept}) as client:

            async def worker() -> None:
                nonlocal left, failed
                while left > 0:
                    left -= 1
                    t = time.perf_counter()
                    r = await client.post(url, content=body)
                    lat.append(time.perf_counter() - t)
                    failed += r.status_code != 200

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return lat, time.perf_counter() - t0, failed

    lat, wall, failed = asyncio.run(run())
    return np.array(lat), wall, failed


# ---------------------------------------------------------------- main


def server_stages(base: str, tasks: list[str]) -> str:
    """Mean per-request seconds the server itself reports (its /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    v: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for smp in fam.samples:
            v[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value

    def mean(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        count = v.get((f"{name}_count", key), 0.0)
        return v.get((f"{name}_sum", key), 0.0) / count * 1e3 if count else float("nan")

    heads = ", ".join(f"{t} {mean('ranker_task_head_duration_seconds', task=t):.2f}" for t in tasks)
    stages = ", ".join(f"{s} {mean('ranker_request_stage_duration_seconds', stage=s):.2f}" for s in ("parse", "featurize", "encode"))
    return (f"request {mean('ranker_request_duration_seconds'):.2f} ms, {stages} ms, encoder+trunk "
            f"{mean('ranker_encoder_duration_seconds'):.2f} ms, heads {heads} ms")


def _widths(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 512,256") from None


def train_census_bundle(work: Path) -> tuple[Path, Path]:
    """The Census-Income benchmark's MMoE (8 experts [128, 64], towers [32]) trained for one
    epoch on its train split; returns (bundle, test split)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import census

    from ranker.config import load_config
    from ranker.training.trainer import Trainer

    cfg = load_config(census.prepare(work / "census"))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1, "progress": False})})
    Trainer(cfg, progress=False, log=lambda _s: None).run(work / "census" / "bundle")
    return work / "census" / "bundle", work / "census" / "test"


FORMATS = ("rows", "columns", "arrow")


def format_bodies(table: Any, rows_body: bytes) -> dict[str, tuple[bytes, str, str]]:
    """{format: (body, content type, accept)} carrying the same candidates."""
    import pyarrow as pa

    from ranker.serving.formats import ARROW_STREAM

    doc = json.loads(rows_body)
    ctx, items = doc.get("context") or {}, doc["items"]
    cols = {k: [it.get(k) for it in items] for k in dict.fromkeys(k for it in items for k in it)}
    columns = json.dumps({"context": ctx, "columns": cols}).encode()
    arrays = {}
    for name in table.schema.names:  # the table the server builds: context already broadcast
        col = table.column(name).combine_chunks()
        arrays[name] = col.dictionary_encode() if pa.types.is_string(col.type) else col
    sink = pa.BufferOutputStream()
    t = pa.table(arrays)
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return {
        "rows": (rows_body, "application/json", "application/json"),
        "columns": (columns, "application/json", "application/json"),
        "arrow": (sink.getvalue().to_pybytes(), ARROW_STREAM, ARROW_STREAM),
    }


def load(client: str, url: str, body: bytes, body_file: Path, ctype: str, accept: str, conc: int, n: int) -> tuple[np.ndarray, float, int]:
    if client == "hey":
        return load_hey(url, body_file, conc, n, ctype, accept)
    return load_httpx(url, body, conc, n, ctype, accept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: train the --schema model for 1 epoch)")
    p.add_argument("--data", type=Path, help="Parquet rows to build requests from (default: the schema's test split)")
    p.add_argument("--schema", choices=("synthetic", "census"), default="synthetic", help="which model to train when no --bundle")
    p.add_argument("--train-rows", type=int, default=60_000)
    p.add_argument("--expert-dims", type=_widths, help="expert layer widths of the trained model, e.g. 512,256 (default: the synthetic default's)")
    p.add_argument("--tower-dims", type=_widths, help="tower layer widths of the trained model, e.g. 128,64")
    p.add_argument("--items", type=int, default=1000, help="candidates per request")
    p.add_argument("--requests", type=int, default=200, help="requests per load run (baseline: a quarter)")
    p.add_argument("--rounds", type=int, default=3, help="in-process / server c=1 alternations (this box is shared: noise)")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads in every process")
    p.add_argument("--formats", default="rows", help=f"comma-separated body formats of {', '.join(FORMATS)}")
    p.add_argument("--workers", default="1", help="comma-separated `ranker serve --workers` counts, e.g. 1,2")
    p.add_argument("--tasks", default="one,all", help="task selections: one (the first task), all, or both")
    p.add_argument("--no-baseline", action="store_true", help="skip the per-item baseline server")
    p.add_argument("--client", choices=("auto", "hey", "httpx"), default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where `ranker serve` and the in-process forward run")
    p.add_argument("--concurrency", default="1,8", help="comma-separated load-generator concurrencies (1 also alternates with the in-process runs)")
    p.add_argument("--serve-args", default="", help="extra `ranker serve` arguments, e.g. '--batch-window-ms 2 --concurrency 4'")
    p.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.torch_threads)
    if a.serve_baseline:
        import uvicorn

        uvicorn.run(baseline_app(str(a.bundle)), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
        return

    import httpx

    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    if bad := [f for f in formats if f not in FORMATS]:
        p.error(f"--formats: unknown {bad}; choose from {', '.join(FORMATS)}")
    worker_counts = [int(w) for w in a.workers.split(",")]
    concs = [int(c) for c in a.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        bundle, data = a.bundle, a.data
        if bundle is None:
            t = time.perf_counter()
            if a.schema == "census":
                bundle, test = train_census_bundle(work)
                data = data or test
            else:
                overrides = {k: v for k, v in (("expert_dims", a.expert_dims), ("tower_dims", a.tower_dims)) if v}
                bundle = train_default_bundle(work, a.train_rows, overrides)
                data = data or work / "data" / "test"
            print(f"trained the {a.schema} model for 1 epoch in {time.perf_counter() - t:.0f}s")
        table, body = request_rows(bundle, data, a.items)
        bodies = format_bodies(table, body)
        files = {}
        for f, (b_, _, _) in bodies.items():
            files[f] = work / f"body.{f}"
            files[f].write_bytes(b_)
        client = "hey" if a.client == "hey" or (a.client == "auto" and shutil.which("hey")) else "httpx"
        inproc = InProcess(bundle, table, body, a.device)
        b, m = inproc.b, inproc.b.config.model
        f = b.featurizer
        one_task = b.model.task_names[0]
        selections = {"one": [one_task], "all": None}
        chosen = [t.strip() for t in a.tasks.split(",") if t.strip()]
        print(f"model {b.version}: {m.architecture} {m.experts} experts {m.expert_dims}, towers {m.tower_dims}, tasks {','.join(b.model.task_names)}; "
              f"{len(f.categorical)} categorical ({sum(k == 'str' for n, k in f.kinds.items() if n in {c.name for c in f.categorical})} string), "
              f"{len(f.dense)} dense, {len(f.multi_hot)} multi-hot")
        print(f"{a.items:,} candidates/request: " + ", ".join(f"{k} {len(v[0]) / 1024:.0f} KiB" for k, v in bodies.items() if k in formats)
              + f"; torch threads {a.torch_threads} per process; load generator {client}; {os.cpu_count()} CPUs"
              + (f"; device {torch.cuda.get_device_name()}" if a.device == "cuda" else "")
              + (f"; serve {a.serve_args}" if a.serve_args else ""))

        env = {**os.environ, "RANKER_TORCH_THREADS": str(a.torch_threads)}
        env.pop("RANKER_ADMIN_TOKEN", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        rows: list[tuple[str, int, str, str, int, float, float, float]] = []
        ratios: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
        scores: dict[str, dict] = {}

        def run_server(name: str, cmd: list[str], workers: int, fmts: list[str], n_req: int, reference: bool) -> None:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proc = start([*cmd, "--port", str(port)], f"{base}/openapi.json", env, work / f"{name.replace(' ', '_')}_{workers}.log")
            try:
                if workers > 1:  # /openapi.json answers from the first worker up; wait for all
                    deadline = time.monotonic() + 120
                    while "ranker_ready 1.0" not in httpx.get(f"{base}/metrics").text and time.monotonic() < deadline:
                        time.sleep(0.5)
                scores.setdefault(name, httpx.post(f"{base}/predict", content=body, headers={"content-type": "application/json"}, timeout=60).json()["scores"])
                for fmt in fmts:
                    payload, ctype, accept = bodies[fmt]
                    for sel in chosen:
                        tasks = selections[sel]
                        url = f"{base}/predict" + (f"?tasks={tasks[0]}" if tasks else "")
                        if 1 in concs:
                            load(client, url, payload, files[fmt], ctype, accept, 1, 10)  # warm the connection path
                            lat1, wall1, n1 = [], 0.0, 0
                            for _ in range(a.rounds if reference else 1):
                                ref = inproc.measure(tasks, 50, fmt, payload) if reference else None
                                lat, wall, failed = load(client, url, payload, files[fmt], ctype, accept, 1, n_req)
                                if failed:
                                    print(f"  !! {name} {fmt} {sel} c=1: {failed} failed requests")
                                lat1.append(lat)
                                wall1, n1 = wall1 + wall, n1 + len(lat)
                                if ref is not None:
                                    ratios.setdefault((fmt, sel), []).append((float(np.percentile(lat, 50) * 1e3), ref))
                            lat = np.concatenate(lat1)
                            rows.append((name, workers, fmt, sel, 1, float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), n1 * a.items / wall1))
                        for conc in (c for c in concs if c != 1):
                            load(client, url, payload, files[fmt], ctype, accept, conc, 2 * conc)  # warm every connection
                            lat, wall, failed = load(client, url, payload, files[fmt], ctype, accept, conc, max(n_req, 4 * conc))
                            if failed:
                                print(f"  !! {name} {fmt} {sel} c={conc}: {failed} failed requests")
                            rows.append((name, workers, fmt, sel, conc, float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), len(lat) * a.items / wall))
                if name == "ranker serve":
                    print(f"\nranker serve --workers {workers}, its own /metrics (mean per request, all runs): {server_stages(base, b.model.task_names)}")
            finally:
                stop(proc)

        serve_cmd = [sys.executable, "-m", "ranker.cli", "serve", "--bundle", str(bundle), "--max-items", str(max(a.items, 1)), "--log-level", "warning",
                     "--device", a.device, *shlex.split(a.serve_args)]
        for i, w in enumerate(worker_counts):
            run_server("ranker serve", [*serve_cmd, "--workers", str(w)], w, formats, a.requests, reference=i == 0)
        if not a.no_baseline:
            run_server("baseline", [sys.executable, __file__, "--serve-baseline", "--bundle", str(bundle), "--torch-threads", str(a.torch_threads)],
                       1, ["rows"], max(a.requests // 4, 16), reference=False)
            diff = max(float(np.max(np.abs(np.subtract(scores["ranker serve"][t], scores["baseline"][t])))) for t in scores["baseline"])
            print(f"baseline vs ranker serve scores: max |diff| {diff:.1e} (same features, same model)")
        print("\nserver         workers format  tasks conc   p50 ms   p99 ms   candidates/s")
        for name, w, fmt, sel, conc, p50, p99, cps in rows:
            print(f"{name:<15} {w:>5} {fmt:<7} {sel:<5} {conc:>4} {p50:8.2f} {p99:8.2f} {cps:14,.0f}")

        print("\nin-process beside each c=1 round (median of 50 runs, ms) and the server's p50 in that round:")
        for (fmt, sel), rs in ratios.items():
            for p50, ref in rs:
                print(f"  {fmt:<7} tasks={sel:<3} forward {ref['forward']:5.2f}  featurize+forward {ref['featurize+forward']:5.2f}  "
                      f"decode+featurize+forward+encode {ref['server work']:5.2f}  | server p50 {p50:5.2f} (forward + {p50 - ref['forward']:.2f})")
        get = {(r[0], r[1], r[2], r[3], r[4]): r for r in rows}
        print("\ngoals (medians over rounds; census goals: rows c=8 >= 5x baseline, arrow p50 c=1 <= 1.3x forward):")
        for (fmt, sel), rs in ratios.items():
            print(f"  p50 c=1 {fmt:<7} tasks={sel}: {np.median([p / r['forward'] for p, r in rs]):.2f}x forward alone, "
                  f"{np.median([p / r['server work'] for p, r in rs]):.2f}x the server's own work in a tight loop")
        for sel in chosen:
            for w in worker_counts:
                for fmt in formats:
                    for conc in concs:
                        f_ = get.get(("ranker serve", w, fmt, sel, conc))
                        b_ = get.get(("baseline", 1, "rows", sel, conc))
                        if f_ and b_:
                            print(f"  candidates/s workers={w} {fmt:<7} tasks={sel:<3} c={conc}: {f_[7]:,.0f} vs baseline {b_[7]:,.0f} = {f_[7] / b_[7]:.1f}x")
        if len(worker_counts) > 1:
            for fmt in formats:
                for sel in chosen:
                    for conc in (c for c in concs if c != 1):
                        per = [get.get(("ranker serve", w, fmt, sel, conc)) for w in worker_counts]
                        if all(per):
                            print(f"  c={conc} {fmt:<7} tasks={sel:<3}: " + ", ".join(f"{w} workers {r[7]:,.0f}" for w, r in zip(worker_counts, per, strict=True)) + " candidates/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
