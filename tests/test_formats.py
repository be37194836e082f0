"""/predict's three body layouts (JSON rows, JSON columns, Arrow IPC streams) and two answer
formats: same scores for the same values, same validation, 4xx naming the column; through the
app (TestClient) and a real `ranker serve` process."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ranker.serving import ServingSettings, create_app
from ranker.serving.errors import ServingError
from ranker.serving.formats import ARROW_STREAM, MODEL_VERSION_KEY, negotiate
from tests.serving_fixtures import TASKS, mmoe_bundle, ranker_serve, serving_data

ARROW = {"content-type": ARROW_STREAM}


def arrow_body(*batches: pa.RecordBatch | pa.Table) -> bytes:
    tables = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in batches]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, tables[0].schema) as w:
        for t in tables:
            w.write_table(t)
    return sink.getvalue().to_pybytes()


def arrow_scores(content: bytes) -> tuple[dict[str, list[float | None]], str]:
    t = pa.ipc.open_stream(pa.py_buffer(content)).read_all()
    return {name: t.column(name).to_pylist() for name in t.schema.names}, t.schema.metadata[MODEL_VERSION_KEY].decode()


def columns_body(table: pa.Table, context: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"columns": {name: table.column(name).to_pylist() for name in table.schema.names}}
    if context:
        body["context"] = context
    return body


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    """Validation rows with every feature shape: ids above 2**53, nulls, lists, a renamed column."""
    t = pq.read_table(serving_data().val_file).slice(0, 120)
    return t.select(["user_id", "item_category", "device", "tags", "topic_ids", "price", "age_days"])


@contextmanager
def app(**settings: Any) -> Iterator[TestClient]:
    cfg = ServingSettings(bundle=mmoe_bundle(), device="cpu", warmup_rows=16, **settings)
    with TestClient(create_app(cfg, registry=CollectorRegistry())) as c:
        yield c


def same(a: dict[str, list], b: dict[str, list]) -> None:
    assert set(a) == set(b)
    for t in a:
        np.testing.assert_allclose(np.array(a[t], dtype=np.float64), np.array(b[t], dtype=np.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- same scores, every layout


def test_three_layouts_two_answers_same_scores_in_process(rows: pa.Table) -> None:
    """Rows, columns, an Arrow stream (plain, dictionary-encoded, split into batches, narrower
    int and float types, ids as decimal strings) all give the row-wise scores; the Arrow
    answer carries the same float32 values as the JSON one."""
    dict_encoded = rows.set_column(1, "item_category", rows.column("item_category").combine_chunks().dictionary_encode())
    dict_encoded = dict_encoded.set_column(2, "device", dict_encoded.column("device").combine_chunks().dictionary_encode())
    narrow = rows.set_column(6, "age_days", rows.column("age_days").cast(pa.float32()).cast(pa.float64()))
    ids_as_text = rows.set_column(0, "user_id", rows.column("user_id").cast(pa.string()))
    with app() as c:
        want = c.post("/predict", json={"items": rows.to_pylist()}).json()["scores"]
        same(c.post("/predict", json=columns_body(rows)).json()["scores"], want)
        for table in (rows, dict_encoded, ids_as_text, narrow):
            r = c.post("/predict", content=arrow_body(table), headers=ARROW)
            assert r.status_code == 200, r.text
            same(r.json()["scores"], want if table is not narrow else c.post("/predict", json={"items": narrow.to_pylist()}).json()["scores"])
        # three record batches, dictionaries differing between them
        parts = [dict_encoded.slice(0, 50), dict_encoded.slice(50, 1), dict_encoded.slice(51)]
        parts = [p.set_column(1, "item_category", p.column("item_category").combine_chunks().dictionary_decode().dictionary_encode()) for p in parts]
        r = c.post("/predict?tasks=cvr,ctr", content=arrow_body(*parts), headers={**ARROW, "accept": ARROW_STREAM})
        assert r.status_code == 200 and r.headers["content-type"] == ARROW_STREAM
        got, version = arrow_scores(r.content)
        assert list(got) == ["cvr", "ctr"] and version == r.headers["x-model-version"]
        same(got, {t: want[t] for t in ("cvr", "ctr")})
        # the Arrow answer holds exactly the float32 scores the JSON answer writes
        j = c.post("/predict", json={"items": rows.to_pylist()}).json()["scores"]
        a, _ = arrow_scores(c.post("/predict", json={"items": rows.to_pylist()}, headers={"accept": ARROW_STREAM}).content)
        assert all(np.array_equal(np.float32(j[t]), np.float32(a[t])) for t in TASKS)


def test_columns_with_context_broadcast_like_rows(rows: pa.Table) -> None:
    """Context values fill a column the body lacks and the nulls of one it has."""
    items = rows.drop_columns(["user_id"]).to_pylist()
    ctx = {"user_id": str(rows.column("user_id")[0].as_py()), "device": "web"}
    with app() as c:
        want = c.post("/predict", json={"context": ctx, "items": items}).json()["scores"]
        got = c.post("/predict", json=columns_body(rows.drop_columns(["user_id"]), ctx)).json()["scores"]
    same(got, want)


def test_real_server_same_scores_for_every_layout(tmp_path: Path, rows: pa.Table) -> None:
    with ranker_serve(mmoe_bundle(), tmp_path / "serve.log", "--concurrency", "2", env={"RANKER_WARMUP_ROWS": "16"}) as url:
        want = httpx.post(f"{url}/predict", json={"items": rows.to_pylist()}).json()["scores"]
        same(httpx.post(f"{url}/predict", json=columns_body(rows)).json()["scores"], want)
        r = httpx.post(f"{url}/predict", content=arrow_body(rows), headers={**ARROW, "accept": ARROW_STREAM})
        assert r.status_code == 200 and r.headers["content-type"] == ARROW_STREAM
        same(arrow_scores(r.content)[0], want)
        bad = httpx.post(f"{url}/predict", content=arrow_body(rows.set_column(5, "price", pa.array(["x"] * rows.num_rows))), headers=ARROW)
        assert bad.status_code == 422 and bad.json()["field"] == "columns.price"


# ---------------------------------------------------------------- refusals name the column


def _tbl(**cols: pa.Array) -> pa.Table:
    return pa.table(cols)


BAD_COLUMNS = [
    # (id, json body, reason, field)
    ("lengths_differ", {"columns": {"price": [1.0, 2.0], "device": ["ios"]}}, "bad_columns", "columns.price"),  # named after the bundle's first column
    ("wrong_type", {"columns": {"price": [1.0, "cheap"]}}, "bad_type", "columns.price[1]"),
    ("not_a_list", {"columns": {"price": 1.0}}, "bad_type", "columns.price"),
    ("nan", '{"columns": {"price": [1, NaN]}}', "non_finite", "columns.price[1]"),
    ("hex_id", {"columns": {"user_id": ["0x10"]}}, "bad_type", "columns.user_id[0]"),
    ("list_element", {"columns": {"tags": [["a", 7]]}}, "bad_type", "columns.tags[0][1]"),
    ("empty_columns", {"columns": {}}, "empty_items", "columns"),
    ("empty_column", {"columns": {"price": []}}, "empty_items", "columns"),
    ("too_many", {"columns": {"price": [1.0] * 6}}, "too_many_items", "columns"),
    ("both_layouts", {"items": [{}], "columns": {"price": [1.0]}}, "bad_type", "body"),
    ("columns_null", {"columns": None}, "bad_type", "columns"),
    # a bag is padded to its longest list: one long list would cost every candidate its length
    ("list_too_long", {"columns": {"tags": [["a"], ["a"] * 5]}}, "too_many_values", "columns.tags[1]"),
    ("list_too_long_rows", {"items": [{}, {"tags": ["a"] * 5}]}, "too_many_values", "items[1].tags"),
    # a context list is named as such, not as the first candidate it was broadcast to
    ("context_list_too_long", {"context": {"tags": ["a"] * 5}, "columns": {"price": [1.0]}}, "too_many_values", "context.tags"),
    ("context_list_too_long_rows", {"context": {"tags": ["a"] * 5}, "items": [{}]}, "too_many_values", "context.tags"),
]

BAD_ARROW = [
    ("not_arrow", b"PAR1 certainly not an Arrow stream", "bad_arrow", "body"),
    ("string_for_dense", _tbl(price=pa.array(["a"])), "bad_type", "columns.price"),
    ("nan", _tbl(price=pa.array([1.0, None, float("nan")])), "non_finite", "columns.price[2]"),
    ("inf", _tbl(age_days=pa.array([float("inf")])), "non_finite", "columns.age_days[0]"),
    ("float_id", _tbl(user_id=pa.array([1.5])), "bad_type", "columns.user_id"),
    ("int_for_string", _tbl(device=pa.array([3])), "bad_type", "columns.device"),
    ("uint64_overflow", _tbl(user_id=pa.array([1, 2**63], pa.uint64())), "bad_type", "columns.user_id[1]"),
    ("text_id", _tbl(user_id=pa.array(["12", "x"])), "bad_type", "columns.user_id[1]"),
    ("list_values", _tbl(topic_ids=pa.array([["1"], None, [], ["2", "a"]])), "bad_type", "columns.topic_ids[3][1]"),
    ("scalar_for_list", _tbl(tags=pa.array(["a"])), "bad_type", "columns.tags"),
    ("no_rows", _tbl(price=pa.array([], pa.float64())), "empty_items", "body"),
    ("too_many", _tbl(price=pa.array([1.0] * 6)), "too_many_items", "body"),
    ("list_too_long", _tbl(tags=pa.array([["a"], None, ["b"] * 5])), "too_many_values", "columns.tags[2]"),
    ("ints_for_string_list", _tbl(tags=pa.array([[1], [2, 3]])), "bad_type", "columns.tags"),
]


@pytest.mark.parametrize(("body", "reason", "field"), [b[1:] for b in BAD_COLUMNS + BAD_ARROW], ids=[b[0] for b in BAD_COLUMNS + BAD_ARROW])
def test_bad_columns_are_422_naming_the_column(body: Any, reason: str, field: str) -> None:
    with app(max_items=5, max_list_values=4) as c:
        if isinstance(body, pa.Table):
            r = c.post("/predict", content=arrow_body(body), headers=ARROW)
        elif isinstance(body, bytes):
            r = c.post("/predict", content=body, headers=ARROW)
        elif isinstance(body, str):
            r = c.post("/predict", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/predict", json=body)
        assert r.status_code == 422, r.text
        err = r.json()
        assert (err["reason"], err["field"]) == (reason, field), err
        assert err["detail"].startswith(f"{field}: ")
        metrics = c.get("/metrics").text
        assert f'ranker_invalid_requests_total{{reason="{reason}"}} 1.0' in metrics
        assert 'ranker_requests_total{status="5xx"} 0.0' in metrics


def test_arrow_null_columns_and_unknown_columns_are_missing_features(rows: pa.Table) -> None:
    with app() as c:
        want = c.post("/predict", json={"items": [{"price": 3.0}, {"price": None}]}).json()["scores"]
        body = arrow_body(_tbl(price=pa.array([3.0, None]), device=pa.nulls(2), tags=pa.nulls(2), user_id=pa.nulls(2), extra=pa.array(["a", "b"])))
        same(c.post("/predict", content=body, headers=ARROW).json()["scores"], want)
        only_unknown = c.post("/predict", content=arrow_body(_tbl(extra=pa.array([1, 2]))), headers=ARROW)
        assert only_unknown.status_code == 200 and len(only_unknown.json()["scores"]["ctr"]) == 2


def _strings(offsets: list[int], data: bytes) -> pa.Array:
    """A string array built from raw buffers with only the cheap checks: invalid UTF-8 passes."""
    return pa.Array.from_buffers(pa.string(), len(offsets) - 1, [None, pa.py_buffer(np.array(offsets, np.int32).tobytes()), pa.py_buffer(data)])


def _patched(offsets: list[int]) -> bytes:
    """A stream of device = ["cat_12", "cat_345", "c"] whose offsets (0, 6, 13, 14) are then
    overwritten in the body: what no writer produces, and what a broken client may send."""
    body = arrow_body(pa.record_batch({"device": pa.array(["cat_12", "cat_345", "c"])}))
    old, new = np.array([0, 6, 13, 14], np.int32).tobytes(), np.array(offsets, np.int32).tobytes()
    assert body.count(old) == 1
    return body.replace(old, new)


@pytest.mark.parametrize("body", [
    pytest.param(_patched([0, 12, 2, 14]), id="offsets-backwards"),  # crashed the process
    pytest.param(_patched([0, 6, 13, 1000]), id="offsets-past-the-values"),
    pytest.param(pa.record_batch({"device": _strings([0, 2, 4], b"\xff\xfe\xc3\x28")}), id="not-utf8"),
    pytest.param(pa.record_batch({"tags": pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), _strings([0, 2, 4], b"\xff\xfe\xc3\x28"))}),
                 id="list-not-utf8"),
    pytest.param(pa.record_batch({"device": pa.DictionaryArray.from_arrays(pa.array([0, 7], pa.int32()), pa.array(["a", "b"]), safe=False)}),
                 id="dictionary-index-out-of-range"),
    pytest.param(pa.record_batch({"device": pa.DictionaryArray.from_arrays(pa.array([0, -3], pa.int32()), pa.array(["a", "b"]), safe=False)}),
                 id="dictionary-index-negative"),
])
def test_malformed_arrow_arrays_are_a_422_naming_the_column(body: bytes | pa.RecordBatch) -> None:
    """Arrays whose buffers are the right size but whose contents are not valid Arrow: the
    featurizer reads offsets and indices as they are, so each is refused before it runs."""
    name = "device" if isinstance(body, bytes) else body.schema.names[0]
    with app() as c:
        r = c.post("/predict", content=body if isinstance(body, bytes) else arrow_body(body), headers=ARROW)
        assert r.status_code == 422 and r.json()["reason"] == "bad_arrow", r.text
        assert r.json()["field"] == f"columns.{name}", r.text
        assert c.post("/predict", json={"items": [{}]}).status_code == 200  # the server lives on


def test_an_arrow_stream_of_no_columns_is_scored_as_rows_of_missing_features() -> None:
    with app() as c:
        want = c.post("/predict", json={"items": [{}, {}, {}]}).json()["scores"]
        r = c.post("/predict", content=arrow_body(pa.table({"x": [1, 2, 3]}).drop_columns(["x"])), headers=ARROW)
        assert r.status_code == 200, r.text
        same(r.json()["scores"], want)


def test_a_list_of_the_wrong_values_is_named_by_the_list_type() -> None:
    with app() as c:
        r = c.post("/predict", content=arrow_body(_tbl(tags=pa.array([[1], [2, 3]]))), headers=ARROW)
    assert r.json()["detail"] == "columns.tags: has type list<item: int64>; feature values here are strings", r.text


def test_compressed_arrow_bodies_decode_only_read_columns_within_a_bound() -> None:
    """A zstd stream is small on the wire and large decoded: a column the bundle does not read
    is never decompressed, and the read ones stop at 4x the body limit (413), batch by batch."""
    def zstd(*batches: pa.RecordBatch) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batches[0].schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            for b in batches:
                w.write_batch(b)
        return sink.getvalue().to_pybytes()

    big = "a" * (2 * 2**20)  # 2 MiB a value, a few hundred bytes compressed
    with app(max_body_bytes=2**18) as c:  # decoded columns bounded at 1 MiB
        unread = zstd(pa.record_batch({"price": pa.array([1.0, 2.0]), "unread": pa.array([big, big])}))
        assert len(unread) < 2**16
        r = c.post("/predict", content=unread, headers=ARROW)
        assert r.status_code == 200 and len(r.json()["scores"]["ctr"]) == 2, r.text
        read = zstd(*[pa.record_batch({"device": pa.array([big[: 2**17]] * 2)}) for _ in range(8)])  # 2 MiB over 8 batches
        r = c.post("/predict", content=read, headers=ARROW)
        assert r.status_code == 413 and r.json()["reason"] == "body_too_large", r.text
        assert r.json()["detail"] == "body: its columns decode to more than 1,048,576 bytes"


@pytest.mark.parametrize(("headers", "status", "field"), [
    ({"content-type": "text/csv"}, 415, "content-type"),
    ({"content-type": "text/plain"}, 415, "content-type"),  # was read as JSON
    ({"content-type": "application/json", "accept": "text/html"}, 406, "accept"),
    ({"content-type": "application/json", "accept": "application/json;q=0"}, 406, "accept"),
    ({"content-type": "application/json", "accept": "application/json;q=abc"}, 406, "accept"),
    ({"content-type": "application/json", "content-encoding": "gzip"}, 415, "content-encoding"),  # was "not valid JSON"
    ({"content-type": ARROW_STREAM, "content-encoding": "gzip"}, 415, "content-encoding"),
], ids=["csv", "text_plain", "accept_html", "accept_json_q0", "accept_bad_q", "gzip_json", "gzip_arrow"])
def test_media_types_not_served_are_refused(headers: dict[str, str], status: int, field: str) -> None:
    body = json.dumps({"items": [{}]}).encode()
    with app() as c:
        r = c.post("/predict", content=gzip.compress(body) if "content-encoding" in headers else body, headers=headers)
        assert r.status_code == status, r.text
        assert (r.json()["reason"], r.json()["field"]) == ("bad_media_type", field)
        assert r.json()["detail"].startswith(f"{field}: ")
        assert 'ranker_invalid_requests_total{reason="bad_media_type"} 1.0' in c.get("/metrics").text
        ok = c.post("/predict", content=body, headers={"content-type": "application/json", "content-encoding": "identity"})
        assert ok.status_code == 200, ok.text


def test_negotiation() -> None:
    assert not negotiate(None, None).arrow_request
    assert negotiate(ARROW_STREAM, None) == negotiate(ARROW_STREAM, "*/*")
    assert negotiate(None, f"{ARROW_STREAM}, application/json;q=0.5").arrow_response
    assert not negotiate(None, f"{ARROW_STREAM};q=0.4, application/json").arrow_response
    assert not negotiate(None, "*/*").arrow_response  # a wildcard gets the default, JSON
    assert negotiate("application/json; charset=utf-8", ARROW_STREAM).arrow_response
    assert not negotiate("application/problem+json", None).arrow_request
    # JSON refused, Arrow admitted by a wildcard: Arrow, never the type rated 0
    for accept in ("application/json;q=0, */*", "application/json;q=0, application/*", "*/*;q=0.5, application/json;q=0",
                   "application/json;Q=0, */*;q=0.1"):
        assert negotiate(None, accept).arrow_response, accept
    # the most specific range rates a type: application/* over */*
    assert not negotiate(None, "*/*;q=0.9, application/*;q=0.1, application/json;q=0.5").arrow_response
    assert not negotiate(None, f"{ARROW_STREAM};q=0, */*").arrow_response
    assert not negotiate(None, "application/json;q=0.001, */*;q=0").arrow_response
    for accept in ("application/json;q=0", f"{ARROW_STREAM};q=0, application/json;q=0", "text/*, image/png", "*/*;q=0"):
        with pytest.raises(ServingError, match="^accept: answers are") as e:
            negotiate(None, accept)
        assert e.value.status == 406
    for q in ("abc", "2", "-1", "1.5", "0.1234", "", "1e-1"):  # RFC 9110: 0 to 1, three decimals at most
        with pytest.raises(ServingError, match="^accept: malformed") as e:
            negotiate(None, f"application/json;q={q}")
        assert e.value.status == 406
    for content_type in ("application/x-protobuf", "text/plain", "*/*"):
        with pytest.raises(ServingError, match="^content-type") as e:
            negotiate(content_type, None)
        assert e.value.status == 415
    assert negotiate(None, None, "identity") == negotiate(None, None, "Identity")
    for encoding in ("gzip", "br", "identity, gzip"):
        with pytest.raises(ServingError, match="^content-encoding") as e:
            negotiate(None, None, encoding)
        assert e.value.status == 415


def test_dense_integers_past_2_53_round_like_floats_in_every_layout(rows: pa.Table) -> None:
    """A dense feature sent as int64 beyond float64's exact range is a number like any other:
    every layout scores it as the nearest float64 (the checked Arrow cast would refuse it)."""
    big = [2**53 + 1, 10**17 + 3, -(2**60) - 1] * (rows.num_rows // 3)
    as_int = rows.set_column(5, "price", pa.array(big, pa.int64()))
    as_float = rows.set_column(5, "price", pa.array([float(v) for v in big], pa.float64()))
    with app() as c:
        want = c.post("/predict", json={"items": as_float.to_pylist()}).json()["scores"]
        for r in (c.post("/predict", json={"items": as_int.to_pylist()}), c.post("/predict", json=columns_body(as_int)),
                  c.post("/predict", content=arrow_body(as_int), headers=ARROW)):
            assert r.status_code == 200, r.text
            same(r.json()["scores"], want)
