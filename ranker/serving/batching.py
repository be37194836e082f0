"""Merging concurrent requests into one forward (``--batch-window-ms``), and pinned host buffers.

On a GPU a forward of 1,000 candidates takes a fraction of a millisecond, most of it launch
overhead that does not grow with the batch; eight requests in one forward cost little more
than one. ``Batcher`` runs every forward of a model on one thread: requests parse and
featurize on their own worker threads, hand their tensors over and wait. The batching thread
takes the first waiting request, then gathers others for at most ``window`` seconds, and runs
them as one forward (rows concatenated, the union of their tasks), each request getting its
own rows of its own tasks back.

The added latency is bounded: a request waits at most ``window`` for company before its forward
starts, and not at all when no other request is on its way (every request in flight is already
waiting): so at concurrency 1 batching adds nothing but the hand-over. A merged forward holds at
most ``max_rows`` candidates.

``HostStaging`` copies a featurized batch into page-locked (pinned) host buffers that are kept
per thread and reused, so the copy to the GPU is a real asynchronous DMA rather than a staged
pageable copy, without allocating pinned memory per request. It also gives each request thread
its own CUDA stream: concurrent requests (``--concurrency`` > 1, no batch window) then queue
their copies and kernels on separate streams instead of interleaving on the default one, so
one request's copy can overlap another's compute and each request's stage events (recorded
on its own stream) time its own kernels, not a neighbour's queued between them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ranker.features import Batch, concat_batches

# the merged forward: (batch on the host, tasks) -> ({task: (n,) float32 scores}, its timings)
Forward = Callable[[Batch, list[str]], tuple[dict[str, np.ndarray], "ForwardTimes"]]


@dataclass(frozen=True)
class ForwardTimes:
    shared: float  # seconds in encoder + trunk
    heads: dict[str, float]  # seconds per task tower
    requests: int = 1  # requests merged into this forward
    rows: int = 0  # candidates in it


@dataclass(eq=False)
class _Job:
    batch: Batch
    tasks: list[str]
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    scores: dict[str, np.ndarray] | None = None
    times: ForwardTimes | None = None
    error: BaseException | None = None


class Batcher:
    """Runs ``forward`` for concurrent requests, merging those that arrive within ``window``.

    Args:
        forward: runs one (merged) batch for a list of tasks, on the calling (batching) thread.
        window: seconds the first waiting request waits for others; 0 merges only requests
            already waiting.
        max_rows: most candidates in one merged forward.
        pads: padding bucket of each multi-hot key (``features.bag_pads``), to merge bags.

    Example:
        >>> import torch
        >>> fwd = lambda b, tasks: ({t: b["dense"][:, 0].numpy() for t in tasks}, ForwardTimes(0.0, {}))
        >>> b = Batcher(fwd, window=0.001, max_rows=100, pads={})
        >>> scores, times = b.run({"dense": torch.ones(3, 1)}, ["ctr"])
        >>> scores["ctr"].tolist(), times.requests
        ([1.0, 1.0, 1.0], 1)
        >>> b.close()
    """

    def __init__(self, forward: Forward, window: float, max_rows: int, pads: dict[str, int]) -> None:
        self._forward, self.window, self.max_rows, self._pads = forward, window, max_rows, pads
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._in_flight = 0  # requests between enter() and the end of run(): they may still submit
        self._closed = False
        self._thread: threading.Thread | None = None

    # ----- the request side ----------------------------------------------------------------
    def enter(self) -> None:
        """A request started (it will call ``run`` or ``leave``): the batcher may wait for it."""
        with self._cond:
            self._in_flight += 1

    def leave(self) -> None:
        """A request that entered will not call ``run`` (it failed before its forward)."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def run(self, batch: Batch, tasks: Sequence[str]) -> tuple[dict[str, np.ndarray], ForwardTimes]:
        """Score one request's batch (merged with others) and return its own rows and tasks.
        Call after ``enter``; the request then counts as left."""
        job = _Job(batch, list(tasks), int(next(iter(batch.values())).shape[0]))
        with self._cond:
            if self._closed:  # a request pinned to a replaced model: run it alone
                self._in_flight = max(0, self._in_flight - 1)
                inline = True
            else:
                inline = False
                self._queue.append(job)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="ranker-batcher", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if inline:
            return self._forward(job.batch, job.tasks)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.scores is not None and job.times is not None
        return job.scores, job.times

    def close(self) -> None:
        """No new merges; the thread finishes what is queued and exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ----- the batching thread -------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """The next group: the oldest job and those that join within the window (None: closed)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    self._thread = None
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.window
            while True:
                rows = sum(j.rows for j in self._queue)
                # nobody else can come: every request in flight is already queued
                if rows >= self.max_rows or len(self._queue) >= self._in_flight or self._closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            group, rows = [], 0
            for job in self._queue:  # oldest first, up to max_rows (the first always goes)
                if group and rows + job.rows > self.max_rows:
                    break
                group.append(job)
                rows += job.rows
            del self._queue[: len(group)]
            self._in_flight -= len(group)
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            try:
                tasks = list(dict.fromkeys(t for j in group for t in j.tasks))  # union, first-asked order
                batch = group[0].batch if len(group) == 1 else concat_batches([j.batch for j in group], self._pads)
                scores, times = self._forward(batch, tasks)
                merged = ForwardTimes(times.shared, times.heads, requests=len(group), rows=sum(j.rows for j in group))
                start = 0
                for j in group:
                    j.scores = {t: scores[t][start : start + j.rows] for t in j.tasks}
                    j.times = merged
                    start += j.rows
            except BaseException as e:  # every waiting request learns of the failure
                for j in group:
                    j.error = e
            finally:
                for j in group:
                    j.done.set()


