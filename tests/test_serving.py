"""HTTP tests of the serving app (TestClient): every endpoint, every refusal, parity with the
offline model, the head spy, metrics read from a fresh registry, and reloads."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ranker.bundle import Bundle, load_bundle
from ranker.errors import RankerError
from ranker.serving import ServingSettings, create_app
from ranker.serving.deps import ServingState
from ranker.serving.errors import REASONS
from ranker.serving.schemas import PredictResponse
from tests.promhelpers import CONTRACT_SERIES, TARGET_LABELS, series_labels
from tests.serving_fixtures import BIG, TASKS, mmoe_bundle, serving_data, shared_bottom_bundle

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return mmoe_bundle()


@pytest.fixture(scope="module")
def offline(bundle_path: Path) -> Bundle:
    """The same bundle loaded separately: the offline side of every parity check."""
    return load_bundle(bundle_path)


@pytest.fixture(scope="module")
def val_table() -> pa.Table:
    return pq.read_table(serving_data().val_file)


class Served:
    def __init__(self, client: TestClient, registry: CollectorRegistry) -> None:
        self.client, self.registry = client, registry

    @property
    def state(self) -> ServingState:
        return self.client.app.state.serving  # type: ignore[attr-defined]

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        assert v is not None, f"no series {name}{labels}"
        return v


@contextmanager
def serve(bundle: Path, lifespan: bool = True, **settings: Any) -> Iterator[Served]:
    registry = CollectorRegistry()
    cfg = ServingSettings(bundle=bundle, device="cpu", warmup_rows=16, **settings)
    client = TestClient(create_app(cfg, registry=registry))
    if lifespan:
        with client:
            yield Served(client, registry)
    else:
        yield Served(client, registry)


def offline_scores(b: Bundle, table: pa.Table, tasks: tuple[str, ...] = TASKS) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {t: s.numpy() for t, s in b.model.predict(b.featurizer.transform(table), list(tasks)).items()}


def assert_scores_match(got: dict[str, list[float]], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for t, w in want.items():
        # 1e-5 absolute for probabilities; regression scores are in label units (seconds), so
        # the same 1e-5 is applied relative to the value as well
        np.testing.assert_allclose(np.asarray(got[t]), w, rtol=1e-5, atol=1e-5, err_msg=t)


# ---------------------------------------------------------------- operations endpoints


def test_healthz_readyz_and_model_info(bundle_path: Path, offline: Bundle) -> None:
    with serve(bundle_path, lifespan=False) as s:  # no start-up yet: loaded, not warm
        assert s.client.get("/healthz").json() == {"status": "ok"}
        r = s.client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        assert s.client.head("/readyz").status_code == 503
        assert s.value("ranker_ready") == 0
        with s.client:  # lifespan: warm-up, then ready
            r = s.client.get("/readyz")
            assert r.status_code == 200 and r.json() == {"status": "ready", "model_version": offline.version}
            assert s.value("ranker_ready") == 1
            info = s.client.get("/model").json()
            for path in ("/healthz", "/readyz", "/model", "/metrics"):  # HEAD wherever GET is (was 405)
                head, get = s.client.head(path), s.client.get(path)
                assert head.status_code == 200 and head.content == b"", path
                assert head.headers["content-type"] == get.headers["content-type"], path
    assert info["version"] == offline.version and info["architecture"] == "mmoe"
    assert [t["name"] for t in info["tasks"]] == list(TASKS)
    assert {t["name"]: t["mask"] for t in info["tasks"]} == {t.name: t.mask for t in offline.config.tasks}  # feedback's rows
    assert any(t["mask"] for t in info["tasks"])
    assert {f["name"]: f["column"] for f in info["features"]}["category"] == "item_category"
    assert {f["name"]: f["kind"] for f in info["features"]}["user_id"] == "int"
    assert info["metrics"]["val"]["ctr"]["count"] > 0


def test_openapi_documents_predict(bundle_path: Path) -> None:
    with serve(bundle_path, lifespan=False) as s:
        spec = s.client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    assert {"$ref": "#/components/schemas/PredictRows"} in op["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert "items" in spec["components"]["schemas"]["PredictRows"]["properties"]
    assert {"413", "422", "503"} <= set(op["responses"])  # 503: overloaded (test_overload_sheds_with_503...)
    assert "409" in spec["paths"]["/admin/reload"]["post"]["responses"]  # several workers
    assert set(spec["paths"]["/healthz"]) == {"get"}  # HEAD is served, not documented as an operation of its own


# ---------------------------------------------------------------- /predict: parity


def test_predict_matches_offline_scores(bundle_path: Path, offline: Bundle, val_table: pa.Table) -> None:
    rows = val_table.slice(0, 300)
    with serve(bundle_path) as s:
        r = s.client.post("/predict", json={"items": rows.to_pylist()})
    assert r.status_code == 200
    body = PredictResponse.model_validate_json(r.content)
    assert body.model_version == offline.version
    assert all(len(v) == 300 for v in body.scores.values())
    assert_scores_match(body.scores, offline_scores(offline, rows))  # type: ignore[arg-type]
    assert min(body.scores["watch"]) > 0  # type: ignore[type-var]  # seconds, not the standardised log


def test_context_broadcast_and_ids_as_decimal_strings(bundle_path: Path, offline: Bundle, val_table: pa.Table) -> None:
    """Context applies where an item has no value of its own; int64 ids sent as strings hash
    exactly like the Parquet int64 values."""
    rows = val_table.slice(0, 200).to_pylist()
    items = []
    for i, row in enumerate(rows):
        item = {k: v for k, v in row.items() if k != "device" or i % 2}  # even items: no device
        item["user_id"] = str(row["user_id"])
        item["topic_ids"] = None if row["topic_ids"] is None else [str(v) for v in row["topic_ids"]]
        items.append(item)
    expect = val_table.slice(0, 200)
    device = [row["device"] if i % 2 and row["device"] is not None else "web" for i, row in enumerate(rows)]
    expect = expect.set_column(expect.schema.get_field_index("device"), "device", pa.array(device))
    with serve(bundle_path) as s:
        r = s.client.post("/predict?tasks=ctr,watch", json={"context": {"device": "web"}, "items": items})
    assert r.status_code == 200, r.text
    assert_scores_match(r.json()["scores"], offline_scores(offline, expect, ("ctr", "watch")))


def test_int64_ids_above_2_53_hash_exactly(bundle_path: Path, offline: Bundle) -> None:
    f = offline.featurizer
    a, b = BIG + 3, BIG + 4  # equal as float64; different buckets in this featurizer
    buckets = f.transform(pa.table({"user_id": pa.array([a, b], pa.int64())}))["cat"][:, 0]
    assert float(a) == float(b) and buckets[0] != buckets[1]
    as_int = {"items": [{"user_id": a}, {"user_id": b}]}
    as_str = {"items": [{"user_id": str(a)}, {"user_id": str(b)}]}
    mixed = {"items": [{"user_id": a}, {"user_id": str(b)}]}  # one column, both conventions
    with serve(bundle_path) as s:
        got = [s.client.post("/predict?tasks=ctr", json=body).json()["scores"]["ctr"] for body in (as_int, as_str, mixed)]
    want = offline_scores(offline, pa.table({"user_id": pa.array([a, b], pa.int64())}), ("ctr",))["ctr"]
    assert got[0] == got[1] == got[2]
    assert got[0][0] != got[0][1]  # through float64 both ids would score the same
    np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_pretty_printed_body_and_unknown_keys(bundle_path: Path, offline: Bundle) -> None:
    body = json.dumps({"items": [{"price": 12.0, "title": {"nested": [1, "x"]}}], "request_id": "abc"}, indent=2)
    with serve(bundle_path) as s:
        r = s.client.post("/predict?tasks=ctr", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    want = offline_scores(offline, pa.table({"price": [12.0]}), ("ctr",))["ctr"]
    np.testing.assert_allclose(r.json()["scores"]["ctr"], want, atol=1e-6)


def test_tasks_subset_order_and_duplicates(bundle_path: Path) -> None:
    with serve(bundle_path) as s:
        one = s.client.post("/predict?tasks=watch,ctr,watch", json={"items": [{}, {}]}).json()
        every = s.client.post("/predict", json={"items": [{}, {}]}).json()
    assert list(one["scores"]) == ["watch", "ctr"]
    assert list(every["scores"]) == list(TASKS)
    assert one["scores"]["ctr"] == every["scores"]["ctr"]


# ---------------------------------------------------------------- /predict: only requested heads run


@pytest.mark.parametrize(("query", "expected"), [("ctr", ["ctr"]), ("cvr,watch", ["cvr", "watch"]), (None, list(TASKS))])
def test_only_requested_heads_and_gates_run(bundle_path: Path, query: str | None, expected: list[str]) -> None:
    with serve(bundle_path) as s:
        model = s.state.current.model
        calls: dict[str, int] = {}

        def spy(name: str) -> Any:
            return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

        hooks = [model.encoder.register_forward_hook(spy("encoder")), model.trunk.register_forward_hook(spy("trunk"))]
        for t in TASKS:
            hooks.append(model.heads[t].register_forward_hook(spy(f"head:{t}")))
            hooks.append(model.trunk.gates[t].register_forward_hook(spy(f"gate:{t}")))  # MMoE
        url = "/predict" if query is None else f"/predict?tasks={query}"
        r = s.client.post(url, json={"items": [{"price": 1.0}] * 7})
        for h in hooks:
            h.remove()
    assert r.status_code == 200 and list(r.json()["scores"]) == expected
    want = {"encoder": 1, "trunk": 1} | {f"head:{t}": 1 for t in expected} | {f"gate:{t}": 1 for t in expected}
    assert calls == want


# ---------------------------------------------------------------- /predict: refusals


def _items(n: int) -> dict:
    return {"items": [{"price": 1.0}] * n}


BAD_REQUESTS = [
    # (id, body, reason, field)
    ("wrong_type", {"items": [{"price": 1.0}, {"price": "cheap"}]}, "bad_type", "items[1].price"),
    ("string_for_string_feature", {"items": [{"device": 3}]}, "bad_type", "items[0].device"),
    ("float_id", {"items": [{"user_id": 1.5}]}, "bad_type", "items[0].user_id"),
    ("id_overflow", {"items": [{"user_id": str(2**63)}]}, "bad_type", "items[0].user_id"),
    ("list_element", {"items": [{"tags": ["a", 7]}]}, "bad_type", "items[0].tags[1]"),
    ("item_not_object", {"items": [{}, 5]}, "bad_type", "items[1]"),
    ("context_type", {"context": {"price": [1]}, "items": [{}]}, "bad_type", "context.price"),
    ("nan", '{"items": [{"price": 1}, {"price": NaN}]}', "non_finite", "items[1].price"),
    ("infinity_in_context", '{"context": {"price": -Infinity}, "items": [{}]}', "non_finite", "context.price"),
    ("overflow_to_inf", '{"items": [{"age_days": 1e999}]}', "non_finite", "items[0].age_days"),
    ("empty_items", {"items": []}, "empty_items", "items"),
    ("no_items", {"context": {}}, "empty_items", "items"),
    ("too_many_items", _items(6), "too_many_items", "items"),
    ("bad_json", '{"items": [', "bad_json", "body"),
    ("two_documents", '{"items": [{}]}\n{"items": [{}]}', "bad_json", "body"),
    ("not_an_object", "[1, 2]", "bad_type", "body"),
    ("null_body", "null", "bad_type", "body"),  # crashes pyarrow 26's JSON reader if it gets there
    ("invalid_utf8", b'{"items": [{"device": "\xff"}]}', "bad_json", "body"),
    ("hex_id", {"items": [{"user_id": "0x10"}]}, "bad_type", "items[0].user_id"),  # decimal strings only
    ("id_overflow_integer", '{"items": [{"user_id": 18446744073709551616}]}', "bad_type", "items[0].user_id"),
    ("bool_for_dense", {"items": [{"price": True}]}, "bad_type", "items[0].price"),
    ("string_for_list", {"items": [{"tags": "a"}]}, "bad_type", "items[0].tags"),
    ("lone_surrogate", '{"items": [{"device": "\\ud800"}]}', "bad_json", "body"),
    ("items_null", {"items": None}, "bad_type", "items"),
    # 2 KB: msgspec recursing into an unknown key's value (a RecursionError, once a 500)
    ("deep_nesting", '{"items": [{"x": ' + "[" * 1000 + "]" * 1000 + "}]}", "bad_json", "body"),
    # the same with a type error: the slow path's parser had called it "not valid JSON (recursion limit ...)"
    ("deep_nesting_type_error", '{"items": [{"price": "x", "x": ' + "[" * 1000 + "]" * 1000 + "}]}", "bad_json", "body"),
    ("context_list_too_long", {"context": {"tags": ["a"] * 1001}, "items": [{}]}, "too_many_values", "context.tags"),
]


@pytest.mark.parametrize(("body", "reason", "field"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_422_naming_the_field(bundle_path: Path, body: Any, reason: str, field: str) -> None:
    with serve(bundle_path, max_items=5) as s:
        if isinstance(body, (str, bytes)):
            r = s.client.post("/predict", content=body, headers={"content-type": "application/json"})
        else:
            r = s.client.post("/predict", json=body)
        assert r.status_code == 422, r.text
        err = r.json()
        assert err["reason"] == reason and err["field"] == field
        assert err["detail"].startswith(f"{field}: ")
        if "[" * 1000 in str(body):  # valid JSON, only too deep
            assert err["detail"] == "body: nested too deeply"
        assert s.value("ranker_invalid_requests_total", reason=reason) == 1
        assert sum(s.value("ranker_invalid_requests_total", reason=x) for x in REASONS) == 1
        assert s.value("ranker_requests_total", status="4xx") == 1
        assert s.value("ranker_requests_total", status="5xx") == 0


def test_unknown_task_lists_valid_ones(bundle_path: Path) -> None:
    with serve(bundle_path) as s:
        r = s.client.post("/predict?tasks=ctr,revenue", json=_items(1))
        assert r.status_code == 422
        assert r.json()["field"] == "tasks" and "'revenue'" in r.json()["detail"]
        assert "valid: ctr, cvr, watch" in r.json()["detail"]
        assert s.value("ranker_invalid_requests_total", reason="unknown_task") == 1
        # a repeated parameter asks for every task it names (not only the last one)
        r = s.client.post("/predict?tasks=ctr&tasks=watch", json=_items(1))
        assert r.status_code == 200 and set(r.json()["scores"]) == {"ctr", "watch"}, r.text
        assert s.client.post("/predict?tasks=ctr&tasks=revenue", json=_items(1)).status_code == 422


def test_body_over_limit_is_413(bundle_path: Path) -> None:
    big = json.dumps(_items(200)).encode()
    with serve(bundle_path, max_body_bytes=1000) as s:
        by_header = s.client.post("/predict", content=big, headers={"content-type": "application/json"})
        # no Content-Length (chunked): the streamed size is checked
        streamed = s.client.post("/predict", content=iter([big[:600], big[600:]]), headers={"content-type": "application/json"})
        ok = s.client.post("/predict", json=_items(2))
        assert by_header.status_code == 413 and by_header.json()["reason"] == "body_too_large"
        assert streamed.status_code == 413 and streamed.json()["field"] == "body"
        assert ok.status_code == 200
        assert s.value("ranker_invalid_requests_total", reason="body_too_large") == 2


# ---------------------------------------------------------------- metrics


def test_every_series_exists_at_zero_from_start_up(bundle_path: Path, offline: Bundle) -> None:
    with serve(bundle_path) as s:
        assert s.client.get("/metrics").status_code == 200
        for t in TASKS:
            assert s.value("ranker_task_requests_total", task=t) == 0
            assert s.value("ranker_task_items_total", task=t) == 0
            assert s.value("ranker_task_head_duration_seconds_count", task=t) == 0
            assert s.value("ranker_task_score_count", task=t) == 0
            assert math.isnan(s.value("ranker_task_drift_psi", task=t))  # no scores yet: no PSI
            shares = offline.reference[t]["shares"]
            for i, share in enumerate(shares):
                assert s.value("ranker_task_score_bin_total", task=t, bin=str(i)) == 0
                assert s.value("ranker_task_score_reference", task=t, bin=str(i)) == pytest.approx(share)
        for f in offline.config.features:
            assert s.value("ranker_feature_missing_total", feature=f.name) == 0
        for reason in REASONS:
            assert s.value("ranker_invalid_requests_total", reason=reason) == 0
        for status in ("2xx", "4xx", "5xx"):
            assert s.value("ranker_requests_total", status=status) == 0
        for stage in ("parse", "featurize", "encode"):
            assert s.value("ranker_request_stage_duration_seconds_count", stage=stage) == 0
        assert s.value("ranker_model_info", version=offline.version, architecture="mmoe") == 1
        assert s.value("ranker_ready") == 1


def test_exported_label_names_are_the_contract_tables(bundle_path: Path) -> None:
    """Every contract series of a real /metrics carries exactly the labels CONTRACT_LABELS
    lists (the deploy tests check the rules' and dashboard's label names against that table)."""
    with serve(bundle_path) as s:
        assert s.client.post("/predict", json=_items(2)).status_code == 200
        text = s.client.get("/metrics").text
    seen: dict[str, set[frozenset[str]]] = {}
    for fam in text_string_to_metric_families(text):
        for x in fam.samples:
            seen.setdefault(x.name, set()).add(frozenset(x.labels))
    for name in CONTRACT_SERIES:
        assert name in seen, name
        assert seen[name] == {series_labels(name) - TARGET_LABELS}, (name, seen[name])


def test_metric_values_after_known_requests(bundle_path: Path, offline: Bundle) -> None:
    with serve(bundle_path) as s:
        for _ in range(2):
            assert s.client.post("/predict?tasks=ctr", json={"items": [{"price": 1.0}, {"price": 5.0}, {}]}).status_code == 200
        assert s.client.post("/predict", json={"items": [{"device": "ios"}, {"price": 2.0, "device": "web"}]}).status_code == 200
        assert s.client.post("/predict", json={"items": [{"price": "x"}]}).status_code == 422
        assert s.value("ranker_requests_total", status="2xx") == 3
        assert s.value("ranker_requests_total", status="4xx") == 1
        assert s.value("ranker_request_duration_seconds_count") == 3  # only scored requests are timed
        assert s.value("ranker_encoder_duration_seconds_count") == 3
        for stage in ("parse", "featurize", "encode"):
            assert s.value("ranker_request_stage_duration_seconds_count", stage=stage) == 3
            assert s.value("ranker_request_stage_duration_seconds_sum", stage=stage) > 0
        assert s.value("ranker_task_requests_total", task="ctr") == 3
        assert s.value("ranker_task_requests_total", task="cvr") == 1
        assert s.value("ranker_task_items_total", task="ctr") == 8
        assert s.value("ranker_task_items_total", task="watch") == 2
        assert s.value("ranker_task_head_duration_seconds_count", task="ctr") == 3
        assert s.value("ranker_task_head_duration_seconds_count", task="cvr") == 1
        assert s.value("ranker_task_head_duration_seconds_sum", task="ctr") > 0
        assert s.value("ranker_feature_missing_total", feature="price") == 2 + 1
        assert s.value("ranker_feature_missing_total", feature="device") == 6
        assert s.value("ranker_feature_missing_total", feature="user_id") == 8
        # the score histogram's buckets are the reference edges; bins add up to the item count
        edges = offline.reference["ctr"]["edges"]
        bins = [s.value("ranker_task_score_bin_total", task="ctr", bin=str(i)) for i in range(len(edges) + 1)]
        assert sum(bins) == s.value("ranker_task_score_count", task="ctr") == 8
        for i, edge in enumerate(edges):
            le = s.registry.get_sample_value("ranker_task_score_bucket", {"task": "ctr", "le": repr(float(edge))})
            assert le == sum(bins[: i + 1])
        text = s.client.get("/metrics").text
    assert 'ranker_task_score_bucket{le="+Inf",task="ctr"} 8.0' in text


def test_psi_is_small_for_reference_rows_and_large_for_shifted_ones(bundle_path: Path, val_table: pa.Table) -> None:
    """The reference histograms come from the validation split's scores, so serving exactly
    those rows reproduces the reference shares; one repeated item is as shifted as it gets."""
    with serve(bundle_path, drift_window=val_table.num_rows, max_items=20_000) as s:
        s.client.post("/predict", json={"items": val_table.to_pylist()})
        calm = {t: s.value("ranker_task_drift_psi", task=t) for t in TASKS}
        s.client.post("/predict", json={"items": [{"price": 1e6, "device": "tv"}] * val_table.num_rows})
        shifted = {t: s.value("ranker_task_drift_psi", task=t) for t in TASKS}
    assert all(v < 0.02 for v in calm.values()), calm
    assert all(v > 0.25 for v in shifted.values()), shifted


# ---------------------------------------------------------------- reload


def test_reload_disabled_without_token(bundle_path: Path) -> None:
    with serve(bundle_path) as s:
        r = s.client.post("/admin/reload", json={"bundle": str(shared_bottom_bundle())})
    assert r.status_code == 404


def test_reload_needs_the_bearer_token(bundle_path: Path, offline: Bundle) -> None:
    with serve(bundle_path, admin_token=TOKEN) as s:
        body = {"bundle": str(shared_bottom_bundle())}
        missing = s.client.post("/admin/reload", json=body)
        wrong = s.client.post("/admin/reload", json=body, headers={"Authorization": "Bearer nope"})
        basic = s.client.post("/admin/reload", json=body, headers={"Authorization": f"Basic {TOKEN}"})
        assert s.client.get("/model").json()["version"] == offline.version
    assert missing.status_code == wrong.status_code == basic.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"


def test_reload_swaps_the_model(bundle_path: Path, offline: Bundle) -> None:
    new_path = shared_bottom_bundle()
    new = load_bundle(new_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(bundle_path, admin_token=TOKEN) as s:
        r = s.client.post("/admin/reload", json={"bundle": str(new_path)}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"previous_version": offline.version, "model_version": new.version, "architecture": "shared_bottom", "tasks": list(TASKS)}
        assert s.client.get("/model").json()["architecture"] == "shared_bottom"
        scored = s.client.post("/predict?tasks=cvr", json={"items": [{"price": 3.0}]}).json()
        assert scored["model_version"] == new.version
        np.testing.assert_allclose(scored["scores"]["cvr"], offline_scores(new, pa.table({"price": [3.0]}), ("cvr",))["cvr"], atol=1e-6)
        assert s.value("ranker_model_info", version=new.version, architecture="shared_bottom") == 1
        assert s.registry.get_sample_value("ranker_model_info", {"version": offline.version, "architecture": "mmoe"}) is None
        assert s.value("ranker_ready") == 1


def _score_counts(s: Served) -> dict[str, tuple[float, float, float, list[float]]]:
    """Per task: ranker_task_score_count and _sum and the bin counters in bin order as /metrics
    shows them, and ranker_task_items_total."""
    fams = {f.name: f for f in text_string_to_metric_families(s.client.get("/metrics").text)}
    out = {}
    for t in TASKS:
        (count,) = [x.value for x in fams["ranker_task_score"].samples if x.name == "ranker_task_score_count" and x.labels["task"] == t]
        (total,) = [x.value for x in fams["ranker_task_score"].samples if x.name == "ranker_task_score_sum" and x.labels["task"] == t]
        bins = sorted((int(x.labels["bin"]), x.value) for x in fams["ranker_task_score_bin"].samples if x.labels["task"] == t)
        out[t] = (count, total, s.value("ranker_task_items_total", task=t), [v for _, v in bins])
    return out


@pytest.mark.parametrize("metrics_dir", [False, True], ids=["one-process", "metrics-dir"])
def test_reload_keeps_the_score_counters(bundle_path: Path, offline: Bundle, metrics_dir: bool, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The score histograms and bin counters count on over reloads, to the same version or
    another, as they do over a multi-worker SIGHUP roll: always equal to the items served."""
    if metrics_dir:  # one process with PROMETHEUS_MULTIPROC_DIR: score files per version, summed by a scrape
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    other = shared_bottom_bundle()
    assert all(len(load_bundle(other).reference[t]["edges"]) == len(offline.reference[t]["edges"]) for t in TASKS)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(bundle_path, admin_token=TOKEN) as s:
        served = 0
        seen: list[dict[str, tuple[float, float, float, list[float]]]] = []
        for target in (bundle_path, bundle_path, other, bundle_path):
            for n in (3, 5):
                assert s.client.post("/predict", json=_items(n)).status_code == 200
                served += n
            seen.append(_score_counts(s))
            r = s.client.post("/admin/reload", json={"bundle": str(target)}, headers=auth)
            assert r.status_code == 200, r.text
            seen.append(_score_counts(s))
    for before, after in zip(seen, seen[1:], strict=False):
        for t in TASKS:
            count, total, _, bins = after[t]
            assert count >= before[t][0] and total >= before[t][1], (t, before[t], after[t])
            assert all(b >= a for a, b in zip(before[t][3], bins, strict=True)), (t, before[t], after[t])
    for t, (count, _, items, bins) in seen[-1].items():
        assert count == items == sum(bins) == served, (t, seen[-1][t])


