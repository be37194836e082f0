"""POST /feedback and the quality formulas: the formulas against numpy and a brute-force pair
count, the endpoint's sums against the same figures computed offline from the same events,
every refusal counted by reason, and `ranker evaluate` agreeing with what the server counts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ranker.bundle import Bundle, load_bundle
from ranker.cli import main
from ranker.errors import RankerError
from ranker.quality import QualitySums, binned_auc, entropy, log_loss_terms, normalized_entropy
from ranker.reference import assign_bins
from ranker.serving import ServingSettings, create_app
from ranker.serving.errors import FEEDBACK_REASONS, FEEDBACK_REQUEST_REASONS, REASONS
from ranker.serving.feedback import KEEP_VERSIONS, FeedbackRecorder, TaskRef
from ranker.serving.metrics import FeedbackMetrics
from ranker.training.metrics import auc, binary_metrics
from tests.feedback_events import as_events, labelled_scores
from tests.serving_fixtures import TASKS, mmoe_bundle, serving_data, shared_bottom_bundle

TOKEN = "feedback-s3cret"


# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize("seed", range(4))
def test_binned_auc_is_the_exact_auc_of_the_bin_index(seed: int) -> None:
    """Ties inside a bin count half: the binned AUC equals the tie-aware exact AUC of the bin
    index, itself checked against a pair count in test_metrics."""
    rng = np.random.default_rng(seed)
    y = (rng.random(2000) < 0.3).astype(float)
    p = np.clip(rng.normal(0.3 + 0.2 * y, 0.15), 0, 1)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, 11)[1:-1]))
    bins = assign_bins(p, edges)
    pos = np.bincount(bins, weights=y, minlength=edges.size + 1)
    neg = np.bincount(bins, weights=1 - y, minlength=edges.size + 1)
    assert binned_auc(pos, neg) == pytest.approx(auc(y, bins), abs=1e-12)
    assert binned_auc(pos, neg) < auc(y, p)  # binning only merges, so it can only lose order here
    sums = QualitySums("binary", edges)
    sums.add(y, p)
    assert sums.figures()["auc_binned"] == pytest.approx(auc(y, bins), abs=1e-12)
    assert np.isnan(binned_auc(np.array([3.0, 1.0]), np.zeros(2)))


def test_normalized_entropy_against_numpy() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.1).astype(float)
    p = np.clip(rng.beta(1, 9, 5000) + 0.05 * y, 0, 1)
    r = y.mean()
    want = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))) / -(r * np.log(r) + (1 - r) * np.log(1 - r))
    assert normalized_entropy(float(log_loss_terms(y, p).mean()), float(r)) == pytest.approx(want, rel=1e-9)
    # predicting the base rate scores exactly 1; one class only has no NE
    assert normalized_entropy(float(log_loss_terms(y, np.full_like(y, r)).mean()), float(r)) == pytest.approx(1.0)
    assert np.isnan(normalized_entropy(0.1, 0.0)) and np.isnan(entropy(1.0))
    # the training metrics carry the same figure (the bundle's validation NE)
    assert binary_metrics(y, p)["ne"] == pytest.approx(want, rel=1e-9)


def test_sums_add_across_batches_and_replicas() -> None:
    """What makes Prometheus' sum over replicas right: the state of a split stream, added,
    gives the figures of the whole stream."""
    rng = np.random.default_rng(1)
    y, p = (rng.random(3000) < 0.4).astype(float), rng.random(3000)
    whole, a, b = (QualitySums("binary", [0.2, 0.5, 0.8]) for _ in range(3))
    whole.add(y, p)
    a.add(y[:1000], p[:1000])
    b.add(y[1000:], p[1000:])
    merged = QualitySums("binary", [0.2, 0.5, 0.8])
    for s in (a, b):
        merged.count += s.count
        merged.label_sum += s.label_sum
        merged.score_sum += s.score_sum
        merged.log_loss_sum += s.log_loss_sum
        merged.positives += s.positives
        merged.negatives += s.negatives
    assert merged.figures() == pytest.approx(whole.figures(), rel=1e-12)
    f = whole.figures()
    assert f["calibration"] == pytest.approx(p.sum() / y.sum())
    reg = QualitySums("regression")
    reg.add(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert reg.figures()["rmse"] == pytest.approx(np.sqrt(4 / 3)) and reg.figures()["calibration"] == pytest.approx(8 / 6)


# ---------------------------------------------------------------- the endpoint


class Served:
    def __init__(self, client: TestClient, registry: CollectorRegistry) -> None:
        self.client, self.registry = client, registry

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        assert v is not None, f"no series {name}{labels}"
        return v

    def post(self, events: list[dict[str, Any]] | bytes, **headers: str) -> Any:
        if isinstance(events, bytes):
            return self.client.post("/feedback", content=events, headers=headers)
        return self.client.post("/feedback", json={"events": events}, headers=headers)


@contextmanager
def serve(bundle: Path, **settings: Any) -> Iterator[Served]:
    registry = CollectorRegistry()
    cfg = ServingSettings(bundle=bundle, device="cpu", warmup_rows=16, **settings)
    with TestClient(create_app(cfg, registry=registry)) as client:
        yield Served(client, registry)


@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return mmoe_bundle()


@pytest.fixture(scope="module")
def offline(bundle_path: Path) -> Bundle:
    return load_bundle(bundle_path)


def sums_from_registry(s: Served, b: Bundle, task: str, version: str) -> QualitySums:
    """The server's counters of one task and version, read back into QualitySums."""
    ttype = next(t.type for t in b.config.tasks if t.name == task)
    edges = b.reference[task]["edges"] if ttype == "binary" else []
    q = QualitySums(ttype, edges)
    tv = {"task": task, "model_version": version}
    q.count = s.value("ranker_feedback_labelled_total", **tv)
    q.label_sum = s.value("ranker_feedback_label_total", **tv)
    q.score_sum = s.value("ranker_feedback_score_total", **tv)
    if ttype == "binary":
        q.log_loss_sum = s.value("ranker_feedback_logloss_nats_total", **tv)
        k = len(edges) + 1
        q.positives = np.array([s.value("ranker_feedback_score_bin_total", **tv, label="1", bin=str(i)) for i in range(k)])
        q.negatives = np.array([s.value("ranker_feedback_score_bin_total", **tv, label="0", bin=str(i)) for i in range(k)])
        below = [s.value("ranker_feedback_negatives_below_total", **tv, bin=str(i)) for i in range(k)]
        assert below == (np.cumsum(q.negatives) - q.negatives).tolist()
    else:
        q.squared_error_sum = s.value("ranker_feedback_squared_error_total", **tv)
    return q


