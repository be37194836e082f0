"""`ranker serve --workers 2`: real worker processes on one port, metrics summed across them,
drift per task over the live workers' windows, a killed worker's counters kept and its live
gauges dropped, and no stale files after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ranker.bundle import load_bundle
from ranker.reference import assign_bins, psi
from tests.serving_fixtures import (
    TASKS,
    mmoe_bundle,
    ranker_serve,
    serving_data,
    shared_bottom_bundle,
)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def score_pids(d: Path) -> set[int]:
    return {int(f.stem.rsplit("-", 1)[1]) for f in d.glob("scores-*.bin")}


def live_gauge_pids(d: Path) -> set[int]:
    return {int(f.stem.rsplit("_", 1)[1]) for f in d.glob("gauge_livemin_*.db")}


def wait_for(cond, timeout: float = 90.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.3)


def wait_all_ready(url: str, mdir: Path, workers: int) -> None:
    """Every worker up and warm: the supervisor counts them warm (``ranker_ready`` reads 0
    until it does) and each has written its live gauges."""
    wait_for(lambda: len(live_gauge_pids(mdir)) == workers and value(scrape(url), "ranker_ready") == 1)


def test_workers_sum_metrics_and_drift_and_survive_a_killed_worker(tmp_path: Path) -> None:
    mdir = tmp_path / "metrics"
    # a window of 31 scores: PSI is a number (not NaN) once the live workers hold all 31
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mdir), "RANKER_WARMUP_ROWS": "16", "RANKER_ADMIN_TOKEN": "t", "RANKER_DRIFT_WINDOW": "31"}
    rows = pq.read_table(serving_data().val_file).slice(0, 60).to_pylist()
    b = load_bundle(mmoe_bundle())
    ref = b.reference["ctr"]
    first, second = rows[:30], rows[30:]
    with ranker_serve(mmoe_bundle(), tmp_path / "serve.log", "--workers", "2", "--concurrency", "1", env=env) as url:
        assert httpx.post(f"{url}/admin/reload", json={"bundle": str(mmoe_bundle())}, headers={"Authorization": "Bearer t"}).status_code == 409
        wait_all_ready(url, mdir, 2)  # /readyz answered from one worker; now both
        assert value(scrape(url), "ranker_requests_total", status="2xx") == 0
        # batch 1 on one keep-alive connection: one worker serves it all
        with httpx.Client(base_url=url, timeout=30) as c:
            s1 = [c.post("/predict?tasks=ctr", json={"items": [r]}).json()["scores"]["ctr"][0] for r in first]
        (served,) = score_pids(mdir)
        workers = live_gauge_pids(mdir)
        assert len(workers) == 2 and served in workers
        # a request is counted just after its last byte is sent: let the 30th land before the kill
        wait_for(lambda: value(scrape(url), "ranker_requests_total", status="2xx") == 30)
        os.kill(served, signal.SIGKILL)  # the supervisor starts a new worker
        wait_for(lambda: live_gauge_pids(mdir) - workers)
        with httpx.Client(base_url=url, timeout=30) as c:  # a new connection: a live worker
            s2 = [c.post("/predict?tasks=ctr", json={"items": [r]}).json()["scores"]["ctr"][0] for r in second]
            s3 = c.post("/predict", json={"items": [{}]}).json()["scores"]["ctr"][0]  # all tasks
            assert c.post("/predict", json={"items": [{"price": "x"}]}).status_code == 422
        wait_for(lambda: value(scrape(url), "ranker_ready") == 1)  # the new worker warm too
        scrapes = [scrape(url) for _ in range(6)]  # whichever worker answers: the same totals
        log = (tmp_path / "serve.log").read_text()
    assert f"[{served}] died" in log
    for m in scrapes:
        assert value(m, "ranker_requests_total", status="2xx") == 61  # the dead worker's 30 kept
        assert value(m, "ranker_requests_total", status="4xx") == 1
        assert value(m, "ranker_request_duration_seconds_count") == 61  # the 2xx: the 422 is not timed
        assert value(m, "ranker_task_requests_total", task="ctr") == 61
        assert value(m, "ranker_task_items_total", task="cvr") == 1
        assert value(m, "ranker_invalid_requests_total", reason="bad_type") == 1
        assert value(m, "ranker_task_score_count", task="ctr") == 61
        np.testing.assert_allclose(value(m, "ranker_task_score_sum", task="ctr"), sum(s1) + sum(s2) + s3, rtol=1e-5)
        assert value(m, "ranker_ready") == 1
        assert value(m, "ranker_model_info", version=b.version, architecture="mmoe") == 1
        assert all(("ranker_task_drift_psi", (("task", t),)) in m for t in TASKS)
    # PSI over the live workers' windows: batch 2 and the all-tasks request, not the dead worker's batch 1
    window = np.array([*s2, s3])
    edges, shares = np.asarray(ref["edges"]), np.asarray(ref["shares"])
    want_psi = psi(np.bincount(assign_bins(window, edges), minlength=len(shares)), shares)
    for m in scrapes:
        np.testing.assert_allclose(value(m, "ranker_task_drift_psi", task="ctr"), want_psi, rtol=1e-9)
    with_dead = np.concatenate([np.array(s1), window])
    assert abs(psi(np.bincount(assign_bins(with_dead, edges), minlength=len(shares)), shares) - want_psi) > 1e-6  # the test can tell
    assert not list(mdir.glob(f"gauge_live*_{served}.db"))  # the dead worker's live gauges dropped at scrape

    # a restart on the same directory starts from zero: no stale files summed in
    env = {**env, "RANKER_FEEDBACK_TOKEN": "fb-secret"}
    with ranker_serve(mmoe_bundle(), tmp_path / "again.log", "--workers", "2", env=env) as url:
        m = scrape(url)
        assert value(m, "ranker_requests_total", status="2xx") == 0
        assert value(m, "ranker_task_score_count", task="ctr") == 0
        assert not score_pids(mdir) and served not in {int(f.stem.rsplit("_", 1)[1]) for f in mdir.glob("*.db")}
        # each worker has its own SO_REUSEPORT socket: 32 connections opened at once reach both
        # (all on one would happen with probability 2**-31 for a fair spread)
        wait_all_ready(url, mdir, 2)

        async def burst() -> None:
            clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(32)]
            try:
                codes = await asyncio.gather(*(c.post("/predict?tasks=ctr", json={"items": [{}]}) for c in clients))
                assert all(r.status_code == 200 for r in codes)
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        asyncio.run(burst())
        assert len(score_pids(mdir)) == 2
        assert value(scrape(url), "ranker_requests_total", status="2xx") == 32
        # every worker takes the feedback token itself (settings travel to workers as JSON,
        # where a secret would be written as asterisks)
        event = {"events": [{"model_version": b.version, "task": "ctr", "score": 0.3, "label": 1}]}
        for token, code in (("fb-secret", 200), ("**********", 401)):
            for _ in range(8):  # new connections: both workers, in all likelihood
                assert httpx.post(f"{url}/feedback", json=event, headers={"Authorization": f"Bearer {token}"}).status_code == code
    assert not list(mdir.iterdir())  # a directory we were given is emptied of our files on exit


def test_workers_listening_socket_gets_nodelay_connections() -> None:
    """asyncio disables Nagle's algorithm only on sockets whose protocol says TCP; with a
    protocol-0 listening socket (uvicorn's own) every answer waited for a delayed ACK."""
    import asyncio
    import socket

    from ranker.serving.workers import listen_socket

    sock = listen_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    seen: list[int] = []

    async def main() -> None:
        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen.append(w.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            w.close()

        server = await asyncio.start_server(handle, sock=sock)
        _r, w = await asyncio.open_connection(*sock.getsockname()[:2])
        await asyncio.sleep(0.2)
        w.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


def test_sighup_rolls_the_workers_onto_the_bundle_the_path_names_now(tmp_path: Path) -> None:
    """With several workers a bundle is swapped by pointing the served path at it and sending
    SIGHUP: the supervisor replaces the workers one by one, each new one loads what the path
    names, requests keep being answered meanwhile, and the metrics name only the new model."""
    mdir = tmp_path / "metrics"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mdir), "RANKER_WARMUP_ROWS": "16"}
    old, new = load_bundle(mmoe_bundle()), load_bundle(shared_bottom_bundle())
    assert old.version != new.version
    current = tmp_path / "current"
    current.symlink_to(mmoe_bundle())
    versions: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    with ranker_serve(current, tmp_path / "serve.log", "--workers", "2", "--concurrency", "1", env=env) as url:
        wait_all_ready(url, mdir, 2)
        first = live_gauge_pids(mdir)
        (supervisor,) = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in first}  # their parent

        def load() -> None:  # a fresh connection per request: whichever worker is listening takes it
            while not stop.is_set():
                try:
                    r = httpx.post(f"{url}/predict?tasks=ctr", json={"items": [{}]}, headers={"Connection": "close"}, timeout=30)
                    versions.append(r.headers.get("X-Model-Version", "")) if r.status_code == 200 else failures.append(str(r.status_code))
                except httpx.HTTPError as e:
                    failures.append(repr(e))

        counted: list[float] = []  # ranker_task_score_count{ctr} at every scrape, whichever worker answers

        def watch() -> None:
            while not stop.is_set():
                try:
                    counted.append(value(scrape(url), "ranker_task_score_count", task="ctr"))
                except (httpx.HTTPError, KeyError):
                    pass
                time.sleep(0.05)

        client, watcher = threading.Thread(target=load), threading.Thread(target=watch)
        client.start()
        watcher.start()
        try:
            wait_for(lambda: len(versions) >= 5)
            current.unlink()
            current.symlink_to(shared_bottom_bundle())
            os.kill(supervisor, signal.SIGHUP)
            wait_for(lambda: (tmp_path / "serve.log").read_text().count("replaced by") == 2, timeout=180)
            n = len(versions)
            wait_for(lambda: len(versions) >= n + 10)
        finally:
            stop.set()
            client.join()
            watcher.join()
        m = scrape(url)
        live = live_gauge_pids(mdir)  # after a scrape: the replaced workers' live gauges dropped
        # labels of the replaced model's predictions still arrive after the roll: both versions count
        events = {"events": [{"model_version": v, "task": "ctr", "score": 0.3, "label": 1} for v in (old.version, new.version)]}
        for _ in range(4):  # new connections: both new workers, in all likelihood
            assert httpx.post(f"{url}/feedback", json=events).json() == {"accepted": 2, "rejected": {}}
        # a roll onto something that is not a bundle gives up as soon as the new worker dies
        # (not after the start-up timeout), keeping the workers that serve
        current.unlink()
        current.symlink_to(tmp_path)
        t0 = time.monotonic()
        os.kill(supervisor, signal.SIGHUP)
        wait_for(lambda: "restart aborted" in (tmp_path / "serve.log").read_text(), timeout=120)
        aborted_after = time.monotonic() - t0
        assert httpx.post(f"{url}/predict?tasks=ctr", json={"items": [{}]}).headers["X-Model-Version"] == new.version
        # a worker that dies while the path names no bundle: its replacements die at start-up,
        # and the supervisor backs off (1 s, 2 s, ...) instead of restarting every 0.5 s
        # the aborted roll's new worker is no longer expected (the log line comes just before)
        wait_for(lambda: value(scrape(url), "ranker_workers", state="expected") == 2, timeout=10)
        assert value(scrape(url), "ranker_workers", state="ready") == 2 and value(scrape(url), "ranker_ready") == 1
        os.kill(sorted(live_gauge_pids(mdir))[0], signal.SIGKILL)
        wait_for(lambda: "starting another in 2 s" in (tmp_path / "serve.log").read_text(), timeout=90)
        assert httpx.post(f"{url}/predict?tasks=ctr", json={"items": [{}]}).status_code == 200  # the other worker serves
        # the crash-looping slot has no gauge file, yet the scrape sees it through the supervisor
        down = scrape(url)
        assert value(down, "ranker_ready") == 0, down
        assert (value(down, "ranker_workers", state="expected"), value(down, "ranker_workers", state="ready")) == (2, 1)
        current.unlink()
        current.symlink_to(shared_bottom_bundle())  # fixed: the next replacement starts and stays
        # (a scrape first: it drops the killed worker's live gauge, which would count as a second worker)
        wait_for(lambda: bool(scrape(url)) and len(live_gauge_pids(mdir)) == 2 and len(live_gauge_pids(mdir) - live) == 1)
        wait_all_ready(url, mdir, 2)
        assert value(scrape(url), "ranker_workers", state="ready") == 2
        # feedback version tables: one per live worker; the replaced and the killed workers'
        # were pruned by the worker that started after they died
        assert {int(f.stem.split("-")[1]) for f in mdir.glob("versions-*.json")} == live_gauge_pids(mdir)
    log = (tmp_path / "serve.log").read_text()
    assert "did not start (exit code" in log and aborted_after < 100, (aborted_after, log[-2000:])
    assert "warm and ready" in log  # the workers' own ranker.serving lines reach the log
    assert versions[0] == old.version and set(versions[n:]) == {new.version}  # every worker replaced
    assert set(versions) == {old.version, new.version}
    assert len(live) == 2 and not live & first
    assert value(m, "ranker_model_info", version=new.version, architecture="shared_bottom") == 1
    assert ("ranker_model_info", (("architecture", "mmoe"), ("version", old.version))) not in m  # the old workers' live gauge gone
    assert value(m, "ranker_ready") == 1
    for task, figures in new.metrics["val"].items():  # the new bundle's validation figures, from live workers only
        if "ne" in figures:
            np.testing.assert_allclose(value(m, "ranker_task_validation_ne", task=task), figures["ne"], rtol=1e-9)
    assert value(m, "ranker_requests_total", status="2xx") == len(versions)  # counts kept across the roll
    # the score counters too, summed over both versions' workers: never going back during the roll
    assert len(counted) > 10 and all(b >= a for a, b in zip(counted, counted[1:])), counted
    assert value(m, "ranker_task_score_count", task="ctr") == len(versions)
    assert not failures, failures[:5]