def test_broken_bundle_is_refused_and_old_model_keeps_serving(bundle_path: Path, offline: Bundle, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(bundle_path, admin_token=TOKEN) as s:
        r = s.client.post("/admin/reload", json={"bundle": str(broken)}, headers=auth)
        gone = s.client.post("/admin/reload", json={"bundle": str(tmp_path / "nowhere")}, headers=auth)
        no_body = s.client.post("/admin/reload", json={}, headers=auth)
        scored = s.client.post("/predict?tasks=ctr", json=_items(1))
    assert r.status_code == 422 and "model.safetensors" in r.json()["detail"] and offline.version in r.json()["detail"]
    assert gone.status_code == 422 and "bundle folder not found" in gone.json()["detail"]
    assert no_body.status_code == 422 and no_body.json()["field"] == "bundle"
    assert scored.status_code == 200 and scored.json()["model_version"] == offline.version


@contextmanager
def _request_held_in_worker(s: Served) -> Iterator[dict[str, Any]]:
    """A /predict request from another thread, held inside parsing (in the worker thread) until
    the block exits; yields the dict that receives its response under "r"."""
    parser = s.state.current.parser
    entered, release = threading.Event(), threading.Event()
    real_parse = parser.parse

    def blocking_parse(body: bytes) -> pa.Table:
        entered.set()
        assert release.wait(10)
        return real_parse(body)

    parser.parse = blocking_parse  # type: ignore[method-assign]
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(r=s.client.post("/predict?tasks=ctr", json=_items(2))))
    worker.start()
    try:
        assert entered.wait(10)
        yield result
    finally:
        release.set()
        worker.join(10)
        parser.parse = real_parse  # type: ignore[method-assign]


