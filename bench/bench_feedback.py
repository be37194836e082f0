"""POST /feedback cost: events per second through the checks and counters (no HTTP).

    python bench/bench_feedback.py [--events 10000] [--rounds 30]

Prints the milliseconds per request and events per second for a well-formed body (msgspec
fast path) and for one with a single malformed event (the lenient per-event path).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from prometheus_client import CollectorRegistry

from ranker.serving.feedback import FeedbackRecorder, TaskRef
from ranker.serving.metrics import FeedbackMetrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    edges = np.quantile(rng.random(1000), np.linspace(0, 1, 11)[1:-1])  # 10 reference bins
    rec = FeedbackRecorder(FeedbackMetrics(CollectorRegistry()), max_events=a.events)
    rec.add_version("v1", {"ctr": TaskRef("binary", edges), "cvr": TaskRef("binary", edges), "watch": TaskRef("regression", np.array([]))})
    tasks = ("ctr", "cvr", "watch")
    events = [
        {"model_version": "v1", "task": tasks[i % 3], "score": float(rng.random()), "label": float(rng.random() < 0.3)}
        for i in range(a.events)
    ]
    bodies = {
        "well-formed (msgspec)": json.dumps({"events": events}).encode(),
        "one malformed event (lenient path)": json.dumps({"events": events[:-1] + [{"task": "ctr", "score": "x"}]}).encode(),
    }
    for name, body in bodies.items():
        rec.record(body)  # warm
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            rec.record(body)
        dt = (time.perf_counter() - t0) / a.rounds
        print(f"{name}: {dt * 1e3:.1f} ms per {a.events:,}-event request, {a.events / dt:,.0f} events/s")


if __name__ == "__main__":
    main()