class HostStaging:
    """Per-thread reusable host buffers (pinned when ``pin``) for copies to ``device``, and a
    per-thread stream to run each request's copy and forward on.

    A thread's buffers are reused for its next batch; that is safe because a request waits for
    its scores (a synchronising copy back, on the thread's own stream, the one the copy in was
    queued on) before its thread stages another batch.

    Args:
        device: where batches go.
        pin: page-lock the buffers (needs CUDA); False keeps plain buffers (same code path).
        new_stream: makes a thread's stream (``torch.cuda.Stream`` on CUDA); None runs on the
            current stream.
        use_stream: makes a stream current for a block (``torch.cuda.stream``, a no-op for None).

    Example:
        >>> s = HostStaging(torch.device("cpu"), pin=False)
        >>> with s.stream():
        ...     s.to_device({"cat": torch.arange(6).reshape(3, 2)})["cat"].tolist()
        [[0, 1], [2, 3], [4, 5]]
    """

    def __init__(self, device: torch.device, pin: bool, new_stream: Callable[[], Any] | None = None,
                 use_stream: Callable[[Any], AbstractContextManager[Any]] = torch.cuda.stream) -> None:
        self.device, self.pin = device, pin
        self._new_stream, self._use_stream = new_stream, use_stream
        self._local = threading.local()

    def stream(self) -> AbstractContextManager[Any]:
        """This thread's stream, made current for the block (made on the thread's first use)."""
        if self._new_stream is None:
            return self._use_stream(None)
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = self._new_stream()
        return self._use_stream(s)

    def _buffer(self, key: str, t: torch.Tensor) -> torch.Tensor:
        bufs: dict[str, torch.Tensor] = self._local.__dict__.setdefault("bufs", {})
        buf = bufs.get(key)
        if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
            size = max(t.numel(), 2 * (buf.numel() if buf is not None else 0))  # grow geometrically
            buf = torch.empty(size, dtype=t.dtype, pin_memory=self.pin)
            bufs[key] = buf
        return buf[: t.numel()].view(t.shape)

    def to_device(self, batch: Batch) -> Batch:
        out = {}
        for key, t in batch.items():
            host = self._buffer(key, t)
            host.copy_(t)
            out[key] = host.to(self.device, non_blocking=True)
        return out