def test_request_in_flight_finishes_on_its_model_and_loop_stays_free(bundle_path: Path, offline: Bundle) -> None:
    """A request blocked inside inference keeps its pinned model across a reload, and the event
    loop keeps answering meanwhile (inference runs in a worker thread)."""
    new = load_bundle(shared_bottom_bundle())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(bundle_path, admin_token=TOKEN) as s:
        with _request_held_in_worker(s) as result:
            assert s.client.get("/healthz").status_code == 200  # the loop is not blocked
            assert s.client.post("/admin/reload", json={"bundle": str(shared_bottom_bundle())}, headers=auth).status_code == 200
        after = s.client.post("/predict?tasks=ctr", json=_items(2)).json()
        # the held request's scores, counted by the old model's tracker after the swap, are kept
        assert s.value("ranker_task_score_count", task="ctr") == s.value("ranker_task_items_total", task="ctr") == 4
    assert result["r"].json()["model_version"] == offline.version
    assert after["model_version"] == new.version


def test_overload_sheds_with_503_instead_of_queueing(bundle_path: Path) -> None:
    """With every worker busy and the wait queue full, /predict answers 503 at once."""
    with serve(bundle_path, concurrency=1, max_queue=0) as s:
        with _request_held_in_worker(s) as result:
            shed = s.client.post("/predict?tasks=ctr", json=_items(2))
        after = s.client.post("/predict?tasks=ctr", json=_items(2))
        metrics = s.client.get("/metrics").text
    assert shed.status_code == 503 and shed.json()["reason"] == "overloaded"
    assert result["r"].status_code == 200 and after.status_code == 200
    assert "ranker_requests_shed_total 1.0" in metrics
    assert "ranker_request_duration_seconds_count 2.0" in metrics  # the shed 503 is not timed
    assert 'ranker_requests_total{status="5xx"} 1.0' in metrics