def test_series_exist_at_zero_from_start_up(bundle_path: Path, offline: Bundle) -> None:
    with serve(bundle_path) as s:
        v = offline.version
        k = len(offline.reference["ctr"]["edges"]) + 1
        assert s.value("ranker_feedback_labelled_total", task="watch", model_version=v) == 0
        assert s.value("ranker_feedback_squared_error_total", task="watch", model_version=v) == 0
        assert s.registry.get_sample_value("ranker_feedback_logloss_nats_total", {"task": "watch", "model_version": v}) is None
        for y in ("0", "1"):
            assert s.value("ranker_feedback_score_bin_total", task="ctr", model_version=v, label=y, bin=str(k - 1)) == 0
        for t in TASKS:
            for outcome in ("accepted", *FEEDBACK_REASONS):
                assert s.value("ranker_feedback_events_total", task=t, outcome=outcome) == 0
        for reason in FEEDBACK_REQUEST_REASONS:
            assert s.value("ranker_feedback_invalid_requests_total", reason=reason) == 0


def test_feedback_sums_equal_offline_sums_and_ranker_evaluate(
    bundle_path: Path, offline: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every labelled validation row sent back as an event, in batches: the counters hold the
    offline sums (counts exactly), and the figures from them are what `ranker evaluate` says."""
    val = serving_data().val_file
    data = labelled_scores(offline, val)
    events = as_events(offline.version, data)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(events))  # tasks interleaved, batches of mixed tasks
    with serve(bundle_path) as s:
        for chunk in np.array_split(order, 7):
            r = s.post([events[i] for i in chunk])
            assert r.status_code == 200 and r.json() == {"accepted": len(chunk), "rejected": {}}
        got = {t: sums_from_registry(s, offline, t, offline.version) for t in TASKS}
        for t in TASKS:
            assert s.value("ranker_feedback_events_total", task=t, outcome="accepted") == data[t][0].size
    assert main(["evaluate", "--bundle", str(bundle_path), "--data", str(val), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["monitoring"]
    for t, (y, p) in data.items():
        ttype = next(x.type for x in offline.config.tasks if x.name == t)
        want = QualitySums(ttype, offline.reference[t]["edges"] if ttype == "binary" else [])
        want.add(y, p)
        assert got[t].count == want.count == y.size
        if ttype == "binary":
            assert got[t].label_sum == want.label_sum  # positives: a count
            assert got[t].positives.tolist() == want.positives.tolist()
            assert got[t].negatives.tolist() == want.negatives.tolist()
        assert got[t].figures() == pytest.approx(want.figures(), rel=1e-12), t
        assert reported[t] == pytest.approx(want.figures(), rel=1e-12), t
    # the binned AUC near the exact one; the NE beside the bundle's validation NE
    exact = offline.metrics["val"]
    # binning only loses the order inside a bin: it moves the AUC by at most half the share of
    # positive/negative pairs that share one (either way)
    pos, neg = got["ctr"].positives.astype(float), got["ctr"].negatives.astype(float)
    bound = 0.5 * float((pos * neg).sum() / (pos.sum() * neg.sum()))
    assert abs(reported["ctr"]["auc_binned"] - exact["ctr"]["auc"]) <= bound + 1e-12
    assert reported["ctr"]["ne"] == pytest.approx(exact["ctr"]["ne"], rel=1e-6)


def test_labels_that_would_swamp_the_counters_are_refused_and_values_named_exactly(bundle_path: Path, offline: Bundle) -> None:
    """One label of 1e12 (under the old 1e15 cap) put the squared-error counter at ~1e24, where
    later hours' errors vanish in float rounding: live RMSE read 0 for good. And 1.0000001 was
    reported as "1 is outside [0, 1]"."""
    v = offline.version
    with serve(bundle_path) as s:
        r = s.post([{"model_version": v, "task": "watch", "score": 3.0, "label": 1e12},
                    {"model_version": v, "task": "ctr", "score": 1.0000001, "label": 1}])
        assert r.json()["rejected"] == {"bad_label": 1, "score_out_of_range": 1}
        assert r.json()["detail"]["bad_label"] == "events[0].label: 1000000000000 is outside [0, 1e+09] for regression task watch"
        assert r.json()["detail"]["score_out_of_range"].startswith("events[1].score: 1.0000001 is outside [0, 1]")


def test_bad_events_are_counted_by_reason(bundle_path: Path, offline: Bundle) -> None:
    v = offline.version
    good = {"model_version": v, "task": "ctr", "score": 0.25, "label": 1}
    events = [
        good,
        {**good, "model_version": "0123456789abcdef"},  # unknown_model_version
        {**good, "task": "likes"},  # unknown_task (no such task anywhere: task="")
        {**good, "task": "cvr", "score": 1.5},  # score_out_of_range
        {**good, "score": -0.1},  # score_out_of_range
        {**good, "task": "cvr", "label": 2},  # bad_label
        {**good, "task": "watch", "score": 3.0, "label": 18.5},  # regression: any finite value >= 0
        {**good, "task": "watch", "score": -3.0, "label": 18.5},  # score_out_of_range (sums are counters)
        {**good, "extra": "ignored"},  # unknown keys are ignored
    ]
    with serve(bundle_path) as s:
        r = s.post(events)
        assert r.status_code == 200
        body = r.json()
        assert body["accepted"] == 3
        assert body["rejected"] == {"unknown_model_version": 1, "unknown_task": 1, "score_out_of_range": 3, "bad_label": 1}
        assert "regression task watch takes values >= 0" not in body["detail"]["score_out_of_range"]  # the first one is named
        assert body["detail"]["score_out_of_range"].startswith("events[3].score: 1.5 is outside [0, 1]")
        assert body["detail"]["unknown_task"].startswith("events[2].task: 'likes'")
        assert v in body["detail"]["unknown_model_version"]
        # non-finite numbers and malformed events arrive through the lenient parser
        raw = (
            b'{"events": [{"model_version": "%s", "task": "ctr", "score": NaN, "label": 1},'
            b' {"model_version": "%s", "task": "watch", "score": 1e999, "label": 3},'
            b' {"model_version": "%s", "task": "cvr", "score": "0.5", "label": 1}, 7, {"task": "ctr"},'
            b' {"model_version": "%s", "task": "ctr", "score": 0.5, "label": true},'
            b' {"model_version": "%s", "task": "ctr", "score": 0.75, "label": 0},'
            b' {"model_version": "%s", "task": "watch", "score": 1%s, "label": 3},'  # an integer past the float range
            b' {"model_version": "%s", "task": "watch", "score": 1e300, "label": 3}]}'  # finite, but its square is not
        ) % (v.encode(), v.encode(), v.encode(), v.encode(), v.encode(), v.encode(), b"0" * 400, v.encode())
        r = s.post(raw)
        assert r.status_code == 200
        assert r.json()["accepted"] == 1
        assert r.json()["rejected"] == {"non_finite": 3, "bad_event": 4, "score_out_of_range": 1}
        assert r.json()["detail"]["score_out_of_range"] == "events[8].score: 1e+300 is outside [0, 1e+09] for regression task watch"
        assert r.json()["detail"]["bad_event"].startswith("events[2]: needs model_version and task")
        counted = {
            (t, o): s.value("ranker_feedback_events_total", task=t, outcome=o)
            for t in ("", *TASKS)
            for o in ("accepted", *FEEDBACK_REASONS)
            if s.registry.get_sample_value("ranker_feedback_events_total", {"task": t, "outcome": o})
        }
        assert counted == {
            ("ctr", "accepted"): 3, ("watch", "accepted"): 1, ("ctr", "unknown_model_version"): 1,
            ("", "unknown_task"): 1, ("cvr", "score_out_of_range"): 1, ("ctr", "score_out_of_range"): 1,
            ("cvr", "bad_label"): 1, ("watch", "score_out_of_range"): 2, ("ctr", "non_finite"): 1, ("watch", "non_finite"): 2,
            ("cvr", "bad_event"): 1, ("", "bad_event"): 1, ("ctr", "bad_event"): 2,
        }  # fmt: skip
        # only the accepted events reached the sums
        tv = {"task": "ctr", "model_version": v}
        assert s.value("ranker_feedback_labelled_total", **tv) == 3
        assert s.value("ranker_feedback_score_total", **tv) == pytest.approx(0.25 + 0.25 + 0.75)
        assert s.value("ranker_feedback_label_total", **tv) == 2
        assert s.value("ranker_feedback_squared_error_total", task="watch", model_version=v) == pytest.approx(15.5**2)
        assert s.value("ranker_feedback_labelled_total", task="cvr", model_version=v) == 0


def test_whole_requests_refused_with_a_4xx(bundle_path: Path) -> None:
    with serve(bundle_path, max_items=5, max_body_bytes=4096, drain_seconds=0.5) as s:
        cases = [
            (b'{"events": [', 422, "bad_json"),
            (b'{"events": [], "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", 422, "bad_json"),  # too deep for msgspec and json
            (b'{"events": [{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}]}", 422, "bad_json"),
            (b'{"events": 3}', 422, "bad_type"),
            (b"[]", 422, "bad_type"),
            (json.dumps({"events": [{}] * 6}).encode(), 422, "too_many_items"),
            (b'{"events": [' + b",".join([b"{}"] * 2000) + b"]}", 413, "body_too_large"),
        ]
        seen: dict[str, int] = {}
        for body, status, reason in cases:
            r = s.post(body)
            assert r.status_code == status, (body[:40], r.text)
            assert r.json()["reason"] == reason
            if b"[" * 1000 in body:  # valid JSON: named so, not "not valid JSON (maximum recursion depth ...)"
                assert r.json()["detail"] == "body: nested too deeply"
            seen[reason] = seen.get(reason, 0) + 1
            assert s.value("ranker_feedback_invalid_requests_total", reason=reason) == seen[reason]
        # none of them counts as a refused /predict request
        assert all(s.value("ranker_invalid_requests_total", reason=reason) == 0 for reason in REASONS)
        assert s.post([]).json() == {"accepted": 0, "rejected": {}}


@pytest.mark.parametrize(("headers", "status", "field"), [
    ({"content-type": "text/html"}, 415, "content-type"),
    ({"content-type": "application/vnd.apache.arrow.stream"}, 415, "content-type"),
    ({"content-type": "application/json", "content-encoding": "gzip"}, 415, "content-encoding"),
    ({"content-type": "application/json", "accept": "text/html"}, 406, "accept"),
    ({"content-type": "application/json", "accept": "application/json;q=0, */*"}, 406, "accept"),
    ({"content-type": "application/json", "accept": "application/json;q=2"}, 406, "accept"),
], ids=["html", "arrow", "gzip", "accept_html", "accept_json_q0", "accept_bad_q"])
def test_media_types_not_served_are_refused(bundle_path: Path, offline: Bundle, headers: dict[str, str], status: int, field: str) -> None:
    """/feedback reads and answers JSON only, as its document says (it had accepted any type)."""
    body = json.dumps({"events": [{"model_version": offline.version, "task": "ctr", "score": 0.5, "label": 0}]}).encode()
    with serve(bundle_path) as s:
        r = s.post(body, **headers)
        assert r.status_code == status, r.text
        assert (r.json()["reason"], r.json()["field"]) == ("bad_media_type", field)
        assert r.json()["detail"].startswith(f"{field}: ")
        assert s.value("ranker_feedback_invalid_requests_total", reason="bad_media_type") == 1
        assert s.value("ranker_feedback_events_total", task="ctr", outcome="accepted") == 0  # nothing counted
        for ok in ({}, {"content-type": "application/json; charset=utf-8", "accept": "*/*"}, {"content-encoding": "identity"}):
            assert s.post(body, **ok).json() == {"accepted": 1, "rejected": {}}


def test_feedback_answers_are_counted_by_status_class(bundle_path: Path, offline: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """ranker_feedback_requests_total{status}: every /feedback answer, a server failure (labels
    lost) included; /predict's ranker_requests_total does not count them, nor they it."""
    registry = CollectorRegistry()
    app = create_app(ServingSettings(bundle=bundle_path, device="cpu", warmup_rows=16, feedback_token=TOKEN), registry=registry)
    with TestClient(app, raise_server_exceptions=False) as client:
        s = Served(client, registry)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert {st: s.value("ranker_feedback_requests_total", status=st) for st in ("2xx", "4xx", "5xx", "client_closed")} == \
            {"2xx": 0, "4xx": 0, "5xx": 0, "client_closed": 0}  # fmt: skip
        event = [{"model_version": offline.version, "task": "ctr", "score": 0.5, "label": 0}]
        assert s.post(event, **auth).status_code == 200
        assert s.post(event).status_code == 401
        assert s.post(b'{"events": [', **auth).status_code == 422
        assert client.post("/predict", json={"items": [{}]}).status_code == 200

        def broken(body: bytes) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(app.state.serving.feedback, "record", broken)
        assert s.post(event, **auth).status_code == 500
        assert s.value("ranker_feedback_requests_total", status="2xx") == 1
        assert s.value("ranker_feedback_requests_total", status="4xx") == 2
        assert s.value("ranker_feedback_requests_total", status="5xx") == 1
        assert s.value("ranker_requests_total", status="2xx") == 1  # the one /predict
        assert s.value("ranker_requests_total", status="5xx") == 0


def test_feedback_token(bundle_path: Path, offline: Bundle) -> None:
    event = [{"model_version": offline.version, "task": "ctr", "score": 0.5, "label": 0}]
    with serve(bundle_path, feedback_token=TOKEN) as s:
        assert s.value("ranker_feedback_invalid_requests_total", reason="unauthorized") == 0
        assert s.post(event).status_code == 401
        assert s.post(event, Authorization="Bearer nope").status_code == 401
        r = s.post(event, Authorization=f"Bearer {TOKEN}")
        assert r.status_code == 200 and r.json()["accepted"] == 1
        # a refused token shows where refused requests are counted, with its own reason
        assert s.value("ranker_feedback_invalid_requests_total", reason="unauthorized") == 2
        assert s.value("ranker_feedback_events_total", task="ctr", outcome="accepted") == 1
        assert s.client.post("/predict", json={"items": [{}]}).status_code == 200  # /predict stays open
    settings = ServingSettings.from_env({"RANKER_FEEDBACK_TOKEN": TOKEN}, bundle=bundle_path)
    assert settings.feedback_token is not None and settings.feedback_token.get_secret_value() == TOKEN
    with pytest.raises(RankerError, match="RANKER_FEEDBACK_TOKEN"):
        ServingSettings.from_env({}, bundle=bundle_path, feedback_token="x")


def test_validation_reference_gauges_and_reload(bundle_path: Path, offline: Bundle) -> None:
    """The served bundle's validation figures are exported; after a reload both versions'
    late labels are accepted, each binned on its own reference bins."""
    new = load_bundle(shared_bottom_bundle())
    with serve(bundle_path, admin_token=TOKEN) as s:
        val = offline.metrics["val"]
        assert s.value("ranker_task_validation_ne", task="ctr") == pytest.approx(val["ctr"]["ne"])
        assert s.value("ranker_task_validation_calibration", task="cvr") == pytest.approx(val["cvr"]["calibration"])
        assert s.value("ranker_task_validation_rmse", task="watch") == pytest.approx(val["watch"]["rmse"])
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert s.client.post("/admin/reload", json={"bundle": str(new.path)}, headers=auth).status_code == 200
        assert s.value("ranker_task_validation_ne", task="ctr") == pytest.approx(new.metrics["val"]["ctr"]["ne"])
        score = 0.5 * (offline.reference["ctr"]["edges"][0] + offline.reference["ctr"]["edges"][1])  # bin 1 of the old model
        events = [{"model_version": ver, "task": "ctr", "score": score, "label": 1} for ver in (offline.version, new.version)]
        assert s.post(events).json() == {"accepted": 2, "rejected": {}}
        assert s.value("ranker_feedback_score_bin_total", task="ctr", model_version=offline.version, label="1", bin="1") == 1
        new_bin = int(assign_bins(np.array([score]), new.reference["ctr"]["edges"])[0])
        assert s.value("ranker_feedback_score_bin_total", task="ctr", model_version=new.version, label="1", bin=str(new_bin)) == 1


def test_only_the_last_versions_are_kept() -> None:
    registry = CollectorRegistry()
    rec = FeedbackRecorder(FeedbackMetrics(registry), max_events=10)
    tasks = {"ctr": TaskRef("binary", np.array([0.5]))}
    for i in range(KEEP_VERSIONS + 1):
        rec.add_version(f"v{i}", tasks)
    assert rec.versions == [f"v{i}" for i in range(1, KEEP_VERSIONS + 1)]
    assert registry.get_sample_value("ranker_feedback_labelled_total", {"task": "ctr", "model_version": "v0"}) is None
    assert registry.get_sample_value("ranker_feedback_labelled_total", {"task": "ctr", "model_version": "v1"}) == 0
    body = b'{"events": [{"model_version": "v0", "task": "ctr", "score": 0.5, "label": 1}]}'
    assert rec.record(body)["rejected"] == {"unknown_model_version": 1}


def test_openapi_documents_feedback(bundle_path: Path) -> None:
    with serve(bundle_path) as s:
        op = s.client.get("/openapi.json").json()["paths"]["/feedback"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]["events"]["items"]["properties"]) == {"model_version", "task", "score", "label"}
    assert {"401", "406", "413", "415", "422"} <= set(op["responses"])  # 406 and 415 now happen (tested above)
    assert set(op["requestBody"]["content"]) == {"application/json"}
