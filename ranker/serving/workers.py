"""Running the server: one process, or several worker processes on one port.

``serve(settings)`` is what ``ranker serve`` runs. With ``workers > 1`` a small supervisor
starts that many worker processes (spawned, not forked, so no torch state is shared), each
listening on the port with its own ``SO_REUSEPORT`` socket; it starts another worker when one
dies and, on SIGHUP, replaces them one by one. Each worker builds the app from the same settings
(``worker_app``, the factory uvicorn imports), loads and warms its own model copy and runs its
own request threads, so parsing and featurizing, which hold a process's GIL, run on as many
cores as there are workers. Metrics are summed across workers (``multiproc``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ranker.errors import RankerError
from ranker.serving.multiproc import METRICS_DIR_ENV, clear_dir, publish_workers
from ranker.serving.settings import SECRET_ENV, ServingSettings

QUICK_DEATH_S = 30.0  # a worker dead sooner than this after its start failed to start: back off
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


def configure_logging() -> None:
    """ranker.serving's INFO lines (model loaded, reloads, workers) in uvicorn's style; a
    spawned worker inherits no logging set-up, so each process calls this itself."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory), from the parent's settings."""
    from ranker.serving.app import create_app

    configure_logging()

    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: worker_app is started by `ranker serve --workers N`")
    secrets = {name: os.environ.get(var) for name, var in SECRET_ENV.items()}  # not in the JSON (see serve)
    settings = ServingSettings.model_validate({**json.loads(raw), **secrets})
    tune_process(settings)
    app = create_app(settings)
    freeze_heap()
    return app


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket for the server's port.

    Made with protocol ``IPPROTO_TCP`` rather than 0 (as uvicorn's own ``bind_socket`` does):
    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on accepted sockets whose protocol
    says TCP, and with it on, every answer's last segment waited for the client's delayed ACK:
    measured here, 52 ms instead of 5.5 ms per small request with two workers.

    With ``reuse_port`` several processes bind the same port (``SO_REUSEPORT``), each with its
    own accept queue; the kernel spreads new connections over the listening ones by a hash of
    their addresses.
    """
    sock = None
    try:  # a host that does not resolve (socket.gaierror) is an OSError too
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = info[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except (OSError, OverflowError) as e:  # OverflowError: a port past 65535
        if sock is not None:
            sock.close()
        raise RankerError(f"serve: cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    return sock


def _worker_main(host: str, port: int, log_level: str, access_log: bool, started: Any) -> None:
    """One worker process: its own SO_REUSEPORT socket on the port, uvicorn on it."""
    import uvicorn

    sock = listen_socket(host, port, reuse_port=True)
    config = uvicorn.Config("ranker.serving.workers:worker_app", factory=True, host=host, port=port, log_level=log_level, access_log=access_log)
    server = uvicorn.Server(config)

    def report() -> None:  # uvicorn listens only once the lifespan (model warm-up) is done
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            started.set()

    threading.Thread(target=report, daemon=True).start()
    server.run(sockets=[sock])


class Supervisor:
    """Starts ``workers`` worker processes (spawned: no torch state is forked), starts another
    when one dies, restarts them one by one on SIGHUP, and stops them on SIGINT/SIGTERM.

    Each worker listens on its own ``SO_REUSEPORT`` socket, so the kernel balances connections
    over the workers; with one shared listening socket (uvicorn's supervisor) the worker that
    wins the accept race takes a whole burst: 8 keep-alive connections opened at once went
    5/3, 8/0 and 7/1 to two workers here, and a load of long-lived connections stays on one
    core. The parent holds a bound, non-listening socket on the port the whole time, which
    reserves it (and gives port 0 its number) without receiving connections.

    Given the metrics directory, it writes there how many workers it runs and how many are
    warm (``multiproc.publish_workers``) whenever that changes: a slot whose worker is dead,
    backing off or still loading has no metric files of its own, so only the supervisor can
    say it is missing.
    """

    def __init__(self, host: str, port: int, workers: int, log_level: str, access_log: bool) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._hold = listen_socket(host, port, reuse_port=True)
        self.port = self._hold.getsockname()[1]
        self._args = (host, self.port, log_level, access_log)
        self._n = workers
        self._procs: list[Any] = []
        self._born: list[float] = []  # when each slot's worker was started
        self._quick_deaths: list[int] = []  # each slot's deaths in a row within QUICK_DEATH_S of their start
        self._due: dict[int, float] = {}  # slot -> when its next worker starts (backing off after quick deaths)
        self._stop = threading.Event()
        self._roll = threading.Event()
        self._log = logging.getLogger("ranker.serving")
        self._metrics_dir: Path | None = None
        self._rolling: tuple[Any, Any] | None = None  # the new worker a SIGHUP roll is starting
        self._published: tuple[int, int] | None = None

    def _publish(self) -> None:
        """Write (expected, ready) if it changed: ready counts the workers alive and warm."""
        if self._metrics_dir is None:
            return
        procs = [*self._procs, *([self._rolling] if self._rolling else [])]
        counts = (self._n + (self._rolling is not None), sum(p.is_alive() and started.is_set() for p, started in procs))
        if counts != self._published:
            publish_workers(self._metrics_dir, *counts)
            self._published = counts

    def _start(self) -> tuple[Any, Any]:
        started = self._ctx.Event()
        proc = self._ctx.Process(target=_worker_main, args=(*self._args, started), name="ranker-worker", daemon=False)
        proc.start()
        return proc, started

    def _stop_one(self, proc: Any) -> None:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
        proc.join(20)
        if proc.is_alive():
            proc.kill()
            proc.join()

    def _restart_delay(self, slot: int, now: float) -> float:
        """Seconds to wait before replacing a dead worker: none after a worker that lived (an
        OOM kill, a crash), else doubling from 1 s to 30 s while its replacements keep dying
        within QUICK_DEATH_S of their start (a bundle that no longer loads must not become a
        loop of torch imports on every core)."""
        if now - self._born[slot] >= QUICK_DEATH_S:
            self._quick_deaths[slot] = 0
            return 0.0
        self._quick_deaths[slot] += 1
        return float(min(2 ** (self._quick_deaths[slot] - 1), 30))

    def _await_start(self, proc: Any, started: Any, timeout: float = 300) -> bool:
        """Wait for a new worker to be warm, in short steps: give up as soon as it dies or a
        stop is asked for (SIGTERM must not wait out a bundle that fails to load)."""
        deadline = time.monotonic() + timeout
        while not started.wait(0.2):
            self._publish()  # the other workers may die meanwhile
            if not proc.is_alive() or self._stop.is_set() or time.monotonic() > deadline:
                return False
        return proc.is_alive()

    def _rolling_restart(self) -> None:
        for i, (old, _) in enumerate(list(self._procs)):
            new, started = self._start()
            self._rolling = (new, started)
            ok = self._await_start(new, started)
            self._publish()
            if not ok:
                why = "a stop was asked for" if self._stop.is_set() else f"exit code {new.exitcode}" if not new.is_alive() else "timed out"
                self._log.error("new worker [%s] did not start (%s); keeping worker [%s], restart aborted", new.pid, why, old.pid)
                self._stop_one(new)
                self._rolling = None
                self._publish()
                return
            self._stop_one(old)
            self._procs[i], self._rolling = (new, started), None
            self._publish()
            self._born[i] = time.monotonic()
            self._due.pop(i, None)  # a slot waiting out a back-off has its worker now
            self._log.info("worker [%s] replaced by [%s]", old.pid, new.pid)

    def run(self, metrics_dir: Path | None = None) -> None:
        self._metrics_dir = metrics_dir
        handlers = {sig: signal.signal(sig, lambda *_: self._stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: self._roll.set())
        try:
            self._procs = [self._start() for _ in range(self._n)]
            self._born = [time.monotonic()] * self._n
            self._quick_deaths = [0] * self._n
            due = self._due
            self._log.info("listening on http://%s:%d with %d worker processes %s", self._args[0], self.port, self._n, [p.pid for p, _ in self._procs])
            self._publish()
            while not self._stop.wait(0.5):
                self._publish()
                if self._roll.is_set():
                    self._roll.clear()
                    self._rolling_restart()
                now = time.monotonic()
                for i, (proc, _) in enumerate(self._procs):
                    if self._stop.is_set():
                        break
                    if i in due:
                        if now >= due[i]:
                            del due[i]
                            self._procs[i], self._born[i] = self._start(), now
                        continue
                    if not proc.is_alive():
                        proc.join()
                        delay = self._restart_delay(i, now)
                        self._log.warning("worker [%s] died (exit code %s) after %.0f s; starting another%s", proc.pid, proc.exitcode,
                                          now - self._born[i], f" in {delay:.0f} s" if delay else "")
                        if delay:
                            due[i] = now + delay
                        else:
                            self._procs[i], self._born[i] = self._start(), now
        finally:
            for proc, _ in self._procs:
                if proc.is_alive():
                    proc.terminate()
            for proc, _ in self._procs:
                self._stop_one(proc)
            self._hold.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)


async def _serve_reloading(server: Any, sock: socket.socket, app: FastAPI) -> None:
    """One process's uvicorn, with SIGHUP reloading the bundle path (what it names now), as
    SIGHUP rolls the workers of a multi-process server: one way to swap bundles either way.
    A bundle that cannot be served is logged and the current model keeps serving."""
    from ranker.serving.errors import ServingError

    state = app.state.serving
    log = logging.getLogger("ranker.serving")

    async def reload() -> None:
        try:
            old, new = await state.reload(str(state.settings.bundle))
        except ServingError as e:
            log.error("SIGHUP: %s", e)
            return
        log.info("SIGHUP: reloaded %s: version %s -> %s", state.settings.bundle, old.version, new.version)

    pending: set[asyncio.Task[None]] = set()  # kept referenced until done

    def on_hup() -> None:
        task = asyncio.ensure_future(reload())
        pending.add(task)
        task.add_done_callback(pending.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
    await server.serve(sockets=[sock])


def serve(settings: ServingSettings, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until interrupted: in this process, or in ``settings.workers`` worker processes.

    Raises:
        RankerError: the bundle cannot be served (checked here, before the port is bound).
    """
    import uvicorn

    from ranker.serving.app import create_app

    given = os.environ.get(METRICS_DIR_ENV)
    # the port is bound before the metrics directory is cleared: a second server started on a
    # taken port by mistake must fail without wiping the running one's files
    if settings.workers == 1:
        sock = listen_socket(settings.host, settings.port)  # a port in use or a bad host: one line, before the model loads
        if given:  # one process still writes its metrics there (multiprocess mode): start from zero
            clear_dir(Path(given))
        try:
            tune_process(settings)
            app = create_app(settings)  # a bundle that cannot be served fails here, before the port listens
            freeze_heap()
            config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=access_log)
            asyncio.run(_serve_reloading(uvicorn.Server(config), sock, app))
        finally:
            if given:
                clear_dir(Path(given))
        return

    from ranker.serving.predictor import load_model

    load_model(settings.bundle, settings, warm=False)  # refuse a bad bundle before any worker starts
    supervisor = Supervisor(settings.host, settings.port, settings.workers, log_level, access_log)  # binds the port
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="ranker-metrics-"))
    clear_dir(path)  # counters from an earlier run must not be summed into this one
    os.environ[METRICS_DIR_ENV] = str(path)  # before any worker imports prometheus_client
    os.environ[SETTINGS_ENV] = settings.model_dump_json(exclude=set(SECRET_ENV))  # a dump would write them as "**********"
    try:
        supervisor.run(path)
    finally:
        if given:
            clear_dir(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
