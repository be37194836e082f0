"""The dashboard and rules against the real thing: a real `ranker serve` process scraped by a
real Prometheus. Every panel query must return data for every task (but those resting on
series only the other task type has: NE of a regression task, RMSE of a binary one), and the
recording rules (PSI and feedback included) must evaluate."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.promhelpers import (
    api_get,
    panels_without_data,
    query,
    recorded_names,
    start_prometheus,
    wait_for_data,
)
from tests.serving_fixtures import ranker_serve

TASK_TYPES = {"ctr": "binary", "cvr": "binary", "watch": "regression"}


def _post(url: str, body: object) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture()
def served(tiny_bundle: Path, tmp_path: Path):
    with ranker_serve(tiny_bundle, tmp_path / "serve.log") as base:
        yield base, int(base.rsplit(":", 1)[1])


def _items(n: int, shift: float = 0.0) -> list[dict]:
    return [{"user_id": 2**60 + i % 50, "category": f"c{i % 12}", "tags": ["t1", "t2"], "price": 5.0 + shift * i} for i in range(n)]


def test_every_dashboard_query_returns_data_from_a_real_server(served: tuple[str, int], tmp_path: Path) -> None:
    base, port = served
    with start_prometheus(f"127.0.0.1:{port}", tmp_path / "prom") as prom:
        wait_for_data(prom.url, 'up{job="ranker"} == 1')
        # a short burst: every task, a subset, a missing feature, one invalid request
        for i in range(40):
            assert _post(base + "/predict", {"context": {"device": "ios"}, "items": _items(20, shift=i % 3)}) == 200
            assert _post(base + "/predict?tasks=ctr", {"items": _items(10)}) == 200
            if i % 10 == 0:
                assert _post(base + "/predict?tasks=nope", {"items": _items(2)}) == 422
            time.sleep(0.1)
        # labels come back for every task: both classes for the binary ones
        with urllib.request.urlopen(base + "/readyz", timeout=10) as r:
            version = json.load(r)["model_version"]
        events = [
            {"model_version": version, "task": t, "score": 0.1 + 0.2 * (i % 4), "label": i % 3 == 0} if ty == "binary"
            else {"model_version": version, "task": t, "score": 2.0 + i % 5, "label": 3.0 * (i % 2)}
            for t, ty in TASK_TYPES.items()
            for i in range(30)
        ]  # fmt: skip
        assert _post(base + "/feedback", {"events": [{**e, "label": float(e["label"])} for e in events]}) == 200
        assert _post(base + "/feedback", {"events": [{**events[0], "score": 2.0}]}) == 200  # one refused
        wait_for_data(prom.url, "sum(rate(ranker_task_items_total[1m])) > 0")
        wait_for_data(prom.url, "count(task:ranker_task_score:psi1h) == 3", timeout=60)
        wait_for_data(prom.url, "count(task:ranker_feedback_calibration:ratio_1h) == 3", timeout=60)
        empty = panels_without_data(prom.url, TASK_TYPES)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        # every recording rule evaluates without error and yields a value
        groups = api_get(prom.url, "/api/v1/rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert recorded_names() <= set(rules)
        bad = [n for n, r in rules.items() if r["health"] != "ok"]
        assert not bad, bad
        psi = {r["metric"]["task"]: float(r["value"][1]) for r in query(prom.url, "task:ranker_task_score:psi1h")}
        assert set(psi) == {"ctr", "cvr", "watch"} and all(v >= 0 for v in psi.values())
        # the server's own sliding-window PSI gauge is scraped too
        gauge = {r["metric"]["task"] for r in query(prom.url, "ranker_task_drift_psi")}
        assert gauge == {"ctr", "cvr", "watch"}
