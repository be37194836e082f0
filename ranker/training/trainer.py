"""The trainer: loops over task specs and calls interfaces; it knows no task, architecture or
weighting by name."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ranker.bundle import save_bundle
from ranker.config import RankerConfig, TaskSpec
from ranker.errors import RankerError
from ranker.features import Featurizer, RunningMoments
from ranker.model import MultiTaskRanker
from ranker.reference import reference_histogram
from ranker.training.data import Loader, ParquetSource, extract_labels, label_columns
from ranker.training.diagnostics import EpochProbe, format_diagnostics
from ranker.training.metrics import check_monitor, monitor_value, task_metrics
from ranker.training.weighting import StepContext, build_weighting, check_weighting

# per task type: loss over the labelled rows, given the raw output and the head's target
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "binary": F.binary_cross_entropy_with_logits,
    "regression": F.mse_loss,
}
EVAL_BATCH = 8192


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    scores: dict[str, np.ndarray]  # every row's score per task (for reference histograms)


@dataclass
class TrainResult:
    bundle: Path
    version: str
    metrics: dict
    history: list[dict] = field(default_factory=list)


def task_losses(
    model: MultiTaskRanker, types: dict[str, str], raw: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean loss per task in ``types`` over its labelled rows; tasks with none in the batch are
    left out, and so are outputs without a loss of their own (not in ``types``)."""
    losses = {}
    for t, ty in types.items():
        out, y = raw[t], batch[f"label:{t}"]
        valid = ~torch.isnan(y)
        if valid.any():
            losses[t] = LOSSES[ty](out[valid], model.heads[t].target(y[valid]))
    return losses


def evaluate(model: MultiTaskRanker, loader: Loader, tasks: list[TaskSpec]) -> EvalResult:
    """Scores for every row and metrics over each task's labelled rows."""
    model.eval()
    scores: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    labels: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    with torch.inference_mode():
        for batch in loader():
            out = model.predict(batch)
            for t in tasks:
                scores[t.name].append(out[t.name].numpy())
                labels[t.name].append(batch[f"label:{t.name}"].numpy())
    metrics, all_scores = {}, {}
    for t in tasks:
        s, y = np.concatenate(scores[t.name]), np.concatenate(labels[t.name])
        valid = ~np.isnan(y)
        metrics[t.name] = task_metrics(t.type, y[valid], s[valid])
        all_scores[t.name] = s
    return EvalResult(metrics, all_scores)


