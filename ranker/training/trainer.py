"""The trainer: loops over task specs and calls interfaces; it knows no task, architecture or
weighting by name."""

from __future__ import annotations

import functools
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

from ranker.bundle import check_bundle_target, save_bundle
from ranker.config import RankerConfig, TaskSpec
from ranker.errors import RankerError
from ranker.features import DenseFit, Featurizer, RunningMoments
from ranker.files import write_problem
from ranker.model import MultiTaskRanker, build_ranker
from ranker.reference import reference_histogram
from ranker.training.checkpoint import check_resume, checkpoints, load_latest, save_checkpoint
from ranker.training.data import (
    Loader,
    ParquetSource,
    Unit,
    extract_labels,
    label_columns,
    plan_units,
)
from ranker.training.diagnostics import EpochProbe, format_diagnostics
from ranker.training.distributed import Collective
from ranker.training.evaluation import accumulators
from ranker.training.metrics import PRIMARY, check_monitor, monitor_value
from ranker.training.optim import build_optimizer, row_sparse
from ranker.training.schedule import build_schedule
from ranker.training.sources import (
    SourceCursor,
    Streams,
    TaskSource,
    batch_rows,
    plan_steps,
    sampling_rates,
    task_sources,
)
from ranker.training.tracking import Tracker
from ranker.training.weighting import StepContext, build_weighting, check_weighting

# per task type: summed loss over the labelled rows, given the raw output and the head's target
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "binary": F.binary_cross_entropy_with_logits,
    "regression": F.mse_loss,
}
EVAL_BATCH = 8192
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    scores: dict[str, np.ndarray]  # per task: every row's score, or a uniform sample past evaluation.REFERENCE_SAMPLE


@dataclass
class TrainResult:
    bundle: Path
    version: str
    metrics: dict
    history: list[dict] = field(default_factory=list)


def _global_values(losses: dict[str, torch.Tensor], ranks: Collective) -> dict[str, float]:
    """Each task's loss summed over ranks (each rank holds its share): one all-reduce."""
    if not losses:
        return {}
    return dict(zip(losses, ranks.sum(torch.stack([v.detach() for v in losses.values()])).tolist(), strict=True))


def task_losses(
    model: MultiTaskRanker,
    types: dict[str, str],
    raw: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    counts: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Each task's loss over its labelled rows, for tasks in ``types`` (outputs without a loss of
    their own are left out).

    ``counts`` are the labelled rows per task over all ranks: each rank's loss is then the sum
    over its own rows divided by that count, its share of the global mean, and a task with no
    labelled row anywhere is left out on every rank alike (a rank without labels for it still
    takes part with a zero share). Without ``counts``: the mean over this batch's rows.
    """
    losses = {}
    for t, ty in types.items():
        out, y = raw[t].float(), batch[f"label:{t}"]
        valid = ~torch.isnan(y)
        n = counts[t] if counts is not None else float(valid.sum())
        if n > 0:
            losses[t] = LOSSES[ty](out[valid], model.heads[t].target(y[valid]), reduction="sum") / n
    return losses


def evaluate(
    model: MultiTaskRanker,
    loader: Loader,
    tasks: list[TaskSpec],
    ranks: Collective | None = None,
    units: list[Unit] | None = None,
    observe: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
) -> EvalResult:
    """Metrics over each task's labelled rows and reference scores, in bounded memory
    (``ranker.training.evaluation``). With ``ranks``, each rank scores ``units`` and the result
    covers every rank's rows; all ranks must call it. ``observe``, if given, also gets every
    batch's labels and scores per task (NaN labels included), so more figures need no second
    pass over the data."""
    ranks = ranks or Collective.single(torch.device("cpu"))
    device = next(model.parameters()).device
    model.eval()
    accs = accumulators([(t.name, t.type) for t in tasks])
    names = [t.name for t in tasks]
    broken = np.zeros(len(names))  # rows scored NaN/inf per task: a diverged model
    with torch.inference_mode():
        for batch in loader(units=units):
            out = model.predict(to_device(batch, device), names)
            labels = {t: batch[f"label:{t}"].numpy() for t in names}
            scores = {t: out[t].float().cpu().numpy() for t in names}
            for k, t in enumerate(names):
                bad = ~np.isfinite(scores[t])
                if bad.any():  # kept out of the metrics, which assume finite scores; raised below
                    broken[k] += bad.sum()
                    scores[t] = np.where(bad, 0.0, scores[t]).astype(scores[t].dtype)
                accs[t].update(labels[t], scores[t])
            if observe is not None:
                observe(labels, scores)
    broken = ranks.sum(torch.from_numpy(broken)).numpy()  # every rank raises alike, none waits
    if broken.any():
        k = int(np.flatnonzero(broken)[0])
        raise RankerError(f"train: the model scores {int(broken[k]):,} rows of task {names[k]!r} as NaN or infinite: training "
                          "diverged; lower train.lr (or the tasks' weights)")
    metrics, scores = {}, {}
    for t in tasks:
        metrics[t.name], scores[t.name] = accs[t.name].result(ranks)
    return EvalResult(metrics, scores)


def label_counts(tasks: Iterable[TaskSpec]) -> dict[str, list[int]]:
    """Zeroed [labelled rows, positives] per task with a label column (``count_labels``)."""
    return {t.name: [0, 0] for t in tasks if t.label is not None}


def count_labels(counts: dict[str, list[int]], labels: dict[str, torch.Tensor]) -> None:
    """Add one batch's ``extract_labels`` (NaN = unlabelled) to ``counts``."""
    for name, c in counts.items():
        y = labels.get(f"label:{name}")
        if y is not None:
            y = y.numpy()
            c[0] += int(np.isfinite(y).sum())
            c[1] += int((y == 1).sum())


