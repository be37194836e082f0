"""The README's main job on small data: synth -> train -> serve, and the shipped example
request (examples/predict.json) scores against a bundle trained on synthetic logs."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ranker.cli import main
from ranker.serving import ServingSettings, create_app

ROOT = Path(__file__).resolve().parent.parent


def test_synth_train_serve_the_example_request(tmp_path: Path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path / "logs"), "--rows", "4000", "--quiet"]) == 0
    cfg = tmp_path / "logs" / "config.yaml"
    text = cfg.read_text().replace("epochs: 3", "epochs: 1").replace("expert_dims:\n  - 128\n  - 64", "expert_dims:\n  - 16")
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "bundle"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bundle:" in out and "ctr" in out and "watch" in out

    body = json.loads((ROOT / "examples" / "predict.json").read_text())
    app = create_app(ServingSettings(bundle=tmp_path / "bundle"), registry=CollectorRegistry())
    with TestClient(app) as client:
        r = client.post("/predict?tasks=ctr,cvr", json=body)
        assert r.status_code == 200, r.text
        scores = r.json()["scores"]
        assert set(scores) == {"ctr", "cvr"}
        assert all(len(v) == len(body["items"]) and all(0 < s < 1 for s in v) for v in scores.values())
        metrics = client.get("/metrics").text
        # every feature of the example exists in the synthetic config: nothing counted missing
        # beyond the one null price and the item without tags
        missing = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("ranker_feature_missing_total{")}
        assert missing["user_id"] == 0 and missing["item_id"] == 0 and missing["price"] >= 1
