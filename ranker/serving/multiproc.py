"""Metrics across the worker processes of one server (``ranker serve --workers N``).

Every worker answers /metrics for the whole server, whichever worker the scrape reaches:

- Ordinary ``Counter``/``Histogram``/``Gauge`` metrics, ours or any another module registers,
  use prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set before the
  workers start (so before they import prometheus_client), each process writes its values to
  its own memory-mapped files there, and a scrape sums them (``MultiProcessCollector``).
  Gauges say how to combine processes (``multiprocess_mode``: ``ranker_ready`` is the minimum
  over live workers, ``ranker_model_info`` the maximum).
- A worker that is dead, backing off or still loading has no files, so the supervisor writes
  how many workers it runs and how many of them are warm (``workers.json``, ``publish_workers``);
  a scrape exports them as ``ranker_workers{state="expected"|"ready"}`` and reads
  ``ranker_ready`` 0 while fewer are ready than expected.
- The per-task score histograms, bin counters and drift windows come from custom collectors,
  which that mode does not see. ``SharedScores`` publishes each worker's tracker state (all-time
  bin counts, score sum, sliding-window bin counts) to a small memory-mapped file of its own
  after every request; a scrape sums the all-time counts over every file (a worker that died
  keeps its share, so the counters never go back) and the windows over the live workers only,
  and computes PSI once on the summed window: the server's recent scores, as with one process
  (NaN while the summed window holds fewer than ``drift.MIN_PSI_SCORES``).
  Where each task sits in a version's score files is written once beside them
  (``layout-<version>.json``), so the files of every version ever served stay readable, however
  many versions the feedback tables (which keep only the last ``KEEP_VERSIONS``) have forgotten.

The known traps of multiprocess mode, and what is done about them:
- stale files from an earlier run would be summed in: the server starts on an empty
  directory (a fresh temporary one, or ours removed from the one given) and removes a
  temporary one on exit;
- a worker that dies leaves its live-gauge files behind: a scrape drops the files of
  processes no longer alive (``mark_process_dead``) and their drift windows;
- ``/admin/reload`` would swap the model in one worker only: with several workers it is
  refused (409); roll the server (SIGHUP restarts the workers one by one) instead;
- a counter's series cannot be removed there (``remove()`` does nothing), so the per-version
  feedback series of every version ever rolled in would stay: a scrape leaves out the series
  of versions no live worker still accepts labels for (the last ``KEEP_VERSIONS``), as one
  process removes them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ranker.serving.drift import TrackerSnapshot, window_psi
from ranker.serving.feedback import TaskRef
from ranker.serving.metrics import METRICS_DIR_ENV
from ranker.serving.predictor import LoadedModel

_SCORES = re.compile(r"scores-(?P<version>[0-9A-Za-z_.-]+)-(?P<pid>[0-9]+)\.bin")
_LIVE_GAUGE = re.compile(r"gauge_live[a-z]*_(?P<pid>[0-9]+)\.db")
_LAYOUT = re.compile(r"layout-(?P<version>[0-9A-Za-z_.-]+)\.json")
WORKERS_FILE = "workers.json"  # the supervisor's worker counts (publish_workers)


def multiprocess_dir() -> Path | None:
    """The shared metrics directory when this process is one of several workers."""
    path = os.environ.get(METRICS_DIR_ENV)
    return Path(path) if path else None


# prometheus_client's multiprocess files: <type>_<pid>.db, gauges with their mode in the type
_VERSIONS = re.compile(r"versions-(?P<pid>[0-9]+)\.json")
_CLIENT_DB = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_[0-9]+\.db")


def clear_dir(path: Path) -> None:
    """Remove the metric files of an earlier run: prometheus_client's ``<type>_<pid>.db`` and
    our score files, nothing else a shared directory may hold."""
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.name == WORKERS_FILE or any(p.fullmatch(f.name) for p in (_CLIENT_DB, _SCORES, _VERSIONS, _LAYOUT)):
            f.unlink(missing_ok=True)


def publish_workers(path: Path, expected: int, ready: int) -> None:
    """Write the supervisor's worker counts: ``expected``, the workers it runs (``--workers``,
    plus the new one while a SIGHUP roll starts it), and ``ready``, those of them alive and warm."""
    tmp = path / f".{WORKERS_FILE}.tmp"
    tmp.write_text(json.dumps({"expected": expected, "ready": ready}))
    os.replace(tmp, path / WORKERS_FILE)  # a reader sees the whole file or none


def read_workers(path: Path) -> tuple[int, int] | None:
    """(expected, ready) as the supervisor last wrote them; None without a supervisor (one
    process) or before its first write."""
    try:
        doc = json.loads((path / WORKERS_FILE).read_text())
        return int(doc["expected"]), int(doc["ready"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_versions(path: Path, versions: Mapping[str, Mapping[str, TaskRef]]) -> None:
    """Write this worker's feedback version table (version -> task -> type and reference
    edges) where the workers that replace it read it (``earlier_versions``), then remove the
    tables of dead workers: this one holds what they held (it read them first), so a server
    rolled N times keeps one table per live worker, not one per worker it ever ran."""
    doc = {v: {t: [ref.type, ref.edges.tolist()] for t, ref in tasks.items()} for v, tasks in versions.items()}
    tmp = path / f".versions-{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path / f"versions-{os.getpid()}.json")  # a reader sees the whole file or none
    for f, pid in _version_files(path):
        if pid != os.getpid() and not _alive(pid):
            f.unlink(missing_ok=True)


def _version_files(path: Path) -> list[tuple[Path, int]]:
    return [(f, int(m["pid"])) for f in path.iterdir() if (m := _VERSIONS.fullmatch(f.name))]


def earlier_versions(path: Path) -> list[tuple[str, dict[str, TaskRef]]]:
    """The model versions other workers of this server accepted feedback for, oldest file
    first: a SIGHUP roll onto a new bundle must not make the labels still arriving for the
    version it replaced ``unknown_model_version``, as ``/admin/reload`` does not with one
    process (the recorder keeps the last ``KEEP_VERSIONS`` of them). A table removed while
    this reads was pruned by a worker that published the merged table first, so a vanished
    file means: list again."""
    for _ in range(5):
        files = []
        for f, pid in _version_files(path):
            if pid == os.getpid():
                continue
            try:
                files.append((f.stat().st_mtime, json.loads(f.read_text())))
            except FileNotFoundError:
                break
            except (OSError, ValueError):  # unreadable: skip this table, keep the others
                continue
        else:
            break
    out = []
    for _, doc in sorted(files, key=lambda x: x[0]):
        out += [(v, {t: TaskRef(ty, np.asarray(e, dtype=np.float64)) for t, (ty, e) in tasks.items()}) for v, tasks in doc.items()]
    return out


def live_versions(path: Path) -> set[str]:
    """The model versions some live worker accepts feedback for (its published table)."""
    out: set[str] = set()
    for f, pid in _version_files(path):
        if _alive(pid):
            try:
                out.update(json.loads(f.read_text()))
            except (OSError, ValueError):  # pruned or unreadable: that table is not counted
                continue
    return out


class _KeptVersions:
    """The multiprocess files' metrics without the series of forgotten model versions (a
    ``model_version`` label no live worker's table holds), and with ``ranker_ready`` 0 while
    the supervisor's ``workers`` (expected, ready) counts say a worker is not warm."""

    def __init__(self, path: Path, workers: tuple[int, int] | None) -> None:
        self.path = path
        self.files = MultiProcessCollector(None, str(path))
        self.workers = workers

    def _families(self) -> list[object]:
        """The client's merge of the .db files, less files still being created: a worker opens
        its file, then sizes it, and a scrape in between read 0 bytes and failed (a 500 seen
        during a SIGHUP roll). Such a file holds no value yet, so nothing is lost."""
        for attempt in range(3):
            files = []
            for f in glob.glob(os.path.join(self.path, "*.db")):
                try:
                    if os.path.getsize(f) >= 8:  # the used-bytes header, written when it is sized
                        files.append(f)
                except OSError:
                    continue  # removed since the glob (a dead worker's live gauge)
            try:
                return list(self.files.merge(files, accumulate=True))
            except struct.error:  # a file caught between open and sizing after all: read again
                if attempt == 2:
                    raise
        return []

    def collect(self) -> Iterator[object]:
        kept = live_versions(self.path)
        short = self.workers is not None and self.workers[1] < self.workers[0]
        for family in self._families():
            if kept:  # empty only before any worker published its table: nothing to judge by
                family.samples = [s for s in family.samples if "model_version" not in s.labels or s.labels["model_version"] in kept]
            if short and family.name == "ranker_ready":
                family.samples = [s._replace(value=0.0) for s in family.samples]
            yield family


