"""Running the server: one process, or several worker processes on one port.

``serve(settings)`` is what ``ranker serve`` runs. With ``workers > 1`` uvicorn's supervisor
binds the port once and starts that many worker processes (spawned, not forked, so no torch
state is shared) that accept connections from the one socket; it restarts a worker that dies
and, on SIGHUP, restarts them one by one. Each worker builds the app from the same settings
(``worker_app``, the factory uvicorn imports), loads and warms its own model copy and runs its
own request threads, so parsing and featurizing, which hold a process's GIL, run on as many
cores as there are workers. Metrics are summed across workers (``multiproc``).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from fastapi import FastAPI

from ranker.errors import RankerError
from ranker.serving.multiproc import METRICS_DIR_ENV, clear_dir
from ranker.serving.settings import ADMIN_TOKEN_ENV, ServingSettings

SETTINGS_ENV = "RANKER_WORKER_SETTINGS"  # the parent's validated settings, as JSON, for its workers


def tune_process(settings: ServingSettings) -> None:
    """Process-wide settings for serving, before the app is built: torch intra-op threads and
    no ``*_created`` series (noise for every scrape)."""
    import prometheus_client
    import torch

    prometheus_client.disable_created_metrics()
    torch.set_num_threads(settings.intra_op_threads)


def freeze_heap() -> None:
    """Keep the garbage collector off the start-up heap; call once the app is built.

    A request allocates thousands of short-lived objects (freed by reference counting, no
    cycles), which at CPython's default thresholds set off two or three collections per
    request and now and then a full one over torch's and FastAPI's ~200k long-lived objects.
    Freezing what is loaded now out of the collector's reach and letting the young generation
    grow took p99 of 1,000-candidate requests at concurrency 8 (hey, 2 cores) from 108-144 to
    44-50 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory), from the parent's settings."""
    from ranker.serving.app import create_app

    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: worker_app is started by `ranker serve --workers N`")
    settings = ServingSettings.model_validate({**json.loads(raw), "admin_token": os.environ.get(ADMIN_TOKEN_ENV)})
    tune_process(settings)
    app = create_app(settings)
    freeze_heap()
    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """The port's listening socket, shared by the workers.

    Made with protocol ``IPPROTO_TCP`` rather than 0 (as uvicorn's own ``bind_socket`` does):
    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on accepted sockets whose protocol
    says TCP, and with it on, every answer's last segment waited for the client's delayed ACK:
    measured here, 52 ms instead of 5.5 ms per small request with two workers.
    """
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise RankerError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: ServingSettings, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until interrupted: in this process, or in ``settings.workers`` worker processes.

    Raises:
        RankerError: the bundle cannot be served (checked here, before the port is bound).
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from ranker.serving.app import create_app

    if settings.workers == 1:
        tune_process(settings)
        app = create_app(settings)  # a bundle that cannot be served fails here, before binding the port
        freeze_heap()
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, access_log=access_log)
        return

    from ranker.serving.predictor import load_model

    load_model(settings.bundle, settings, warm=False)  # refuse a bad bundle before any worker starts
    given = os.environ.get(METRICS_DIR_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="ranker-metrics-"))
    clear_dir(path)  # counters from an earlier run must not be summed into this one
    os.environ[METRICS_DIR_ENV] = str(path)  # before any worker imports prometheus_client
    os.environ[SETTINGS_ENV] = settings.model_dump_json(exclude={"admin_token"})
    try:
        config = uvicorn.Config("ranker.serving.workers:worker_app", factory=True, workers=settings.workers, host=settings.host,
                                port=settings.port, log_level=log_level, access_log=access_log)
        sock = listen_socket(settings.host, settings.port)
        logging.getLogger("ranker.serving").info("listening on http://%s:%d with %d worker processes", settings.host, sock.getsockname()[1], settings.workers)
        Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    finally:
        if given:
            clear_dir(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
