"""The GPU path's code on the CPU: stage timing from events with one wait per forward, reused
host staging buffers, and ``--batch-window-ms`` merging concurrent requests into one forward
(same scores as alone, bounded wait, failures reach every merged request)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ranker.features import concat_batches
from ranker.serving.batching import Batcher, ForwardTimes, HostStaging
from ranker.serving.predictor import CpuEvent, StageTimer, load_model, score_batch
from ranker.serving.settings import ServingSettings
from tests.serving_fixtures import TASKS, mmoe_bundle, ranker_serve, serving_data


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    """Requests of different sizes and multi-hot widths, each asking its own rows."""
    t = pq.read_table(serving_data().val_file)
    cuts = [(0, 7), (7, 40), (47, 1), (48, 120), (168, 33)]
    return [json.dumps({"items": t.slice(a, n).to_pylist()}).encode() for a, n in cuts]


def _settings(**kw: object) -> ServingSettings:
    return ServingSettings(bundle=mmoe_bundle(), device="cpu", warmup_rows=16, **kw)  # type: ignore[arg-type]


class CountingEvent(CpuEvent):
    syncs = 0
    made = 0

    def __init__(self) -> None:
        super().__init__()
        CountingEvent.made += 1

    def synchronize(self) -> None:
        CountingEvent.syncs += 1


def test_stage_timer_waits_once_per_forward_and_never_synchronizes_the_device(monkeypatch: pytest.MonkeyPatch, bodies: list[bytes]) -> None:
    def no_device_sync() -> None:
        raise AssertionError("torch.cuda.synchronize called")

    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    loaded = load_model(mmoe_bundle(), _settings(), warm=False)
    timer = StageTimer(loaded.model, CountingEvent)  # a second timer on the same model, counting
    batch = loaded.bundle.featurizer.transform(loaded.parser.parse(bodies[1]))
    CountingEvent.syncs = CountingEvent.made = 0
    with torch.inference_mode(), timer.recording() as times:
        loaded.model.predict(batch, ["ctr", "watch"])
    assert CountingEvent.syncs == 0  # nothing waits inside the forward
    times.settle()
    assert CountingEvent.syncs == 1 and CountingEvent.made == 2 * 3  # start+end: trunk and two heads
    assert times.shared > 0 and set(times.heads) == {"ctr", "watch"} and all(s > 0 for s in times.heads.values())
    p = loaded.predict(bodies[1], ["cvr"])  # the server's path: same events (CpuEvent), settled
    assert p.shared_seconds > 0 and set(p.head_seconds) == {"cvr"}


def test_host_staging_reuses_its_buffers_per_thread() -> None:
    s = HostStaging(torch.device("cpu"), pin=False)  # pin=True needs CUDA; the code path is the same
    a = {"cat": torch.arange(12).reshape(6, 2), "dense": torch.rand(6, 3)}
    out = s.to_device(a)
    assert all(torch.equal(out[k], a[k]) for k in a)
    ptr = out["cat"].data_ptr()
    b = {"cat": torch.arange(4).reshape(2, 2) + 100, "dense": torch.rand(2, 3)}
    again = s.to_device(b)  # smaller: the same buffer
    assert again["cat"].data_ptr() == ptr and torch.equal(again["cat"], b["cat"])
    other: dict = {}
    t = threading.Thread(target=lambda: other.update(s.to_device(a)))
    t.start()
    t.join()
    assert other["cat"].data_ptr() != ptr  # another thread has its own buffers


def test_each_request_thread_runs_its_copy_and_forward_on_its_own_stream(bodies: list[bytes]) -> None:
    """The CUDA path's per-thread streams, on the CPU: a fake stream per thread; the copy in,
    every stage event and the copy back happen while that thread's stream is current."""
    loaded = load_model(mmoe_bundle(), _settings(), warm=False)
    current = threading.local()
    made: list[int] = []
    lock = threading.Lock()

    def new_stream() -> int:
        with lock:
            made.append(len(made))
            return made[-1]

    @contextlib.contextmanager
    def use_stream(s: int | None) -> Iterator[None]:
        assert s is not None
        current.stream = s
        try:
            yield
        finally:
            current.stream = None

    class StreamEvent(CpuEvent):  # records which stream was current, like torch.cuda.Event.record
        seen: list[tuple[int, int | None]] = []

        def record(self) -> None:
            super().record()
            # the thread's own label, not threading.get_ident(): an ended thread's ident is reused
            StreamEvent.seen.append((getattr(current, "label", None), getattr(current, "stream", None)))

    staging = HostStaging(torch.device("cpu"), pin=False, new_stream=new_stream, use_stream=use_stream)
    timer = StageTimer(loaded.model, StreamEvent)
    batch = loaded.bundle.featurizer.transform(loaded.parser.parse(bodies[3]))
    want = score_batch(loaded.model, timer, None, batch, list(TASKS))[0]
    StreamEvent.seen.clear()
    got: dict[int, list] = {}

    def one(i: int) -> None:
        current.label = i
        got[i] = [score_batch(loaded.model, timer, staging, batch, list(TASKS))[0] for _ in range(2)]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 3  # one stream per thread, reused for its second request
    by_thread: dict[int, set] = {}
    for label, stream in StreamEvent.seen:
        by_thread.setdefault(label, set()).add(stream)
    assert set(by_thread) == {0, 1, 2} and all(len(v) == 1 and None not in v for v in by_thread.values())
    assert len(set().union(*by_thread.values())) == 3  # no two threads share a stream
    assert len(StreamEvent.seen) == 3 * 2 * 2 * (1 + len(TASKS))  # start+end of trunk and each head
    for runs in got.values():
        for scores in runs:
            for t in TASKS:
                np.testing.assert_allclose(scores[t], want[t], rtol=1e-6, atol=1e-7)