class _Workers:
    """``ranker_workers{state}``: the supervisor's counts of expected and ready workers."""

    def __init__(self, workers: tuple[int, int]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[object]:
        g = GaugeMetricFamily(
            "ranker_workers", "Worker processes of this server: expected (--workers, +1 during a SIGHUP roll's start of a new one) and ready (alive and warm).",
            labels=["state"],
        )  # fmt: skip
        for state, n in zip(("expected", "ready"), self.workers, strict=True):
            g.add_metric([state], float(n))
        yield g


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _layout(loaded: LoadedModel) -> dict[str, tuple[int, int]]:
    """Per task, (offset, bins) in a score file: [counts (K), window (K), score sum (1)]."""
    out, offset = {}, 0
    for task, tracker in loaded.trackers.items():
        out[task] = (offset, tracker.bins)
        offset += 2 * tracker.bins + 1
    return out


class SharedScores:
    """Each worker's score trackers published to, and summed from, the shared directory.

    Args:
        path: the directory every worker of the server shares.

    Example:
        >>> shared = SharedScores(Path(tmp))  # doctest: +SKIP
        >>> shared.publish(loaded); shared.snapshots(loaded)["ctr"].psi  # doctest: +SKIP
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._maps: dict[str, np.memmap] = {}

    def publish(self, loaded: LoadedModel) -> None:
        """Write this process's tracker state for ``loaded`` (after each request)."""
        layout = _layout(loaded)
        m = self._maps.get(loaded.version)
        if m is None:
            # the layout first: a reader never meets a score file it cannot place (every worker
            # of a version writes the same text; the replace makes each write whole or absent)
            tmp = self.path / f".layout-{loaded.version}-{os.getpid()}.tmp"
            tmp.write_text(json.dumps({t: list(v) for t, v in layout.items()}))
            os.replace(tmp, self.path / f"layout-{loaded.version}.json")
            size = sum(2 * k + 1 for _, k in layout.values())
            name = self.path / f"scores-{loaded.version}-{os.getpid()}.bin"
            m = self._maps[loaded.version] = np.memmap(name, dtype=np.float64, mode="w+", shape=(size,))
        for task, (off, k) in layout.items():
            counts, total, window = loaded.trackers[task].state()
            m[off : off + k] = counts
            m[off + k : off + 2 * k] = window
            m[off + 2 * k] = total

    def _layouts(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Every model version this server's workers have published scores for -> its score-file
        layout (task -> offset, bins), from the layout files ``publish`` writes."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for f in self.path.glob("layout-*.json"):
            m = _LAYOUT.fullmatch(f.name)
            if m is None:
                continue
            try:
                out[m["version"]] = {t: (int(off), int(k)) for t, (off, k) in json.loads(f.read_text()).items()}
            except (OSError, ValueError, TypeError):
                continue  # unreadable: that version's files are left out, as when being created
        return out

    def snapshots(self, loaded: LoadedModel) -> dict[str, TrackerSnapshot]:
        """Every worker's trackers summed: windows over the live workers serving ``loaded``'s
        version; all-time counts over every worker and every version this server has served
        (a task's counts where its bin count matches), so that during and after a SIGHUP roll
        every scrape, whichever worker answers it, gives the same counters and they never go
        back (summing one version's files only, a scrape answered by an old worker and the
        next by a new one had made the counters jump between the two versions' totals)."""
        layout = _layout(loaded)
        layouts = {**self._layouts(), loaded.version: layout}
        size = sum(2 * k + 1 for _, k in layout.values())
        counts = np.zeros(size)
        window = np.zeros(size)
        for f in self.path.glob("scores-*-*.bin"):
            m = _SCORES.fullmatch(f.name)
            theirs = layouts.get(m["version"]) if m is not None else None
            if theirs is None:
                continue
            v = np.fromfile(f, dtype=np.float64)
            if v.shape != (sum(2 * k + 1 for _, k in theirs.values()),):
                continue  # being created
            for task, (off, k) in layout.items():
                if task in theirs and theirs[task][1] == k:
                    at = theirs[task][0]
                    counts[off : off + k] += v[at : at + k]
                    counts[off + 2 * k] += v[at + 2 * k]
            if m["version"] == loaded.version and _alive(int(m["pid"])):
                window += v
        out = {}
        for task, (off, k) in layout.items():
            tracker = loaded.trackers[task]
            w = window[off + k : off + 2 * k].astype(np.int64)
            out[task] = TrackerSnapshot(counts[off : off + k].astype(np.int64), float(counts[off + 2 * k]), w, window_psi(w, tracker.shares, tracker.min_psi_scores))
        return out

    def forget_dead(self) -> None:
        """Drop the live-gauge files of workers that died (their counters stay summed)."""
        for f in self.path.glob("gauge_live*_*.db"):
            m = _LIVE_GAUGE.fullmatch(f.name)
            if m is not None and not _alive(int(m["pid"])):
                mark_process_dead(int(m["pid"]), str(self.path))

    def exposition(self, collectors: Iterator[object]) -> bytes:
        """The whole server's metrics: every process's files plus ``collectors`` (ours, reading
        shared state), in the Prometheus text format."""
        self.forget_dead()
        workers = read_workers(self.path)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_KeptVersions(self.path, workers))  # type: ignore[arg-type]
        if workers is not None:
            registry.register(_Workers(workers))  # type: ignore[arg-type]
        for c in collectors:
            registry.register(c)  # type: ignore[arg-type]
        return generate_latest(registry)