def test_score_counters_sum_every_version_ever_served(tmp_path: Path) -> None:
    """More versions than the feedback tables keep (rolled onto one bundle after another): the
    score counters still sum every version's files, a dead worker's included, so they never go
    back; the drift window is the live workers' files of the current version only."""
    from types import SimpleNamespace

    from ranker.serving.drift import ScoreTracker
    from ranker.serving.feedback import KEEP_VERSIONS
    from ranker.serving.multiproc import SharedScores

    def served(version: str, n: int, tasks: tuple[str, ...]) -> SimpleNamespace:
        trackers = {"watch": ScoreTracker([1.0, 2.0], [0.2, 0.3, 0.5], window=100), "ctr": ScoreTracker([0.5], [0.5, 0.5], window=100)}
        trackers = {t: trackers[t] for t in tasks}
        trackers["ctr"].add(np.full(n, 0.25))
        return SimpleNamespace(version=version, trackers=trackers)

    shared = SharedScores(tmp_path)
    versions = [served(f"v{i}", i + 1, ("ctr", "watch") if i % 3 else ("watch", "ctr")) for i in range(KEEP_VERSIONS + 3)]
    for loaded in versions:
        shared.publish(loaded)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"scores-v1-{os.getpid()}.bin").rename(tmp_path / f"scores-v1-{dead.pid}.bin")  # a worker that died
    (tmp_path / f"scores-v9-{dead.pid}.bin").write_bytes(b"")  # being created: not yet its full size
    (tmp_path / f"scores-nolayout-{os.getpid()}.bin").write_bytes(np.ones(5).tobytes())  # no layout: left out
    current = versions[-1]
    assert not list(tmp_path.glob("versions-*.json"))  # no feedback table names any of them
    snap = shared.snapshots(current)
    assert snap["ctr"].counts.tolist() == [sum(range(1, len(versions) + 1)), 0]
    assert snap["ctr"].total == pytest.approx(0.25 * sum(range(1, len(versions) + 1)))
    assert snap["ctr"].window.tolist() == [len(versions), 0] and snap["watch"].counts.tolist() == [0, 0, 0]
    current.trackers["ctr"].add(np.full(4, 0.75))
    shared.publish(current)
    assert shared.snapshots(current)["ctr"].counts.tolist() == [sum(range(1, len(versions) + 1)), 4]


