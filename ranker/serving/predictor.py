"""The loaded model: a bundle made ready to serve, and one prediction on it.

A ``LoadedModel`` is never changed after it is built (besides its score counters): a reload
builds a new one and swaps one reference, so a request that started on a model finishes on it.
Scoring calls ``model.predict(batch, tasks)`` itself, the model's own forward: the encoder and
trunk run once, only the requested gates and towers run. Per-stage timings come from forward
hooks rather than from a copy of the forward logic.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ranker.bundle import MANIFEST, Bundle, load_bundle, probe
from ranker.device import resolve_device
from ranker.errors import RankerError
from ranker.features import Batch, bag_pads
from ranker.model import MultiTaskRanker
from ranker.serving.batching import Batcher, ForwardTimes, HostStaging
from ranker.serving.drift import ScoreTracker
from ranker.serving.errors import RequestError
from ranker.serving.formats import JSON_WIRE, WireFormat
from ranker.serving.parsing import RequestParser
from ranker.serving.schemas import FeatureInfo, ModelInfo, TaskInfo
from ranker.serving.settings import ServingSettings


class CpuEvent:
    """A host-clock stand-in for ``torch.cuda.Event(enable_timing=True)``: the same interface
    (``record``, ``synchronize``, ``elapsed_time`` in ms), so the CPU runs the timer's code path."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: CpuEvent) -> float:
        return (end.t - self.t) * 1e3


@dataclass
class StageTimes:
    shared: float = 0.0  # seconds in encoder + trunk
    heads: dict[str, float] = field(default_factory=dict)  # seconds per task tower
    _marks: dict[str, tuple[object, object | None]] = field(default_factory=dict)  # key -> (start, end) events

    def settle(self) -> None:
        """Turn the recorded events into seconds: one wait, for the last event, per forward
        (on CUDA the events complete in stream order, so the last one done means all are)."""
        ends = [end for _, end in self._marks.values() if end is not None]
        if ends:
            ends[-1].synchronize()  # type: ignore[attr-defined]
        for key, (start, end) in self._marks.items():
            if end is None:
                continue
            seconds = start.elapsed_time(end) / 1e3  # type: ignore[attr-defined]
            if key == "shared":
                self.shared = seconds
            else:
                self.heads[key] = seconds
        self._marks.clear()


class StageTimer:
    """Times the encoder+trunk and each head of ``model`` with forward hooks.

    Timings go to the calling thread's active ``StageTimes`` (``recording``), so concurrent
    requests in worker threads do not mix; outside ``recording`` the hooks do nothing. A hook
    only records an event (``torch.cuda.Event`` on CUDA: enqueued on the stream, no wait);
    the times are read once the forward is over (``StageTimes.settle``), with one wait per
    forward instead of a device-wide synchronize in every hook, which would stall the host
    between kernels and serialise concurrent requests on the GPU.

    Args:
        model: the model whose stages are timed.
        event: makes a timing event (``CpuEvent`` by default; ``torch.cuda.Event`` with
            ``enable_timing=True`` on CUDA).
    """

    def __init__(self, model: MultiTaskRanker, event: Callable[[], object] = CpuEvent) -> None:
        self._local = threading.local()
        self._event = event
        model.encoder.register_forward_pre_hook(functools.partial(self._start, "shared"))
        model.trunk.register_forward_hook(functools.partial(self._stop, "shared"))
        for name, head in model.heads.items():
            head.register_forward_pre_hook(functools.partial(self._start, name))
            head.register_forward_hook(functools.partial(self._stop, name))

    def _mark(self) -> object:
        e = self._event()
        e.record()  # type: ignore[attr-defined]
        return e

    def _start(self, key: str, _module: nn.Module, _args: object) -> None:
        times: StageTimes | None = getattr(self._local, "times", None)
        if times is not None:
            times._marks[key] = (self._mark(), None)

    def _stop(self, key: str, _module: nn.Module, _args: object, _out: object) -> None:
        times: StageTimes | None = getattr(self._local, "times", None)
        if times is not None and key in times._marks:
            start = times._marks.pop(key)[0]
            times._marks[key] = (start, self._mark())  # re-inserted: the last stopped stays last

    @contextmanager
    def recording(self) -> Iterator[StageTimes]:
        """Record this thread's stage events; call ``settle()`` on the result once the
        forward's outputs are on the host (reading them is the one wait)."""
        times = StageTimes()
        self._local.times = times
        try:
            yield times
        finally:
            self._local.times = None