# ---------------------------------------------------------------- settings


def test_settings_validation_names_the_setting(bundle_path: Path) -> None:
    with pytest.raises(RankerError, match="RANKER_MAX_ITEMS"):
        ServingSettings.from_env({"RANKER_MAX_ITEMS": "lots"}, bundle=bundle_path)
    with pytest.raises(RankerError, match="concurrency"):
        ServingSettings.from_env({}, bundle=bundle_path, concurrency=0)
    with pytest.raises(RankerError, match="RANKER_ADMIN_TOKEN"):
        ServingSettings.from_env({}, bundle=bundle_path, admin_token="x")
    s = ServingSettings.from_env({"RANKER_ADMIN_TOKEN": TOKEN, "RANKER_MAX_ITEMS": "50"}, bundle=bundle_path, max_items=None)
    assert s.admin_token is not None and s.admin_token.get_secret_value() == TOKEN and s.max_items == 50
    assert TOKEN not in repr(s)
    assert ServingSettings.from_env({"RANKER_ADMIN_TOKEN": " "}, bundle=bundle_path).admin_token is None
    if not torch.cuda.is_available():
        with pytest.raises(RankerError, match="device"):
            ServingSettings.from_env({}, bundle=bundle_path, device="cuda")


def test_create_app_refuses_a_broken_bundle(tmp_path: Path) -> None:
    with pytest.raises(RankerError, match="bundle folder not found"):
        create_app(ServingSettings(bundle=tmp_path / "none", device="cpu"))
