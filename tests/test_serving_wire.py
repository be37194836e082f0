"""A real `ranker serve` process and plain stdlib clients at the edges of HTTP: clients that hang
up mid-body, bodies over the limit sent by clients that write everything before they read, and
a body that never ends."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving_fixtures import mmoe_bundle, ranker_serve

LIMIT = 20_000  # --max-body-bytes
PREDICT = "/predict?tasks=ctr"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("wire") / "serve.log"
    env = {"RANKER_WARMUP_ROWS": "16", "RANKER_DRAIN_SECONDS": "1"}
    with ranker_serve(mmoe_bundle(), log, "--max-body-bytes", str(LIMIT), "--concurrency", "1", env=env) as url:
        yield url


def _requests_by_status(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "ranker_requests":
            return {s.labels["status"]: s.value for s in fam.samples if s.name == "ranker_requests_total"}
    raise AssertionError("ranker_requests_total not exported")


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + PREDICT, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _head(length: int) -> bytes:
    return (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" f"Content-Length: {length}\r\n\r\n").encode()


def test_client_hang_ups_are_counted_apart_from_server_errors(server: str) -> None:
    before = _requests_by_status(server)
    assert "client_closed" in before  # exists at 0 from start-up, like every status class
    for _ in range(20):  # start a body well under the limit, then go away
        with socket.create_connection(_host_port(server), timeout=10) as s:
            s.sendall(_head(5_000) + b'{"items": [{"price": 1.0}')
    deadline = time.monotonic() + 30
    while (after := _requests_by_status(server))["client_closed"] - before["client_closed"] < 20:
        assert time.monotonic() < deadline, f"hang-ups not counted: {after}"
        time.sleep(0.1)
    assert after["client_closed"] - before["client_closed"] == 20
    assert after["5xx"] == before["5xx"]  # no server failure was counted
    status, _ = _post(server, b'{"items": [{"price": 1.0}]}')  # and the server still answers
    assert status == 200 and _requests_by_status(server)["2xx"] == after["2xx"] + 1


def test_oversized_body_reaches_a_client_that_writes_before_reading(server: str) -> None:
    # 8 MiB: far past what the socket buffers hold, so the client is still writing when the
    # server has its answer (a few MB can still fit in loopback buffers and pass unnoticed)
    body = b'{"items": [' + b" " * 8 * 2**20 + b"]}"
    status, detail = _post(server, body)  # urllib sends Content-Length, then the whole body, then reads
    assert status == 413 and detail["reason"] == "body_too_large" and detail["field"] == "body"


def test_oversized_chunked_body_gets_413(server: str) -> None:
    """No Content-Length: the limit is found while reading; the rest is drained all the same."""
    conn = http.client.HTTPConnection(*_host_port(server), timeout=30)
    chunk = b" " * 65_536
    conn.request("POST", PREDICT, body=iter([b'{"items": []'] + [chunk] * 128 + [b"}"]), headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["reason"] == "body_too_large"
    conn.close()


def test_an_endless_body_is_cut_off_without_holding_a_worker(server: str) -> None:
    with socket.create_connection(_host_port(server), timeout=30) as slow:
        slow.sendall(_head(10**9) + b" " * 50_000)  # declares 1 GB, sends 50 kB, then stalls
        # the one worker is free: a normal request is answered meanwhile
        status, _ = _post(server, b'{"items": [{"price": 2.0}]}')
        assert status == 200
        answer = b""
        while chunk := slow.recv(65_536):  # 413 after the drain time limit, then the server closes
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413") and b"connection: close" in head


def test_drain_settings_are_validated(tmp_path: Path) -> None:
    from ranker.errors import RankerError
    from ranker.serving.settings import ServingSettings

    with pytest.raises(RankerError, match="RANKER_DRAIN_SECONDS"):
        ServingSettings.from_env({"RANKER_DRAIN_SECONDS": "-1"}, bundle=tmp_path)