@dataclass(frozen=True)
class Prediction:
    tasks: list[str]
    n_items: int
    scores: dict[str, np.ndarray]  # {task: (n_items,) float32}
    missing: dict[str, int]  # items with the feature missing, per feature name
    shared_seconds: float
    head_seconds: dict[str, float]
    stage_seconds: dict[str, float]  # the work around the model: {"parse", "featurize", "encode"}
    body: bytes  # the response body
    media_type: str  # its content type (JSON, or an Arrow stream)
    merged_requests: int = 1  # requests that shared this request's forward (--batch-window-ms)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A bundle on its device, with its request parser, score trackers and stage timer."""

    bundle: Bundle
    device: torch.device
    parser: RequestParser
    trackers: Mapping[str, ScoreTracker]
    timer: StageTimer
    staging: HostStaging | None = None  # pinned host buffers for the copy to a GPU
    batcher: Batcher | None = None  # merges concurrent forwards (batch_window_ms > 0)

    def close(self) -> None:
        """Stop merging (after a reload swapped this model out); queued requests still finish."""
        if self.batcher is not None:
            self.batcher.close()

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def architecture(self) -> str:
        return self.bundle.config.model.architecture

    @property
    def task_names(self) -> list[str]:
        return list(self.bundle.model.task_names)

    @property
    def model(self) -> MultiTaskRanker:
        return self.bundle.model

    def resolve_tasks(self, raw: str | None) -> list[str]:
        """``?tasks=ctr,cvr`` -> task names; absent or empty means every task."""
        names = [t.strip() for t in (raw or "").split(",") if t.strip()]
        if not names:
            return self.task_names
        try:
            return self.model.resolve_tasks(names)
        except RankerError as e:
            raise RequestError("unknown_task", "tasks", str(e)) from None

    def predict(self, body: bytes, tasks: Sequence[str], wire: WireFormat = JSON_WIRE) -> Prediction:
        """Parse (JSON rows, JSON columns or an Arrow stream, as ``wire`` says), featurize
        (column-wise, the training featurizer) and score one request; with a batcher the
        forward may be shared with concurrent requests."""
        batcher = self.batcher
        if batcher is not None:
            batcher.enter()  # from here the batcher may wait for this request's batch
        pending = batcher is not None
        try:
            t0 = time.perf_counter()
            table = wire.decode(self.parser, body)  # (n, one column per feature source)
            t1 = time.perf_counter()
            batch = self.bundle.featurizer.transform(table, bias=False)  # bias-tower features are training-only; {"cat": (n, C), "dense": (n, D), "bag:*": (n, L)}
            t2 = time.perf_counter()
            if batcher is not None:
                pending = False
                scores, times = batcher.run(batch, tasks)
            else:
                scores, times = self.forward(batch, list(tasks))
        finally:
            if pending:
                batcher.leave()  # type: ignore[union-attr]
        t3 = time.perf_counter()
        response = wire.encode(self.version, scores)
        return Prediction(
            tasks=list(tasks),
            n_items=table.num_rows,
            scores=scores,
            missing=self.bundle.featurizer.missing_counts(table),
            shared_seconds=times.shared,
            head_seconds=dict(times.heads),
            stage_seconds={"parse": t1 - t0, "featurize": t2 - t1, "encode": time.perf_counter() - t3},
            body=response,
            media_type=wire.media_type,
            merged_requests=times.requests,
        )

    def forward(self, batch: Batch, tasks: list[str]) -> tuple[dict[str, np.ndarray], ForwardTimes]:
        return score_batch(self.model, self.timer, self.staging, batch, tasks)

    def warm_up(self, rows: int) -> None:
        """Run a few all-missing batches up to ``rows`` through the whole request path, so the
        first real request does not pay for lazy kernel and allocator set-up."""
        for n in sorted({1, min(64, rows), rows}):
            self.predict(b'{"items":[' + b",".join([b"{}"] * n) + b"]}", self.task_names)

    def info(self) -> ModelInfo:
        b = self.bundle
        return ModelInfo(
            version=self.version,
            architecture=self.architecture,
            created_at=b.manifest.get("created_at"),
            bundle=str(b.path),
            tasks=[TaskInfo(name=t.name, type=t.type, transform=t.transform, mask=t.mask) for t in b.config.tasks],
            features=[
                FeatureInfo(name=f.name, type=f.type, column=f.source, kind=b.featurizer.kinds.get(f.name))
                for f in b.featurizer.inputs
            ],
            metrics=b.metrics,
        )


