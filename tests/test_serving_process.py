"""`ranker serve` as a real process on a free loopback port, called over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ranker.cli import main
from tests.serving_fixtures import TASKS, mmoe_bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranker_serve_process_answers_over_http() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RANKER_ADMIN_TOKEN": "t0k", "RANKER_WARMUP_ROWS": "64"}
    cmd = [sys.executable, "-m", "ranker.cli", "serve", "--bundle", str(mmoe_bundle()), "--port", str(port), "--device", "auto"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, proc.stdout.read().decode() if proc.poll() is not None else "not ready"
        r = httpx.post(f"{url}/predict?tasks=ctr,cvr", json={"context": {"user_id": "1152921504606846979"}, "items": [{"price": 4.0}, {}]})
        assert r.status_code == 200
        assert set(r.json()["scores"]) == {"ctr", "cvr"} and len(r.json()["scores"]["ctr"]) == 2
        assert httpx.post(f"{url}/admin/reload", json={"bundle": "/nowhere"}).status_code == 401  # enabled by the env token
        metrics = httpx.get(f"{url}/metrics").text
        assert "ranker_ready 1.0" in metrics
        assert 'ranker_task_requests_total{task="cvr"} 1.0' in metrics
        assert all(f'ranker_task_drift_psi{{task="{t}"}}' in metrics for t in TASKS)
        assert "_created" not in metrics  # the CLI turns the per-series creation stamps off
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ranker_serve_refuses_a_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--bundle", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "bundle folder not found" in capsys.readouterr().err


def test_serving_never_imports_training() -> None:
    """The bundle is the only bridge: building the app and the CLI parser loads no training code."""
    code = (
        "import sys, ranker.cli, ranker.serving.app; ranker.cli.build_parser(); "
        "bad = sorted(m for m in sys.modules if m.startswith('ranker.training')); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