class Trainer:
    """Trains a MultiTaskRanker from a config and writes the bundle.

    Args:
        cfg: the validated config.
        progress: show tqdm bars (rows/s and per-task loss) on stderr.
        log: where per-epoch lines go.
    """

    def __init__(self, cfg: RankerConfig, progress: bool | None = None, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = cfg.train.progress if progress is None else progress
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.task_types = {t.name: t.type for t in cfg.tasks}
        self.loss_types = {t.name: t.type for t in cfg.tasks if t.loss}  # tasks trained directly
        check_weighting(cfg.train.weighting)
        err = check_monitor(cfg.train.monitor, self.task_types)
        if err:
            raise RankerError(f"train.monitor: {err}")

    # ----- data ----------------------------------------------------------------------------
    def _sources(self) -> tuple[ParquetSource, ParquetSource, ParquetSource | None]:
        cols = [f.source for f in self.cfg.features] + label_columns(self.cfg.tasks)
        d = self.cfg.data
        train = ParquetSource(d.train, "data.train", cols)
        val = ParquetSource(d.val, "data.val", cols)
        test = ParquetSource(d.test, "data.test", cols) if d.test else None
        return train, val, test

    def fit_featurizer(self, train: ParquetSource) -> tuple[Featurizer, dict[str, tuple[float, float]]]:
        """One streaming pass over train: dense statistics, label checks, regression target stats."""
        assert train.schema is not None
        dense = [f.source for f in self.cfg.features if f.type == "dense"]
        cols = list(dict.fromkeys(dense + label_columns(self.cfg.tasks)))
        regression = [t for t in self.cfg.tasks if t.type == "regression"]
        target = {t.name: RunningMoments() for t in regression}

        def tapped() -> Iterator[pa.RecordBatch]:
            for f, rb in train.batches(cols):
                labels = extract_labels(rb, self.cfg.tasks, str(f))  # validates every label value
                for t in regression:
                    y = labels[f"label:{t.name}"].numpy().astype(np.float64)  # NaN = unlabelled
                    target[t.name].update(np.log1p(np.clip(y, 0, None)) if t.transform == "log1p" else y)
                yield rb

        featurizer = Featurizer.fit(self.cfg.features, train.schema, tapped(), str(train.files[0]), bias=self.cfg.bias_feature_names)
        for t in regression:
            if target[t.name].count == 0:
                raise RankerError(f"data.train: task {t.name!r} has no labelled rows in column {t.label!r}")
        return featurizer, {k: (m.mean, m.std) for k, m in target.items()}

    # ----- training ------------------------------------------------------------------------
    def run(self, out: str | Path) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        train_src, val_src, test_src = self._sources()
        featurizer, target_stats = self.fit_featurizer(train_src)
        for src in (val_src, test_src):
            if src is not None and src.schema is not None:
                featurizer.check_compatible(src.schema, str(src.files[0]))

        model = MultiTaskRanker(cfg.features, cfg.tasks, cfg.model)
        for name, (mean, std) in target_stats.items():
            head = model.heads[name]
            head.target_mean.fill_(mean)  # type: ignore[operator]
            head.target_std.fill_(std)  # type: ignore[operator]
        weighting = build_weighting(tc.weighting, [t for t in cfg.tasks if t.loss], tc.weighting_params)
        params = list(model.parameters()) + list(weighting.parameters())
        # fused: one kernel over all parameters, ~8x faster than the per-tensor loop on CPU
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        shared = list(model.encoder.parameters()) + list(model.trunk.parameters())
        specific = [p for p in model.parameters() if all(p is not q for q in shared)]
        steps_per_epoch = -(-train_src.num_rows // tc.batch_size)

        train_loader = Loader(train_src, featurizer, cfg.tasks, tc.batch_size, tc.shuffle_buffer)
        val_loader = Loader(val_src, featurizer, cfg.tasks, EVAL_BATCH)

        best, best_state, best_epoch, bad_epochs = float("-inf"), None, -1, 0
        best_val: EvalResult | None = None  # the best epoch's scores: reference bins, reported val metrics
        history: list[dict] = []
        rows_done, train_seconds, step = 0, 0.0, 0
        for epoch in range(tc.epochs):
            model.train()
            ema: dict[str, float] = {}
            weights: dict[str, list[float]] = {}
            probe, probe_seconds = EpochProbe(shared, steps_per_epoch, tc.diagnostics_batches), 0.0
            bar = tqdm(total=train_src.num_rows, unit="row", unit_scale=True, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       disable=not self.progress, file=sys.stderr, leave=False)
            t0 = time.perf_counter()
            for i, batch in enumerate(train_loader(seed=tc.seed * 1_000_003 + epoch)):
                raw = model(batch)
                losses = task_losses(model, self.loss_types, raw, batch)
                if not losses:
                    continue
                if probe.due(i):  # off the clock: diagnostics are not training throughput
                    tp = time.perf_counter()
                    probe.record(losses, model.trunk.last_gates)
                    probe_seconds += time.perf_counter() - tp
                ctx = StepContext(shared=shared, epoch=epoch, step=step, specific=specific, rep=model.last_encoding)
                for t, w in weighting.backward(losses, ctx).items():
                    weights.setdefault(t, []).append(w)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                n = len(batch["cat"])
                rows_done += n
                for t, loss in losses.items():
                    v = float(loss.detach())
                    ema[t] = v if t not in ema else 0.95 * ema[t] + 0.05 * v
                bar.update(n)
                if step % 20 == 0:
                    bar.set_postfix({f"loss_{t}": f"{v:.4f}" for t, v in ema.items()}, refresh=False)
            train_seconds += time.perf_counter() - t0 - probe_seconds
            bar.close()
            val = evaluate(model, val_loader, cfg.tasks)
            score = monitor_value(tc.monitor, val.metrics, self.task_types)
            diag = probe.summary()
            history.append({"epoch": epoch + 1, "train_loss": dict(ema), "val": val.metrics, "monitor": score,
                            "weights": {t: sum(v) / len(v) for t, v in weights.items()}, "diagnostics": diag})
            self.log(f"epoch {epoch + 1}: " + _fmt(val.metrics) + f" | monitor {score:.5f}")
            if diag["batches"]:
                self.log(f"  diagnostics: {format_diagnostics(diag)}")
            if score > best:
                best, best_epoch, bad_epochs = score, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
                best_val = val
            else:
                bad_epochs += 1
                if bad_epochs >= tc.patience:
                    self.log(f"early stop: no gain for {tc.patience} epochs; keeping epoch {best_epoch}")
                    break

        if best_state is not None:
            model.load_state_dict(best_state)
        # no second pass over val: the best epoch's evaluation is the restored model's
        val = best_val if best_val is not None else evaluate(model, val_loader, cfg.tasks)
        test = evaluate(model, Loader(test_src, featurizer, cfg.tasks, EVAL_BATCH), cfg.tasks).metrics if test_src else {}
        reference = {t: reference_histogram(s) for t, s in val.scores.items()}
        metrics = {
            "val": val.metrics,
            "test": test,
            "throughput": {"train_rows_per_second": rows_done / max(train_seconds, 1e-9)},
            "best_epoch": best_epoch,
            "history": history,
        }
        version = save_bundle(out, cfg, featurizer, model, reference, metrics)
        return TrainResult(Path(out), version, metrics, history)


def _fmt(metrics: dict[str, dict[str, float]]) -> str:
    parts = []
    for t, m in metrics.items():
        parts.append(t + " " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "count"))
    return " | ".join(parts)


def format_metrics(metrics: dict[str, dict[str, float]]) -> Iterable[str]:
    """Human-readable lines, one per task."""
    for t, m in metrics.items():
        yield f"  {t:<12} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