def score_batch(model: MultiTaskRanker, timer: StageTimer, staging: HostStaging | None, batch: Batch, tasks: list[str]) -> tuple[dict[str, np.ndarray], ForwardTimes]:
    """The model's own forward on one host batch: copied to the device (through pinned
    buffers on a GPU, on the calling thread's own stream), scored, the scores brought back in
    one copy (the one wait for the device), then the stage events read."""
    with staging.stream() if staging is not None else contextlib.nullcontext(), torch.inference_mode(), timer.recording() as times:
        if staging is not None:
            batch = staging.to_device(batch)
        out = model.predict(batch, tasks)  # {task: (n,)}
        stacked = torch.stack([out[t] for t in tasks]).float().cpu().numpy()  # (T, n): one device-to-host copy
    times.settle()
    return {t: stacked[i] for i, t in enumerate(tasks)}, ForwardTimes(times.shared, dict(times.heads), rows=stacked.shape[1])


def _trackers(bundle: Bundle, window: int) -> dict[str, ScoreTracker]:
    """One tracker per task from the bundle's reference histograms, checked for shape."""
    where = bundle.path / MANIFEST
    out = {}
    for task in bundle.model.task_names:
        ref = bundle.reference.get(task)
        if not isinstance(ref, dict) or "edges" not in ref or "shares" not in ref:
            raise RankerError(f"{where}: reference.{task}: missing (needs 'edges' and 'shares')")
        edges = np.asarray(ref["edges"], dtype=np.float64)
        if not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
            raise RankerError(f"{where}: reference.{task}.edges: must be finite and strictly ascending")
        try:
            out[task] = ScoreTracker(edges, ref["shares"], window)
        except ValueError as e:
            raise RankerError(f"{where}: reference.{task}: {e}") from None
    return out


def load_model(source: Bundle | str | Path, settings: ServingSettings, warm: bool = True) -> LoadedModel:
    """Load (if given a path), check and place a bundle; warm it up unless ``warm`` is False.

    Raises:
        RankerError: the bundle cannot be served; the message names the file at fault.
    """
    path = source.path if isinstance(source, Bundle) else Path(source)
    try:
        bundle = source if isinstance(source, Bundle) else load_bundle(path)
        probe(bundle)  # on the CPU, where load_bundle put it
        device = resolve_device(settings.device, "serve: --device")
        bundle.model.to(device).eval()
        cuda = device.type == "cuda"
        timer = StageTimer(bundle.model, functools.partial(torch.cuda.Event, enable_timing=True) if cuda else CpuEvent)
        staging = HostStaging(device, pin=True, new_stream=functools.partial(torch.cuda.Stream, device)) if cuda else None
        batcher = None
        if settings.batch_window_ms > 0:
            forward = functools.partial(score_batch, bundle.model, timer, staging)
            rows = settings.batch_max_items or settings.max_items
            batcher = Batcher(forward, settings.batch_window_ms / 1e3, rows, bag_pads(bundle.config.features))
        loaded = LoadedModel(
            bundle=bundle,
            device=device,
            parser=RequestParser(bundle.featurizer, settings.max_items, settings.max_list_values, 4 * settings.max_body_bytes),
            trackers=_trackers(bundle, settings.drift_window),
            timer=timer,
            staging=staging,
            batcher=batcher,
        )
        if warm:
            loaded.warm_up(min(settings.warmup_rows, settings.max_items))
    except RankerError:
        raise
    except Exception as e:  # a bundle that loads but breaks later is still the bundle's fault
        raise RankerError(f"{path}: cannot serve this bundle ({type(e).__name__}: {e})") from e
    return loaded