FORGOTTEN_VERSIONS = """
import sys
from pathlib import Path
import numpy as np
from prometheus_client import CollectorRegistry
from ranker.serving.feedback import KEEP_VERSIONS, FeedbackRecorder, TaskRef
from ranker.serving.metrics import FeedbackMetrics
from ranker.serving.multiproc import SharedScores, publish_versions

path = Path(sys.argv[1])
recorder = FeedbackRecorder(FeedbackMetrics(CollectorRegistry()), 1000)
for i in range(KEEP_VERSIONS + 2):  # a worker's table: the last KEEP_VERSIONS it was told of
    recorder.add_version(f"v{i}", {"ctr": TaskRef("binary", np.array([0.5]))})
publish_versions(path, recorder.table())
sys.stdout.write(SharedScores(path).exposition(iter([])).decode())
"""


def test_a_scrape_leaves_out_the_series_of_forgotten_versions(tmp_path: Path) -> None:
    """In multiprocess mode a counter's series cannot be removed: the scrape drops those of
    versions no live worker still accepts, so each roll does not add series for good."""
    from ranker.serving.feedback import KEEP_VERSIONS

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}  # read when prometheus_client is imported
    out = subprocess.run([sys.executable, "-c", FORGOTTEN_VERSIONS, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(out.stdout):
        for sample in fam.samples:
            if "model_version" in sample.labels:
                seen.setdefault(fam.name, set()).add(sample.labels["model_version"])
    kept = {f"v{i}" for i in range(2, KEEP_VERSIONS + 2)}
    assert {"ranker_feedback_labelled", "ranker_feedback_score_bin"} <= set(seen)
    assert all(v == kept for v in seen.values()), seen  # v0 and v1 are still in the worker's files, not in the scrape
    assert list(tmp_path.glob("counter_*.db"))


def test_a_scrape_reads_past_a_workers_file_still_being_created(tmp_path: Path) -> None:
    """A worker opens its .db file and then sizes it: a scrape in between read 0 bytes and
    answered 500 (seen once during a SIGHUP roll). That file holds no value, so it is skipped."""
    (tmp_path / "counter_99999.db").write_bytes(b"")  # opened, not yet sized
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FORGOTTEN_VERSIONS, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(f.name == "ranker_feedback_labelled" for f in text_string_to_metric_families(out.stdout))


def test_supervisor_counts_a_rolls_new_worker_as_expected(tmp_path: Path) -> None:
    """While a SIGHUP roll starts a worker, that worker is expected too: one that hangs in
    start-up makes ``ranker_ready`` 0 (alive and serving old workers notwithstanding), as does
    a slot whose worker died; and one process (no supervisor file) keeps its own gauge."""
    from types import SimpleNamespace

    from ranker.serving.multiproc import publish_workers, read_workers
    from ranker.serving.workers import Supervisor

    def worker(alive: bool, warm: bool) -> tuple[SimpleNamespace, threading.Event]:
        started = threading.Event()
        if warm:
            started.set()
        return SimpleNamespace(is_alive=lambda: alive), started

    sup = Supervisor("127.0.0.1", 0, 2, "info", False)
    try:
        sup._metrics_dir = tmp_path
        sup._procs = [worker(True, True), worker(True, True)]
        sup._publish()
        assert read_workers(tmp_path) == (2, 2)
        sup._rolling = worker(True, False)  # the roll's new worker, still loading
        sup._publish()
        assert read_workers(tmp_path) == (3, 2)
        sup._rolling = None
        sup._procs[1] = worker(False, True)  # died
        sup._publish()
        assert read_workers(tmp_path) == (2, 1)
    finally:
        sup._hold.close()
    ready = """
import sys
from pathlib import Path
from prometheus_client import CollectorRegistry, Gauge
from ranker.serving.multiproc import SharedScores
Gauge("ranker_ready", "r", registry=CollectorRegistry(), multiprocess_mode="livemin").set(1)
sys.stdout.write(SharedScores(Path(sys.argv[1])).exposition(iter([])).decode())
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for counts, want in (((2, 1), 0.0), ((3, 3), 1.0), (None, 1.0)):
        for f in tmp_path.iterdir():
            f.unlink()
        if counts is not None:
            publish_workers(tmp_path, *counts)
        out = subprocess.run([sys.executable, "-c", ready, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        m = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(out.stdout) for s in fam.samples}
        assert m[("ranker_ready", ())] == want, (counts, out.stdout)
        assert m.get(("ranker_workers", (("state", "ready"),))) == (counts[1] if counts else None)


def test_clear_dir_removes_only_metric_files(tmp_path: Path) -> None:
    from ranker.serving.multiproc import clear_dir

    ours = ["counter_12.db", "histogram_12.db", "gauge_livemostrecent_7.db", "gauge_all_3.db", "scores-abc123-12.bin", "versions-12.json",
            "layout-abc123.json", "workers.json"]
    theirs = ["app.db", "keep.txt", "counter.db", "notes_12.db"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    clear_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_sighup_reloads_a_one_process_server_onto_the_bundle_the_path_names(tmp_path: Path) -> None:
    """One process takes SIGHUP as several do: it serves what the bundle path names now, and
    a path that names no bundle is logged while the current model keeps serving."""
    old, new = load_bundle(mmoe_bundle()), load_bundle(shared_bottom_bundle())
    current = tmp_path / "current"
    current.symlink_to(mmoe_bundle())
    log = tmp_path / "serve.log"

    def served() -> str:
        return httpx.post(f"{url}/predict?tasks=ctr", json={"items": [{}]}).headers["X-Model-Version"]

    mdir = tmp_path / "metrics"  # a one-process server writes its live gauges there too: their file names its pid
    mdir.mkdir()
    (mdir / "counter_424242.db").write_bytes(b"an earlier run's counts")  # must not be summed in
    (mdir / "keep.txt").write_text("not ours")
    env = {"RANKER_WARMUP_ROWS": "16", "PROMETHEUS_MULTIPROC_DIR": str(mdir)}
    with ranker_serve(current, log, env=env) as url:
        (pid,) = live_gauge_pids(mdir)
        assert not (mdir / "counter_424242.db").exists() and (mdir / "keep.txt").exists()
        assert value(scrape(url), "ranker_requests_total", status="2xx") == 0
        # the port is taken: refused in one line, before the model loads (either mode)
        port = int(url.rsplit(":", 1)[1])
        for args in ([], ["--workers", "2"]):
            p = subprocess.run([sys.executable, "-m", "ranker.cli", "serve", "--bundle", str(mmoe_bundle()), "--host", "127.0.0.1",
                                "--port", str(port), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
            assert p.returncode == 2 and p.stderr.count("\n") == 1, (args, p.stderr)
            assert p.stderr.startswith(f"ranker: error: serve: cannot listen on 127.0.0.1:{port}"), p.stderr
        assert served() == old.version
        current.unlink()
        current.symlink_to(shared_bottom_bundle())
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: served() == new.version)
        # one process in multiprocess mode: the old version's info no longer reads 1 (the
        # metrics move just after the swap that answers requests, so wait for them)
        info = ("ranker_model_info", (("architecture", "shared_bottom"), ("version", new.version)))
        wait_for(lambda: scrape(url).get(info) == 1)
        m = scrape(url)
        assert m.get(("ranker_model_info", (("architecture", "mmoe"), ("version", old.version))), 0) == 0
        current.unlink()
        current.symlink_to(tmp_path)  # not a bundle
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP: bundle: refused, still serving" in log.read_text())
        assert served() == new.version
    text = log.read_text()
    assert f"SIGHUP: reloaded {current}: version {old.version} -> {new.version}" in text
    assert sorted(f.name for f in mdir.iterdir()) == ["keep.txt"]  # our files removed on exit, theirs kept
    p = subprocess.run([sys.executable, "-m", "ranker.cli", "serve", "--bundle", str(mmoe_bundle()), "--host", "no-such-host.invalid"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("ranker: error: serve: cannot listen on no-such-host.invalid:8000"), p.stderr