def test_concurrent_requests_merge_into_one_forward_with_their_own_scores(bodies: list[bytes]) -> None:
    alone = load_model(mmoe_bundle(), _settings(), warm=False)
    want = [alone.predict(b, tasks) for b, tasks in zip(bodies, [list(TASKS), ["ctr"], ["watch", "cvr"], ["cvr"], list(TASKS)], strict=True)]
    merged = load_model(mmoe_bundle(), _settings(batch_window_ms=100.0), warm=False)  # the cap; waits end once all have arrived
    assert merged.batcher is not None
    forwards: list[int] = []  # rows of each forward run
    real = merged.batcher._forward

    def counting(batch: dict, tasks: list[str]) -> tuple:
        forwards.append(int(batch["cat"].shape[0]))
        return real(batch, tasks)

    merged.batcher._forward = counting
    got: list = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        go.wait()
        got[i] = merged.predict(bodies[i], want[i].tasks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(g is not None for g in got)
    assert len(forwards) < len(bodies) and sum(forwards) == sum(w.n_items for w in want)
    assert max(g.merged_requests for g in got) > 1
    for g, w in zip(got, want, strict=True):
        assert list(g.scores) == w.tasks and g.n_items == w.n_items
        for t in w.tasks:  # merged rows go through the same model: same scores up to float noise
            np.testing.assert_allclose(g.scores[t], w.scores[t], rtol=1e-5, atol=1e-6)
        assert g.body.startswith(b'{"model_version"')
    merged.close()


def test_batch_window_bounds_the_wait() -> None:
    calls: list[int] = []

    def fwd(batch: dict, tasks: list[str]) -> tuple:
        calls.append(batch["x"].shape[0])
        return {t: batch["x"][:, 0].numpy().copy() for t in tasks}, ForwardTimes(0.0, {})

    b = Batcher(fwd, window=60.0, max_rows=100, pads={})
    done = threading.Event()

    def alone() -> None:  # the only request in flight: no reason to wait for the window
        b.enter()
        b.run({"x": torch.ones(2, 1)}, ["a"])
        done.set()

    t = threading.Thread(target=alone)
    t.start()
    assert done.wait(20), "a lone request waited for the 60 s window"
    t.join()

    b.window = 0.05  # another request is in flight but never comes: the first goes after the window
    b.enter()
    res: list = []
    t = threading.Thread(target=lambda: (b.enter(), res.append(b.run({"x": torch.full((3, 1), 2.0)}, ["a"]))))
    t.start()
    t.join(20)
    assert res and res[0][1].requests == 1 and res[0][0]["a"].tolist() == [2.0, 2.0, 2.0]
    b.leave()  # the straggler gives up

    b.window, calls[:] = 60.0, []
    assert b._in_flight == 0
    out: list = [None, None]
    go = threading.Barrier(2)

    def pair(i: int) -> None:
        b.enter()
        go.wait()
        out[i] = b.run({"x": torch.full((i + 1, 1), float(i))}, ["a"])

    ts = [threading.Thread(target=pair, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert calls == [3] and [o[0]["a"].tolist() for o in out] == [[0.0], [1.0, 1.0]]  # both in flight: merged at once
    b.close()


def test_max_rows_splits_groups_and_failures_reach_every_request() -> None:
    def fwd(batch: dict, tasks: list[str]) -> tuple:
        if (batch["x"] < 0).any():
            raise RuntimeError("boom")
        return {t: batch["x"][:, 0].numpy().copy() for t in tasks}, ForwardTimes(0.0, {})

    b = Batcher(fwd, window=5.0, max_rows=4, pads={})
    out: list = [None] * 3
    go = threading.Barrier(3)

    def one(i: int, value: float) -> None:
        b.enter()
        go.wait()
        try:
            out[i] = b.run({"x": torch.full((3, 1), value)}, ["a"])
        except RuntimeError as e:
            out[i] = e

    ts = [threading.Thread(target=one, args=(i, float(i))) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert all(o[1].requests == 1 for o in out)  # 3 + 3 rows > max_rows: never merged
    go = threading.Barrier(2)
    b.max_rows = 100
    ts = [threading.Thread(target=one, args=(i, v)) for i, v in ((0, -1.0), (1, 1.0))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert isinstance(out[0], RuntimeError) and isinstance(out[1], RuntimeError)
    b.close()


def test_merged_bags_are_padded_to_a_common_width() -> None:
    pads = {"bag:t": 9}
    a, c = {"bag:t": torch.tensor([[1, 2, 3]])}, {"bag:t": torch.tensor([[4]])}
    assert concat_batches([a, c], pads)["bag:t"].tolist() == [[1, 2, 3], [4, 9, 9]]


def test_real_server_with_batch_window_scores_like_without(tmp_path: Path, bodies: list[bytes]) -> None:
    env = {"RANKER_WARMUP_ROWS": "16"}
    with ranker_serve(mmoe_bundle(), tmp_path / "a.log", "--concurrency", "4", env=env) as url:
        want = [httpx.post(f"{url}/predict", content=b, headers={"content-type": "application/json"}).json()["scores"] for b in bodies]
    with ranker_serve(mmoe_bundle(), tmp_path / "b.log", "--concurrency", "4", "--batch-window-ms", "20", env=env) as url:
        got: list = [None] * len(bodies)

        def one(i: int) -> None:
            got[i] = httpx.post(f"{url}/predict", content=bodies[i], headers={"content-type": "application/json"}, timeout=60).json()["scores"]

        ts = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(TASKS)
        for t in TASKS:
            np.testing.assert_allclose(g[t], w[t], rtol=1e-5, atol=1e-6)
