"""The server's state and every FastAPI dependency, in one module.

Dependencies are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in
the thread pool, and four thread hops per request cost more than the work they do.

``ServingState.current`` is the one reference to the ``LoadedModel`` being served. A request
pins it once (``pinned_model``, cached per request by FastAPI) and uses that object to the end,
so a reload, which assigns a new object, never changes a request halfway.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Header, HTTPException, Query, Request
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from ranker.errors import RankerError
from ranker.serving.drift import AllTimeCounts
from ranker.serving.errors import RequestError, ServingError
from ranker.serving.feedback import FeedbackRecorder
from ranker.serving.formats import WireFormat, negotiate, negotiate_json
from ranker.serving.metrics import FeedbackMetrics, ScoreCollector, ServingMetrics
from ranker.serving.multiproc import (
    SharedScores,
    earlier_versions,
    multiprocess_dir,
    publish_versions,
)
from ranker.serving.parsing import field_name
from ranker.serving.predictor import LoadedModel, Prediction, load_model
from ranker.serving.schemas import ReloadRequest
from ranker.serving.settings import ServingSettings


class ServingState:
    """Settings, metrics and the model being served; one per app."""

    def __init__(self, settings: ServingSettings, registry: CollectorRegistry, loaded: LoadedModel) -> None:
        self.settings = settings
        self.registry = registry
        self.current = loaded
        self.metrics = ServingMetrics(registry, lambda: self.current)
        self.metrics.model_loaded(loaded, None)
        self.feedback = FeedbackRecorder(FeedbackMetrics(registry), settings.max_items)
        path = multiprocess_dir()  # set when this process is one of several workers
        if path is not None:  # versions earlier workers served (before a SIGHUP roll): their labels still arrive
            for version, tasks in earlier_versions(path):
                self.feedback.add_version(version, tasks)
        self.feedback.model_loaded(loaded)
        if path is not None:
            publish_versions(path, self.feedback.table())
        self.shared = SharedScores(path) if path is not None else None
        # each task's all-time score counts, handed on from model to model (count_on)
        self._all_time: dict[tuple[str, ...], AllTimeCounts] = {}
        self._count_on(loaded)
        self.ready = False
        # anyio primitives bind to the running event loop, so they are made on first use
        self._limiter: anyio.CapacityLimiter | None = None
        self._reload_lock: anyio.Lock | None = None

    def _count_on(self, loaded: LoadedModel) -> None:
        """Let ``loaded``'s score trackers count on from the all-time counts of the models served
        before it, so that a reload (even to the same version) never sends ``ranker_task_score_*``
        back. As a multi-worker scrape sums every version's files: one process carries a task's
        counts over whenever it has as many bins; with a metrics directory, whose score files
        are per version and summed, only within a version (reloaded to itself)."""
        for task, tracker in loaded.trackers.items():
            key = (task, str(tracker.bins)) if self.shared is None else (loaded.version, task, str(tracker.bins))
            if key in self._all_time:
                tracker.carry(self._all_time[key])
            else:
                self._all_time[key] = tracker.all_time

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready else 0)

    async def predict(self, loaded: LoadedModel, body: bytes, tasks: list[str], wire: WireFormat) -> Prediction:
        """Score in a worker thread (parsing and inference are CPU-bound), at most
        ``settings.concurrency`` requests at once; the rest wait without blocking the loop."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.concurrency)
        waiting = self._limiter.statistics().tasks_waiting
        if self._limiter.available_tokens == 0 and waiting >= self.settings.max_queue:
            self.metrics.shed.inc()
            raise ServingError(503, "overloaded", "request", f"{waiting} requests already wait for a worker; retry later")
        return await anyio.to_thread.run_sync(loaded.predict, body, tasks, wire, limiter=self._limiter)

    async def observe(self, loaded: LoadedModel, prediction: Prediction) -> None:
        """Count a served prediction (scores, drift windows, timings): run on the event loop
        once the response is sent, so the caller does not wait for the bookkeeping."""
        self.metrics.observe(loaded, prediction)
        if self.shared is not None:
            self.shared.publish(loaded)

    def exposition(self) -> bytes:
        """/metrics: this process's registry, or with several workers the whole server's."""
        if self.shared is None:
            return generate_latest(self.registry)
        return self.shared.exposition(iter([ScoreCollector(lambda: self.current, self.shared.snapshots)]))

    async def reload(self, bundle: str) -> tuple[LoadedModel, LoadedModel]:
        """Load, probe and warm ``bundle`` off the loop, then swap it in; returns (old, new).

        Raises:
            ServingError: 422 when the bundle cannot be served; the old model keeps serving.
        """
        if self.settings.workers > 1:
            raise ServingError(409, "bad_bundle", "bundle", f"a reload would reach one of {self.settings.workers} worker processes; "
                               "restart the server (SIGHUP restarts the workers one by one) to serve another bundle")
        if self._reload_lock is None:
            self._reload_lock = anyio.Lock()
        async with self._reload_lock:
            try:
                new = await anyio.to_thread.run_sync(load_model, Path(bundle), self.settings)
            except RankerError as e:
                raise ServingError(422, "bad_bundle", "bundle", f"refused, still serving {self.current.version}: {e}") from None
            self._count_on(new)  # before it scores anything
            old, self.current = self.current, new  # the swap: one reference assignment
            old.close()  # its batcher (if any) finishes the requests pinned to it, then stops
            self.metrics.model_loaded(new, old)
            self.feedback.model_loaded(new)
            return old, new


