"""The loaded model: a bundle made ready to serve, and one prediction on it.

A ``LoadedModel`` is never changed after it is built (besides its score counters): a reload
builds a new one and swaps one reference, so a request that started on a model finishes on it.
Scoring calls ``model.predict(batch, tasks)`` itself, the model's own forward: the encoder and
trunk run once, only the requested gates and towers run. Per-stage timings come from forward
hooks rather than from a copy of the forward logic.
"""

from __future__ import annotations

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
from ranker.errors import RankerError
from ranker.model import MultiTaskRanker
from ranker.serving.drift import ScoreTracker
from ranker.serving.errors import RequestError
from ranker.serving.parsing import RequestParser
from ranker.serving.schemas import FeatureInfo, ModelInfo, TaskInfo, encode_predict_response
from ranker.serving.settings import ServingSettings, resolve_device


@dataclass
class StageTimes:
    shared: float = 0.0  # seconds in encoder + trunk
    heads: dict[str, float] = field(default_factory=dict)  # seconds per task tower
    _marks: dict[str, float] = field(default_factory=dict)


class StageTimer:
    """Times the encoder+trunk and each head of ``model`` with forward hooks.

    Timings go to the calling thread's active ``StageTimes`` (``recording``), so concurrent
    requests in worker threads do not mix; outside ``recording`` the hooks do nothing.
    On CUDA each mark synchronises first, or the times would be kernel-launch times.
    """

    def __init__(self, model: MultiTaskRanker, synchronize: Callable[[], None] | None = None) -> None:
        self._local = threading.local()
        self._sync = synchronize
        model.encoder.register_forward_pre_hook(functools.partial(self._start, "shared"))
        model.trunk.register_forward_hook(functools.partial(self._stop, "shared"))
        for name, head in model.heads.items():
            head.register_forward_pre_hook(functools.partial(self._start, name))
            head.register_forward_hook(functools.partial(self._stop, name))

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _start(self, key: str, _module: nn.Module, _args: object) -> None:
        times: StageTimes | None = getattr(self._local, "times", None)
        if times is not None:
            times._marks[key] = self._now()

    def _stop(self, key: str, _module: nn.Module, _args: object, _out: object) -> None:
        times: StageTimes | None = getattr(self._local, "times", None)
        if times is not None and key in times._marks:
            elapsed = self._now() - times._marks.pop(key)
            if key == "shared":
                times.shared = elapsed
            else:
                times.heads[key] = elapsed

    @contextmanager
    def recording(self) -> Iterator[StageTimes]:
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
    body: bytes  # the JSON response


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A bundle on its device, with its request parser, score trackers and stage timer."""

    bundle: Bundle
    device: torch.device
    parser: RequestParser
    trackers: Mapping[str, ScoreTracker]
    timer: StageTimer

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

    def predict(self, body: bytes, tasks: Sequence[str]) -> Prediction:
        """Parse, featurize (column-wise, the training featurizer) and score one request."""
        t0 = time.perf_counter()
        table = self.parser.parse(body)  # (n, one column per feature source)
        t1 = time.perf_counter()
        # bias=False: bias-tower features are training-only; a request never needs them
        batch = self.bundle.featurizer.transform(table, bias=False)  # {"cat": (n, C), "dense": (n, D), "bag:*": (n, L)}
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        t2 = time.perf_counter()
        with torch.inference_mode(), self.timer.recording() as times:
            out = self.model.predict(batch, tasks)  # {task: (n,)}
        scores = {t: s.float().cpu().numpy() for t, s in out.items()}
        t3 = time.perf_counter()
        response = encode_predict_response(self.version, scores)
        return Prediction(
            tasks=list(tasks),
            n_items=table.num_rows,
            scores=scores,
            missing=self.bundle.featurizer.missing_counts(table),
            shared_seconds=times.shared,
            head_seconds=dict(times.heads),
            stage_seconds={"parse": t1 - t0, "featurize": t2 - t1, "encode": time.perf_counter() - t3},
            body=response,
        )

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
            tasks=[TaskInfo(name=t.name, type=t.type, transform=t.transform) for t in b.config.tasks],
            features=[
                FeatureInfo(name=f.name, type=f.type, column=f.source, kind=b.featurizer.kinds.get(f.name))
                for f in b.featurizer.inputs
            ],
            metrics=b.metrics,
        )


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
        device = resolve_device(settings.device)
        bundle.model.to(device).eval()
        loaded = LoadedModel(
            bundle=bundle,
            device=device,
            parser=RequestParser(bundle.featurizer, settings.max_items),
            trackers=_trackers(bundle, settings.drift_window),
            timer=StageTimer(bundle.model, torch.cuda.synchronize if device.type == "cuda" else None),
        )
        if warm:
            loaded.warm_up(min(settings.warmup_rows, settings.max_items))
    except RankerError:
        raise
    except Exception as e:  # a bundle that loads but breaks later is still the bundle's fault
        raise RankerError(f"{path}: cannot serve this bundle ({type(e).__name__}: {e})") from e
    return loaded
