"""The HTTP app: ``create_app(settings)`` and thin route handlers.

    POST /predict?tasks=ctr,cvr   score items; only the requested towers run
    GET  /metrics                 Prometheus exposition of the app's own registry (each GET answers HEAD too)
    GET  /healthz                 the process is alive
    GET  /readyz                  model loaded and warm (503 otherwise)
    GET  /model                   version, architecture, tasks, features, training metrics
    POST /admin/reload            swap in another bundle (bearer token; 404 when disabled)
    POST /feedback                labelled events of served scores -> per-task quality sums
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ranker import __version__
from ranker.bundle import Bundle
from ranker.serving.deps import (
    Body,
    Pinned,
    ServingState,
    State,
    Tasks,
    Wire,
    check_content_length,
    json_only,
    reload_request,
    require_feedback_token,
)
from ranker.serving.errors import REASONS, ServingError
from ranker.serving.feedback import FEEDBACK_PATH
from ranker.serving.openapi import bundle_openapi
from ranker.serving.predictor import load_model
from ranker.serving.schemas import (
    FEEDBACK_REQUEST_SCHEMA,
    ErrorResponse,
    FeedbackResponse,
    Health,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    ReloadRequest,
    ReloadResponse,
)
from ranker.serving.settings import ServingSettings

log = logging.getLogger("ranker.serving")
PREDICT_PATH = "/predict"
_ERRORS = {code: {"model": ErrorResponse} for code in (406, 413, 415, 422)}
_OVERLOADED = {503: {"model": ErrorResponse, "description": "overloaded: every worker busy and max_queue requests waiting; retry later"}}

router = APIRouter()


def _get(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.get`` that answers HEAD as well (RFC 9110: wherever GET is; load balancers'
    health checks use it): the same handler, its body dropped by the server. HEAD stays out of
    the OpenAPI document (one operation per path)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=["HEAD"], **{**kwargs, "include_in_schema": False})
        return router.get(path, **kwargs)(endpoint)

    return register


@router.post(
    PREDICT_PATH,
    response_model=PredictResponse,
    responses={**_ERRORS, **_OVERLOADED},  # type: ignore[dict-item]
    dependencies=[Depends(check_content_length)],
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}},
)
async def predict(state: State, loaded: Pinned, tasks: Tasks, wire: Wire, body: Body) -> Response:
    prediction = await state.predict(loaded, body, tasks, wire)
    headers = {"X-Model-Version": loaded.version}
    return Response(prediction.body, media_type=prediction.media_type, headers=headers, background=BackgroundTask(state.observe, loaded, prediction))


@_get("/metrics", include_in_schema=False)
def metrics(state: State) -> Response:
    return Response(state.exposition(), media_type=CONTENT_TYPE_LATEST)


@_get("/healthz", response_model=Health, response_model_exclude_none=True)
def healthz() -> Health:
    return Health(status="ok")


@_get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(state: State) -> Response:
    if not state.ready:
        return JSONResponse(Health(status="not ready").model_dump(), status_code=503)
    return JSONResponse(Health(status="ready", model_version=state.current.version).model_dump())


@_get("/model", response_model=ModelInfo)
def model(loaded: Pinned) -> ModelInfo:
    return loaded.info()


@router.post("/admin/reload", response_model=ReloadResponse,
             responses={401: {}, 404: {}, 409: {"model": ErrorResponse, "description": "several worker processes: roll them with SIGHUP"},
                        422: {"model": ErrorResponse}})
async def reload(state: State, req: Annotated[ReloadRequest, Depends(reload_request)]) -> ReloadResponse:
    old, new = await state.reload(req.bundle)
    log.info("reloaded %s: version %s -> %s", req.bundle, old.version, new.version)
    return ReloadResponse(previous_version=old.version, model_version=new.version, architecture=new.architecture, tasks=new.task_names)


@router.post(
    FEEDBACK_PATH,
    response_model=FeedbackResponse,
    response_model_exclude_none=True,
    responses={401: {}, **_ERRORS},  # type: ignore[dict-item]
    dependencies=[Depends(require_feedback_token), Depends(check_content_length), Depends(json_only)],
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": FEEDBACK_REQUEST_SCHEMA}}}},
)
async def feedback(state: State, body: Body) -> FeedbackResponse:
    """Count labelled events of the model versions this pod has loaded (nothing is kept per
    prediction; in a rolling update a new pod refuses the replaced version's late labels)."""
    return FeedbackResponse.model_validate(await anyio.to_thread.run_sync(state.feedback.record, body))


class RequestCounter(Protocol):
    """What the middleware reports one answered (or abandoned) request to."""

    def request_done(self, status: int, seconds: float) -> None: ...

    def request_abandoned(self) -> None: ...


class RequestMetricsMiddleware:
    """Counts the answers of each path in ``by_path`` (/predict, /feedback) by status class and
    times them up to the last body byte
    (background bookkeeping after that is not the caller's wait), including 413/422 answers
    and failures that never reach a handler (a raw ASGI middleware: no per-request task).

    A client that hangs up before any answer starts (mid-body, say) is counted as
    ``client_closed``, not as a 5xx: nothing failed on the server's side, and the exception
    the body reader raises for it ends here rather than in an error log.
    """

    def __init__(self, app: ASGIApp, by_path: dict[str, RequestCounter]) -> None:
        self.app, self.by_path = app, by_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.by_path.get(scope["path"]) if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        start, status, end = time.perf_counter(), 500, None  # an exception before the response counts as 5xx
        started = disconnected = False

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def send_status(message: Message) -> None:
            nonlocal status, end, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                end = time.perf_counter()

        try:
            await self.app(scope, watch_receive, send_status)
        except ClientDisconnect:
            if started:
                metrics.request_done(status, time.perf_counter() - start)
                raise
            metrics.request_abandoned()
            return
        except BaseException:
            if disconnected and not started:
                metrics.request_abandoned()
            else:
                metrics.request_done(status, time.perf_counter() - start)
            raise
        metrics.request_done(status, (end or time.perf_counter()) - start)


async def _serving_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    if request.url.path == FEEDBACK_PATH:
        request.app.state.serving.feedback.metrics.invalid.labels(exc.reason).inc()
    elif exc.reason in REASONS:
        request.app.state.serving.metrics.invalid.labels(exc.reason).inc()
    headers = {"Connection": "close"} if exc.close else None
    return JSONResponse(ErrorResponse(detail=str(exc), reason=exc.reason, field=exc.field).model_dump(), status_code=exc.status, headers=headers)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.serving
    loaded = state.current
    await anyio.to_thread.run_sync(loaded.warm_up, min(state.settings.warmup_rows, state.settings.max_items))
    state.set_ready(True)
    log.info("model %s (%s, tasks %s) on %s: warm and ready", loaded.version, loaded.architecture, ",".join(loaded.task_names), loaded.device)
    yield
    state.set_ready(False)


def create_app(settings: ServingSettings, *, registry: CollectorRegistry | None = None, bundle: Bundle | None = None) -> FastAPI:
    """Build the server: load and check the bundle now; warm it up at start-up (lifespan),
    after which /readyz answers 200. Process-wide torch settings (intra-op threads) are left
    to whoever owns the process (``ranker serve`` sets them from ``settings``).

    Args:
        settings: validated server settings; ``settings.bundle`` is loaded unless ``bundle`` is given.
        registry: where the metrics live; a fresh one by default (tests pass their own).
        bundle: an already loaded bundle to serve instead of reading ``settings.bundle``.

    Raises:
        RankerError: the bundle cannot be served (message names the file at fault).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> app = create_app(ServingSettings(bundle="/tmp/smoke/bundle", device="cpu"))  # doctest: +SKIP
        >>> with TestClient(app) as c:  # doctest: +SKIP
        ...     c.post("/predict?tasks=ctr", json={"items": [{"price": 3.5}]}).json()["scores"]["ctr"]
    """
    loaded = load_model(bundle if bundle is not None else settings.bundle, settings, warm=False)
    state = ServingState(settings, registry if registry is not None else CollectorRegistry(), loaded)
    app = FastAPI(title="ranker", version=__version__, lifespan=_lifespan)
    app.state.serving = state
    app.add_middleware(RequestMetricsMiddleware, by_path={PREDICT_PATH: state.metrics, FEEDBACK_PATH: state.feedback.metrics})
    app.add_exception_handler(ServingError, _serving_error)
    app.include_router(router)
    app.openapi = bundle_openapi(app, lambda: state.current, PREDICT_PATH)  # type: ignore[method-assign]
    return app