def sum_label_counts(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Several ranks' ``label_counts`` summed."""
    return {name: [sum(p[name][k] for p in parts) for k in (0, 1)] for name in parts[0]}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class _Progress:
    """Everything of the loop that a checkpoint carries besides model, optimiser and weighting."""

    epoch: int = 0  # the epoch in progress
    batches: int = 0  # batches of that epoch consumed (the data cursor)
    step: int = 0  # optimiser steps so far
    rows: int = 0  # training rows over all ranks
    seconds: float = 0.0  # training time (diagnostics and evaluation excluded)
    best: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_val: dict | None = None  # {"metrics": ..., "scores": {task: tensor}}
    history: list[dict] = field(default_factory=list)
    ema: dict[str, float] = field(default_factory=dict)
    weights: dict[str, list[float]] = field(default_factory=dict)  # task -> [sum, count] this epoch
    probe: dict | None = None
    sources: dict | None = None  # every source's stream position (sources.SourceCursor.state())

    def state(self) -> dict:
        return dict(self.__dict__)


class Trainer:
    """Trains a MultiTaskRanker from a config and writes the bundle.

    Under torchrun every rank runs this same loop on its share of the data
    (``ranker.training.distributed``); rank 0 alone logs, shows progress, writes checkpoints
    and the bundle.

    Args:
        cfg: the validated config.
        progress: show tqdm bars (rows/s and per-task loss) on stderr.
        log: where per-epoch lines go.
    """

    def __init__(self, cfg: RankerConfig, progress: bool | None = None, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = cfg.train.progress if progress is None else progress
        self._log = log or (lambda s: print(s, file=sys.stderr))
        self.ranks = Collective.single(torch.device("cpu"))
        # hook(model, batch, losses, step) before each backward, off the clock; must change nothing
        self.step_hooks: list[Callable[[MultiTaskRanker, dict, dict, int], None]] = []
        self.task_types = {t.name: t.type for t in cfg.tasks}
        self.loss_types = {t.name: t.type for t in cfg.tasks if t.loss}  # tasks trained directly
        check_weighting(cfg.train.weighting)
        err = check_monitor(cfg.train.monitor, self.task_types)
        if err:
            raise RankerError(f"train.monitor: {err}")

    def log(self, line: str) -> None:
        if self.ranks.is_main:
            self._log(line)

    # ----- data ----------------------------------------------------------------------------
    def fit_featurizer(self, sources: list[TaskSource]) -> tuple[Featurizer, dict[str, tuple[float, float]]]:
        """One streaming pass over every source's train split: dense statistics over all of
        them, label checks, regression target stats over each task's own source. Every file of
        every split has its schema checked against the first train file's (value kinds must agree).

        Over several ranks the pass is shared: each rank reads a disjoint share of every train
        split's row groups (``plan_units`` in file order), and the ranks then merge their
        statistics in rank order, so every rank builds the same featurizer from one reading of
        the data in all. A bad label on one rank's share stops every rank with that error."""
        first = sources[0].train
        assert first.schema is not None
        kinds = Featurizer.check_schema(self.cfg.features, first.schema, str(first.files[0]))
        for src in sources:
            for split in src.splits():
                split.check_files(Featurizer(self.cfg.features, kinds))
        dense = [f.source for f in self.cfg.features if f.type == "dense"]
        target = {t.name: RunningMoments() for t in self.cfg.tasks if t.type == "regression"}
        ranks = self.ranks
        failed: list[Exception] = []  # this rank's error, held until the ranks meet
        rows = 0
        seen = label_counts(self.cfg.tasks)

        def tapped() -> Iterator[pa.RecordBatch]:
            nonlocal rows
            try:
                for src in sources:
                    cols = list(dict.fromkeys(dense + label_columns(src.tasks)))
                    regression = [t for t in src.tasks if t.type == "regression"]
                    for f, rb in src.train.batches(cols, units=plan_units(src.train.units, ranks.world)[ranks.rank]):
                        labels = extract_labels(rb, src.tasks, str(f))  # validates every label value
                        count_labels(seen, labels)
                        for t in regression:
                            y = labels[f"label:{t.name}"].numpy().astype(np.float64)  # NaN = unlabelled
                            target[t.name].update(np.log1p(np.clip(y, 0, None)) if t.transform == "log1p" else y)
                        rows += rb.num_rows
                        yield rb
            except Exception as e:  # noqa: BLE001 - re-raised on every rank once they have met
                failed.append(e)

        shares: list[int] = []  # each rank's rows, once the ranks have met

        def combine(fit: DenseFit) -> DenseFit:
            parts = ranks.gather_objects((fit, target, failed[:1], rows, seen))  # one process: [its own]
            errors = failed[:1] or [e for _, _, err, _, _ in parts for e in err]
            if errors:
                raise errors[0]
            merged = parts[0][0]
            for other, *_ in parts[1:]:
                merged.merge(other)
            summed = {name: RunningMoments() for name in target}  # one process: parts hold ``target`` itself
            for _, moments, _, _, _ in parts:
                for name, m in moments.items():
                    summed[name].merge(m)
            target.update(summed)
            shares[:] = [p[3] for p in parts]
            seen.update(sum_label_counts([p[4] for p in parts]))
            return merged

        t0 = time.perf_counter()
        featurizer = Featurizer.fit(self.cfg.features, first.schema, tapped(), str(first.files[0]),
                                    bias=self.cfg.bias_feature_names, combine=combine)
        labelled = [(src, t, *seen[t.name]) for src in sources for t in src.tasks if t.name in seen]
        for src, t, n, _ in labelled:  # errors first: a failed run prints one line
            if n == 0:
                where = f" where {t.mask!r} is 1" if t.mask else ""
                raise RankerError(f"{src.train.key}: task {t.name!r} has no labelled rows in column {t.label!r}{where}")
        spread = f", read once over {ranks.world} ranks ({'/'.join(f'{n:,}' for n in shares)})" if ranks.world > 1 else ""
        self.log(f"featurizer fitted on {sum(shares):,} train rows in {time.perf_counter() - t0:.1f} s{spread}")
        for src, t, n, positives in labelled:
            if t.type == "binary" and positives in (0, n):
                self.log(f"warning: {src.train.key}: task {t.name!r} has only label {int(positives > 0)} "
                         f"in its {n:,} labelled rows; it can learn nothing to rank by")
        return featurizer, {k: (m.mean, m.std) for k, m in target.items()}

    def check_held_out_labels(self, sources: list[TaskSource]) -> None:
        """Read the val and test splits' label columns once before training (each rank its
        share, as in the fit pass): a bad label value there, or a val split on which the
        early-stopping monitor is undefined, stops the run now instead of after an epoch.

        Raises:
            RankerError: the file and column of a bad label, or the val split and tasks."""
        ranks = self.ranks
        failed: list[Exception] = []
        seen = label_counts([t for src in sources for t in src.tasks])  # on val
        try:
            for src in sources:
                cols = label_columns(src.tasks)
                for split in (s for s in (src.val, src.test) if s is not None):
                    for f, rb in split.batches(cols, units=plan_units(split.units, ranks.world)[ranks.rank]):
                        labels = extract_labels(rb, src.tasks, str(f))  # validates every label value
                        if split is not src.val:
                            continue
                        count_labels(seen, labels)
        except RankerError as e:
            failed.append(e)
        parts = ranks.gather_objects((failed[:1], seen))
        errors = failed[:1] or [e for err, _ in parts for e in err]
        if errors:
            raise errors[0]
        total = sum_label_counts([p[1] for p in parts])
        types = self.task_types

        monitor = self.cfg.train.monitor
        task, _, metric = monitor.partition(".")

        def undefined(name: str) -> bool:  # the monitored metric on val, from the label counts
            n, pos = total[name]
            m = metric or PRIMARY[types[name]]
            if n == 0:
                return True
            if m in ("auc", "ne"):  # both classes (NE divides by the base rate's entropy)
                return pos in (0, n)
            if m == "calibration":  # mean score over mean label
                return pos == 0
            return m == "r2" and n < 2  # constant labels are found after the epoch (no variance kept here)

        watched = list(total) if monitor == "mean" else [task] if task in total else []
        if watched and all(undefined(t) for t in watched):
            raise RankerError(self._undefined_monitor(sources, {t: {} for t in watched}))
        left_out = [t for t in watched if undefined(t)]
        if left_out:  # "mean" over the others: say so, or epochs are chosen on fewer tasks unseen
            self.log(f"warning: train.monitor 'mean' leaves out {', '.join(map(repr, left_out))}: undefined on the val "
                     "split (no labelled rows, or one class); epochs are chosen on the other tasks")

    @staticmethod
    def _losses_after(model: MultiTaskRanker, batch: dict[str, torch.Tensor], tasks: list[str], types: dict[str, str],
                      counts: dict[str, float], autocast: torch.autocast, ranks: Collective) -> dict[str, float]:
        """The step's task losses again, on the same batch under the parameters the optimiser
        just wrote (global values, as ``StepContext.values``); for ``Weighting.after_step``.
        The model stays in training mode, as for the losses the step descended."""
        with torch.no_grad(), autocast:
            return _global_values(task_losses(model, types, model(batch, tasks), batch, counts), ranks)

    def evaluate_sources(self, model: MultiTaskRanker, parts: list[tuple[Loader, list[TaskSpec], list[Unit]]]) -> EvalResult:
        """Each source's tasks on that source's split (a task is measured on its own data only);
        one result in config task order."""
        metrics, scores = {}, {}
        for loader, tasks, units in parts:
            r = evaluate(model, loader, tasks, self.ranks, units)
            metrics.update(r.metrics)
            scores.update(r.scores)
        order = [t.name for t in self.cfg.tasks if t.name in metrics]
        return EvalResult({t: metrics[t] for t in order}, {t: scores[t] for t in order})

    def fingerprint(self, sources: Iterable[tuple[str, ParquetSource | None]]) -> dict:
        """What a checkpoint must match to be resumed: config (less where output goes and how
        the run is watched), data files and world size."""
        conf = self.cfg.model_dump(mode="json")
        for k in ("checkpoint", "progress", "log_dir", "threads"):
            conf["train"].pop(k, None)
        return {
            "config": conf,
            "data": {k: (s.fingerprint() if s is not None else None) for k, s in sources},
            "world_size": self.ranks.world,
        }

    # ----- training ------------------------------------------------------------------------
    def run(self, out: str | Path, resume: bool = False) -> TrainResult:
        """Train and write the bundle to ``out``; ``resume`` continues from the newest
        checkpoint in ``train.checkpoint.dir`` when there is one (else starts afresh)."""
        self.ranks = Collective.from_env(self.cfg.train.device)
        done = False
        try:
            result = self._run(Path(out), resume)
            done = True
            return result
        except RuntimeError as e:
            if not self.ranks.peer_lost(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankerError(f"rank {self.ranks.rank}: lost the other ranks ({first[:160]}); one of them stopped, "
                              "its error is in its own output") from None
        finally:
            # the closing barrier only after success: a rank that failed mid-epoch met the
            # others' step all-reduce with it, and every rank waited out the group timeout
            if done:
                self.ranks.barrier()
            self.ranks.close()

    def _output_problem(self, out: Path, resume: bool) -> str | None:
        """What would make this run's writes fail or destroy something, found before training:
        a bad bundle destination, or (without ``resume``) a checkpoint folder holding an
        earlier run's checkpoints, which pruning (newest steps kept, whoever wrote them) would
        mix with this run's and a later ``--resume`` would take."""
        try:
            check_bundle_target(out)
        except RankerError as e:
            return str(e)
        ck = self.cfg.train.checkpoint
        if ck is not None and (problem := write_problem(ck.dir)):  # else found at the first checkpoint
            return f"train.checkpoint.dir: {ck.dir} cannot be written ({problem[0]} {problem[1]})"
        target = out.resolve()
        for key, folder in (("train.checkpoint.dir", ck.dir if ck else None), ("train.log_dir", self.cfg.train.log_dir)):
            f = Path(folder).resolve() if folder is not None else None
            if f is not None and (f == target or target in f.parents):
                return (f"{key}: {folder} is {'--out' if f == target else 'inside --out'} ({out}); the bundle replaces that "
                        "folder whole, so these files need a folder of their own")
        if ck is not None and not resume and (found := checkpoints(ck.dir)):
            return (f"train.checkpoint.dir: {ck.dir} holds an earlier run's checkpoints (newest {found[0].name}); "
                    "pass --resume to continue that run, or remove them to start afresh")
        return None

    def _undefined_monitor(self, sources: list[TaskSource], metrics: dict[str, dict[str, float]]) -> str:
        """The error for a val split that cannot choose epochs: which tasks' metrics are
        undefined there, and on which split."""
        monitor = self.cfg.train.monitor
        task, _, metric = monitor.partition(".")
        bad = [(src.val.key, t) for src in sources for t in src.tasks
               if (monitor == "mean" or t.name == task)
               and not np.isfinite(metrics.get(t.name, {}).get(metric or PRIMARY[t.type], float("nan")))]
        where = ", ".join(dict.fromkeys(k for k, _ in bad)) or "data.val"
        tasks = ", ".join(repr(t.name) for _, t in bad)
        return (f"{where}: train.monitor {monitor!r} is undefined on the val split: task(s) {tasks} "
                "have no labelled rows there, only one class (AUC, NE), no positives (calibration) or constant "
                "labels (R²); epochs cannot be chosen on it")

    def _run(self, out: Path, resume: bool) -> TrainResult:
        cfg, tc, ranks = self.cfg, self.cfg.train, self.ranks
        if resume and tc.checkpoint is None:
            raise RankerError("--resume: the config has no train.checkpoint section to resume from")
        if tc.batch_size % ranks.world:
            raise RankerError(f"train.batch_size: {tc.batch_size} does not split evenly over {ranks.world} ranks")
        problem = self._output_problem(out, resume) if ranks.is_main else None  # rank 0 writes; all ranks stop alike
        if (problem := ranks.broadcast_object(problem)) is not None:
            raise RankerError(problem)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        device, dtype = ranks.device, PRECISIONS[tc.precision]
        torch.manual_seed(tc.seed)
        sources = task_sources(cfg)
        # the resume check needs only the config and the data files' layout: it comes before the
        # data pass, so a mismatched --resume fails at once rather than after a pass over train
        fingerprint = self.fingerprint([(split.key, split) for src in sources for split in src.splits()])
        ranks.check_same("config", fingerprint)
        ck = None
        if resume:
            assert tc.checkpoint is not None
            ck = load_latest(tc.checkpoint.dir, self.log)
            if ck is None:
                self.log(f"--resume: no checkpoint in {tc.checkpoint.dir} yet; starting from the beginning")
            else:
                explicit = {"config": self.cfg.model_dump(mode="json", exclude_defaults=True), "data": None, "world_size": None}
                check_resume(ck["path"], ck["fingerprint"], fingerprint, explicit)
        # before the data pass, so a model too large for memory fails at once (the pass draws
        # nothing from torch's generator: the weights are those built after it)
        model = build_ranker(cfg.features, cfg.tasks, cfg.model)
        featurizer, target_stats = self.fit_featurizer(sources)
        self.check_held_out_labels(sources)

        for name, (mean, std) in target_stats.items():
            head = model.heads[name]
            head.target_mean.fill_(mean)  # type: ignore[operator]
            head.target_std.fill_(std)  # type: ignore[operator]
        weighting = build_weighting(tc.weighting, [t for t in cfg.tasks if t.loss], tc.weighting_params)
        model.to(device)
        weighting.to(device)
        if ranks.world > 1:  # the same initial weights everywhere (same seed), own dropout masks
            torch.manual_seed(tc.seed * 1_000_003 + ranks.rank)
        params = list(model.parameters()) + list(weighting.parameters())
        tables = model.encoder.sparse_tables() if tc.sparse_embeddings else []
        opt = build_optimizer(params, tables, tc.lr, tc.weight_decay)
        schedule = build_schedule(tc.lr_schedule, tc.epochs)
        scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
        if scaler is not None:
            # the weighting backpropagates losses times get_scale(); scaling one value
            # sets up the scaler's state as its own scale() would
            scaler.scale(torch.ones((), device=device))
        shared = model.shared_parameters()
        specific = [p for p in model.parameters() if all(p is not q for q in shared)]
        loss_tasks = list(self.loss_types)

        row_groups = tc.sharding == "row_groups"
        mix = tc.task_sampling.mix
        rates = sampling_rates([src.train.num_rows for src in sources], tc.task_sampling)
        # b_s: the rows source s gives a batch it is drawn into; what each rank's loader reads of them
        sizes, reads = batch_rows(rates, tc.batch_size, ranks.world, row_groups, mix)
        pin = device.type == "cuda"
        names = [t.name for t in cfg.tasks]
        own = [[t.name for t in src.tasks] for src in sources]  # the tasks labelled in each source
        train_loaders = [Loader(src.train, featurizer, src.tasks, b, tc.shuffle_buffer, pin=pin,
                                unlabelled=[n for n in names if n not in o]) for src, o, b in zip(sources, own, reads, strict=True)]
        val_parts = [(Loader(src.val, featurizer, src.tasks, EVAL_BATCH, pin=pin), src.tasks,
                      plan_units(src.val.units, ranks.world)[ranks.rank]) for src in sources]
        for src in sources:  # plan_units splits row groups, so only a split with fewer rows than ranks is short
            if row_groups and src.train.num_rows < ranks.world:
                raise RankerError(f"{src.train.key}: {src.train.num_rows} rows cannot feed {ranks.world} ranks")
        streams = Streams(sources, train_loaders, tc.seed, ranks.rank, ranks.world, tc.batch_size, sizes, row_groups, self.log)
        if len(sources) > 1:
            share = (lambda k: f"{sizes[k]:,} rows of every batch") if mix == "rows" else (lambda k: f"{rates[k]:.1%} of batches")
            self.log(f"sources ({tc.task_sampling.strategy}, mix {mix}): " + ", ".join(
                f"{src.name} {src.train.num_rows:,} rows -> {share(k)} ({'/'.join(o)})"
                for k, (src, o) in enumerate(zip(sources, own, strict=True))))

        pg = _Progress()
        if ck is not None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            # a method's extra state may postdate the checkpoint (CAGrad's warm start): it then
            # starts afresh; any other difference is a real mismatch
            missing, unexpected = weighting.load_state_dict(ck["weighting"], strict=False)
            if unexpected or any(not k.endswith("_extra_state") for k in missing):
                raise RankerError(f"{ck['path']}: its weighting state does not fit train.weighting "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            schedule.load_state_dict(ck.get("schedule") or {})
            if scaler is not None:
                scaler.load_state_dict(ck["scaler"])
            rng = ck["rng"][ranks.rank]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], device)
            pg = _Progress(**ck["progress"])
            self.log(f"resumed from {ck['path']}: epoch {pg.epoch + 1}, batch {pg.batches}, step {pg.step}")
            ck = None  # its weights are copied into the model: not kept for the whole run
        cursor = SourceCursor(**pg.sources) if pg.sources is not None else SourceCursor.start(len(sources))
        tracker = Tracker(tc.log_dir if ranks.is_main else None)
        last_checkpoint = time.monotonic()

        def save(final_of_epoch: bool = False) -> None:
            nonlocal last_checkpoint
            assert tc.checkpoint is not None
            rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            all_rng = ranks.gather_objects(rng)
            pg.sources = cursor.state()
            if ranks.is_main:
                state = {
                    "fingerprint": fingerprint,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(),
                    "weighting": weighting.state_dict(),
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": all_rng,
                    "progress": pg.state(),
                }
                t0 = time.perf_counter()
                path = save_checkpoint(tc.checkpoint.dir, pg.step, state, tc.checkpoint.keep)
                self.log(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)")
            ranks.barrier()
            last_checkpoint = time.monotonic()

        def checkpoint_due() -> bool:  # rank 0's view; shared with the others through the step's all-reduce
            ck = tc.checkpoint
            if ck is None or not ranks.is_main:
                return False
            if ck.every_steps is not None:
                return (pg.step + 1) % ck.every_steps == 0
            return time.monotonic() - last_checkpoint >= 60 * (ck.every_minutes or 0)

        autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        while pg.epoch < tc.epochs:
            epoch = pg.epoch
            model.train()
            # the epoch: as many rows as one pass over every source, the sources of every step
            # from a plan every rank computes alike (ranker.training.sources)
            steps = streams.epoch_steps(epoch)
            plan = plan_steps(rates, steps, tc.seed, epoch, mix)
            probe = EpochProbe(shared, steps, tc.diagnostics_batches, ranks, tables)
            if pg.probe is not None:
                probe.set_state(pg.probe)
            bar = tqdm(total=steps * tc.batch_size, initial=pg.batches * tc.batch_size, unit="row", unit_scale=True,
                       desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not (self.progress and ranks.is_main), file=sys.stderr,
                       leave=False)
            t0, probe_seconds = time.perf_counter(), 0.0
            for i in range(pg.batches, steps):
                batch, drawn = streams.draw(plan[i], cursor, epoch)
                # the drawn sources' tasks only: the others have no label in this batch
                tasks = [n for n in names if any(n in own[s] for s in drawn)]
                # one small all-reduce a step: rows, the checkpoint decision, labelled rows per task
                local = [float(len(batch["cat"])), float(checkpoint_due())]
                local += [float((~torch.isnan(batch[f"label:{t}"])).sum()) for t in loss_tasks]
                counts = ranks.sum(torch.tensor(local, dtype=torch.float64)).tolist()
                batch = to_device(batch, device)
                lr = tc.lr * schedule.factor(epoch, i, steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                with autocast:
                    raw = model(batch, tasks)
                    types = {t: ty for t, ty in self.loss_types.items() if t in tasks}
                    loss_counts = dict(zip(loss_tasks, counts[2:], strict=True))
                    losses = task_losses(model, types, raw, batch, loss_counts)
                pg.batches = i + 1
                if losses:
                    values = _global_values(losses, ranks)
                    if probe.due(i):  # off the clock: diagnostics are not training throughput
                        tp = time.perf_counter()
                        probe.record(losses, model.trunk.last_gates)
                        probe_seconds += time.perf_counter() - tp
                    tp = time.perf_counter()
                    for hook in self.step_hooks:  # e.g. compare --affinity's lookahead probe
                        hook(model, batch, losses, pg.step)
                    probe_seconds += time.perf_counter() - tp
                    ctx = StepContext(shared=shared, epoch=epoch, step=pg.step, specific=specific, rep=model.last_encoding,
                                      ranks=ranks, values=values, loss_scale=scaler.get_scale() if scaler is not None else 1.0,
                                      tables=tables)
                    for t, w in weighting.backward(losses, ctx).items():
                        acc = pg.weights.setdefault(t, [0.0, 0])
                        acc[0], acc[1] = acc[0] + w, acc[1] + 1
                    row_sparse(tables)
                    ranks.sum_gradients(params, sparse=tables)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    weighting.after_step(functools.partial(self._losses_after, model, batch, tasks, types, loss_counts, autocast, ranks))
                    pg.step += 1
                    pg.rows += int(counts[0])
                    for t, v in values.items():
                        pg.ema[t] = v if t not in pg.ema else 0.95 * pg.ema[t] + 0.05 * v
                    tracker.step(pg.step, pg.ema)
                bar.update(int(counts[0]))
                if pg.step % 20 == 0:
                    bar.set_postfix({f"loss_{t}": f"{v:.4f}" for t, v in pg.ema.items()}, refresh=False)
                if counts[1] > 0 and i + 1 < steps:  # mid-epoch checkpoint
                    pg.seconds += time.perf_counter() - t0 - probe_seconds
                    pg.probe = probe.state()
                    save()
                    t0, probe_seconds = time.perf_counter(), 0.0
            pg.seconds += time.perf_counter() - t0 - probe_seconds
            bar.close()
            val = self.evaluate_sources(model, val_parts)
            score = monitor_value(tc.monitor, val.metrics, self.task_types)
            if not np.isfinite(score):
                raise RankerError(self._undefined_monitor(sources, val.metrics))
            diag = probe.summary()
            record = {"epoch": epoch + 1, "train_loss": dict(pg.ema), "val": val.metrics, "monitor": score,
                      "lr": opt.param_groups[0]["lr"],
                      "weights": {t: s / n for t, (s, n) in pg.weights.items()}, "diagnostics": diag,
                      "sources": {src.name: {"batches": int(n), "rows": sizes[k], "pass": cursor.passes[k] + 1, "rate": float(rates[k])}
                                  for k, (src, n) in enumerate(zip(sources, plan.sum(0), strict=True))}}
            pg.history.append(record)
            tracker.epoch(pg.step, record, pg.rows / max(pg.seconds, 1e-9))
            self.log(f"epoch {epoch + 1}: " + _fmt(val.metrics) + f" | monitor {score:.5f}")
            if diag["batches"]:
                self.log(f"  diagnostics: {format_diagnostics(diag)}")
            if len(sources) > 1:
                self.log(f"  {steps} steps: " + ", ".join(
                    f"{k} {v['batches']} {'sub-batches of ' + format(v['rows'], ',') + ' rows' if mix == 'rows' else 'batches'} (in pass {v['pass']})"
                    for k, v in record["sources"].items()))
            stop = False
            line = schedule.end_of_epoch(score > pg.best)
            if line:
                self.log(line)
            if score > pg.best:
                pg.best, pg.best_epoch, pg.bad_epochs = score, epoch + 1, 0
                pg.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                pg.best_val = {"metrics": val.metrics, "scores": {t: torch.from_numpy(s.copy()) for t, s in val.scores.items()}}
            else:
                pg.bad_epochs += 1
                if pg.bad_epochs >= tc.patience:
                    self.log(f"early stop: no gain for {tc.patience} epochs; keeping epoch {pg.best_epoch}")
                    stop = True
            pg.epoch, pg.batches, pg.ema, pg.weights, pg.probe = epoch + 1, 0, {}, {}, None
            if stop:
                pg.epoch = tc.epochs  # a resumed run goes straight to the end
            if tc.checkpoint is not None:
                save()
            if stop:
                break
        tracker.close()

        if pg.best_state is not None:
            model.load_state_dict(pg.best_state)
        # no second pass over val: the best epoch's evaluation is the restored model's
        if pg.best_val is not None:
            val = EvalResult(pg.best_val["metrics"], {t: s.numpy() for t, s in pg.best_val["scores"].items()})
        else:
            val = self.evaluate_sources(model, val_parts)
        streams.close()
        test_parts = [(Loader(src.test, featurizer, src.tasks, EVAL_BATCH, pin=pin), src.tasks,
                       plan_units(src.test.units, ranks.world)[ranks.rank]) for src in sources if src.test is not None]
        test = self.evaluate_sources(model, test_parts).metrics if test_parts else {}
        reference = {t: reference_histogram(s) for t, s in val.scores.items()}
        metrics = {
            "val": val.metrics,
            "test": test,
            "throughput": {"train_rows_per_second": pg.rows / max(pg.seconds, 1e-9), "ranks": ranks.world},
            "best_epoch": pg.best_epoch,
            "history": pg.history,
        }
        version = ""
        if ranks.is_main:
            model.to("cpu")
            version = save_bundle(out, cfg, featurizer, model, reference, metrics)
        version = ranks.broadcast_object(version)
        return TrainResult(out, version, metrics, pg.history)


def _fmt(metrics: dict[str, dict[str, float]]) -> str:
    parts = []
    for t, m in metrics.items():
        parts.append(t + " " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "count"))
    return " | ".join(parts)


def format_metrics(metrics: dict[str, dict[str, float]]) -> Iterable[str]:
    """Human-readable lines, one per task."""
    for t, m in metrics.items():
        yield f"  {t:<12} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
