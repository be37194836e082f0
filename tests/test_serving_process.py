"""`ranker serve` as a real process on a free loopback port, called over HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ranker.cli import main
from tests.serving_fixtures import TASKS, mmoe_bundle, ranker_serve


def test_ranker_serve_process_answers_over_http(tmp_path: Path) -> None:
    env = {"RANKER_ADMIN_TOKEN": "t0k", "RANKER_WARMUP_ROWS": "64"}
    with ranker_serve(mmoe_bundle(), tmp_path / "serve.log", "--device", "auto", env=env) as url:
        r = httpx.post(f"{url}/predict?tasks=ctr,cvr", json={"context": {"user_id": "1152921504606846979"}, "items": [{"price": 4.0}, {}]})
        assert r.status_code == 200
        assert set(r.json()["scores"]) == {"ctr", "cvr"} and len(r.json()["scores"]["ctr"]) == 2
        assert httpx.post(f"{url}/admin/reload", json={"bundle": "/nowhere"}).status_code == 401  # enabled by the env token
        metrics = httpx.get(f"{url}/metrics").text
        assert "ranker_ready 1.0" in metrics
        assert 'ranker_task_requests_total{task="cvr"} 1.0' in metrics
        assert all(f'ranker_task_drift_psi{{task="{t}"}}' in metrics for t in TASKS)
        assert "_created" not in metrics  # the CLI turns the per-series creation stamps off


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