async def get_state(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_state)]


async def pinned_model(state: State) -> LoadedModel:
    """The model this request uses from start to end."""
    return state.current


Pinned = Annotated[LoadedModel, Depends(pinned_model)]


async def check_content_length(request: Request, state: State) -> None:
    """413 from the header alone, before any of the body is kept."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > state.settings.max_body_bytes:
        raise await _too_large(request.stream(), state)


async def _too_large(stream: AsyncIterator[bytes], state: ServingState) -> RequestError:
    """The 413, after reading and dropping what is left of the body within the drain bounds.

    A client that writes its whole body before it reads (Python's urllib and requests, most
    HTTP libraries) would otherwise find the connection closed under it, with unread bytes
    in the server's socket, and report a reset instead of the answer. A body past
    ``max_drain_bytes``, or one still arriving after ``drain_seconds``, is abandoned: the answer
    then asks to close the connection, and a slow or endless body holds no worker (this runs on
    the event loop) and no memory (chunks are dropped as they come).
    """
    s = state.settings
    drained, complete = 0, False
    with anyio.move_on_after(s.drain_seconds):
        async for chunk in stream:
            drained += len(chunk)
            if drained > s.max_drain_bytes:
                break
        else:
            complete = True
    return RequestError("body_too_large", "body", f"larger than {s.max_body_bytes} bytes", status=413, close=not complete)


async def body_bytes(request: Request, state: State) -> bytes:
    """The body, read in chunks and cut off past ``max_body_bytes`` (the header may lie or be
    absent with chunked transfer encoding)."""
    limit, size, chunks = state.settings.max_body_bytes, 0, []
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise await _too_large(stream, state)
        chunks.append(chunk)
    return b"".join(chunks)


async def requested_tasks(request: Request, loaded: Pinned,
                          tasks: Annotated[str | None, Query(description="comma-separated task names; default all")] = None) -> list[str]:
    # a repeated parameter (?tasks=ctr&tasks=cvr) means all of them: FastAPI would keep the last
    repeated = request.query_params.getlist("tasks")
    return loaded.resolve_tasks(",".join(repeated) if len(repeated) > 1 else tasks)


async def wire_format(content_type: Annotated[str | None, Header(include_in_schema=False)] = None,
                      accept: Annotated[str | None, Header(include_in_schema=False)] = None,
                      content_encoding: Annotated[str | None, Header(include_in_schema=False)] = None) -> WireFormat:
    """Body and answer formats from Content-Type, Accept and Content-Encoding (415/406 for ones
    not served)."""
    return negotiate(content_type, accept, content_encoding)


async def json_only(content_type: Annotated[str | None, Header(include_in_schema=False)] = None,
                    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
                    content_encoding: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """415/406 unless the body is (identity) JSON and ``Accept`` takes a JSON answer (/feedback)."""
    negotiate_json(content_type, accept, content_encoding)


Body = Annotated[bytes, Depends(body_bytes)]
Wire = Annotated[WireFormat, Depends(wire_format)]
Tasks = Annotated[list[str], Depends(requested_tasks)]


async def require_admin(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    """404 while no admin token is configured; 401 unless ``Authorization: Bearer <token>``."""
    token = state.settings.admin_token
    if token is None:
        raise HTTPException(404, "Not Found")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <RANKER_ADMIN_TOKEN>'", headers={"WWW-Authenticate": "Bearer"})


async def reload_request(request: Request, _admin: Annotated[None, Depends(require_admin)]) -> ReloadRequest:
    """The reload body, parsed only after the caller is authorised (so 404/401 come first)."""
    try:
        return ReloadRequest.model_validate_json(await request.body())
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ServingError(422, "bad_request", field_name(tuple(err["loc"])), err["msg"]) from None


async def require_feedback_token(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    """Open while no feedback token is configured; else 401 unless ``Authorization: Bearer <token>``,
    counted as reason ``unauthorized`` (a label pipeline with a stale token loses every label)."""
    token = state.settings.feedback_token
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        state.feedback.metrics.invalid.labels("unauthorized").inc()
        raise HTTPException(401, "POST /feedback needs 'Authorization: Bearer <RANKER_FEEDBACK_TOKEN>'", headers={"WWW-Authenticate": "Bearer"})
