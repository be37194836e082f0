"""Several data sources and the task sampler: tasks that read their own logs.

A *source* is one ``{train, val, test}`` data set and the tasks labelled in it: the top-level
``data`` for every task without ``data`` of its own, and one more source per distinct
``tasks[].data`` (click logs for ctr, purchase logs for cvr, ...). A product task (ESMM) lives
in its factors' source. In a source only its own tasks are labelled; every other task's label is
NaN there (left out of the loss), whether or not the files happen to hold that column, so a
filtered log (purchases: clicked rows only) never teaches a task it was not chosen for. A source
must hold every feature column and its own tasks' label columns.

Every step's batch draws on the sources at the sampler's rates r_s (``SAMPLERS``, from the
sources' train rows), in one of two ways (``train.task_sampling.mix``):

- ``rows`` (the default): every batch holds rows of every source, a sub-batch of
  b_s = round(r_s * B) rows from each (largest remainder, at least one row per source; under
  row-group sharding per rank, from the rank's B / world), concatenated. Each task's loss covers
  the rows labelled for it, as in a batch of one pooled log, so under proportional rates this is
  training on the pooled logs: a small source's tasks take a step every step on about as many
  rows as they would have had there.
- ``batches``: every batch is one source's B rows; source s supplies exactly round(r_s * S) of
  the epoch's S steps (largest remainder), in an order shuffled by a generator seeded with
  (seed, epoch). A small source's tasks then step on a share r_s of the steps only.

Both are one plan per epoch (``plan_steps``: which sources every step draws on), a function of
(rates, steps, seed, epoch) alone, so every rank computes the same one and all ranks draw the
same sources at every step. An epoch is as many rows as one pass over every source:
``S = ceil(sum_s steps_s * b_s / B)`` steps, where ``steps_s`` are the sub-batches of b_s rows
(``batches``: b_s = B) in one pass over source s, after row-group sharding the ones every rank
can take. Each source is an endless stream of passes, each reshuffled (row-group plan and
shuffle buffer), whose position carries over epoch boundaries: under proportional rates every
epoch is about one pass over every source; under temperature or uniform rates small sources
repeat within an epoch and large ones are seen partly, but no row is favoured over another of
its source across the run.

The cursor of a run (``SourceCursor``: pass and batches consumed per source) is what a
checkpoint stores besides the epoch and step, so a resume replays every stream exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ranker.config import DataConfig, RankerConfig, TaskSampling, TaskSpec
from ranker.errors import RankerError
from ranker.features import concat_batches
from ranker.training.data import (
    Loader,
    ParquetSource,
    Unit,
    check_disjoint_splits,
    label_columns,
    plan_units,
)

SOURCE_SEED_STRIDE = 7_777_777  # source s shuffles with seed + s * stride (source 0: the seed itself)


# ----- the sampler registry ----------------------------------------------------------------------
def proportional(rows: np.ndarray, params: TaskSampling) -> np.ndarray:
    """r_s = n_s / sum n: every row equally likely (the mix of one pooled data set)."""
    return rows / rows.sum()


def uniform(rows: np.ndarray, params: TaskSampling) -> np.ndarray:
    """r_s = 1 / k: every source equally often, whatever its size."""
    return np.full(len(rows), 1.0 / len(rows))


def temperature(rows: np.ndarray, params: TaskSampling) -> np.ndarray:
    """r_s = n_s^(1/T) / sum n^(1/T) (Raffel et al., JMLR 2020, T5's temperature mixing):
    T = 1 is proportional, T -> inf uniform. Computed in the log domain (n^(1/T) of 1e9 rows)."""
    assert params.temperature is not None  # the config requires it with this strategy
    z = np.log(rows) / params.temperature
    w = np.exp(z - z.max())
    return w / w.sum()


SAMPLERS: dict[str, Callable[[np.ndarray, TaskSampling], np.ndarray]] = {
    "proportional": proportional,
    "uniform": uniform,
    "temperature": temperature,
}


def sampling_rates(rows: Sequence[int], params: TaskSampling) -> np.ndarray:
    """Each source's share of the batches, from its train rows.

    Example:
        >>> sampling_rates([900, 100], TaskSampling(strategy="temperature", temperature=2.0)).round(3).tolist()
        [0.75, 0.25]
    """
    if params.strategy not in SAMPLERS:
        raise RankerError(f"train.task_sampling.strategy: unknown strategy {params.strategy!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[params.strategy](np.asarray(rows, dtype=np.float64), params)


def quotas(rates: np.ndarray, steps: int) -> np.ndarray:
    """Whole batches per source summing to ``steps``: floor(r_s * steps) plus one for the
    largest remainders (ties to the lower index).

    Example:
        >>> quotas(np.array([0.5, 0.3, 0.2]), 7).tolist()
        [4, 2, 1]
    """
    exact = rates * steps
    q = np.floor(exact).astype(np.int64)
    rest = exact - q
    order = sorted(range(len(q)), key=lambda i: (-rest[i], i))
    for i in order[: steps - int(q.sum())]:
        q[i] += 1
    return q


def schedule(rates: np.ndarray, steps: int, seed: int, epoch: int) -> np.ndarray:
    """The source of every step of one epoch (``mix: batches``): ``quotas`` in a seeded random
    order. A function of its arguments only, so every rank holds the same one and a resume
    recomputes it.

    Example:
        >>> s = schedule(np.array([0.75, 0.25]), 8, seed=0, epoch=0)
        >>> sorted(s.tolist())
        [0, 0, 0, 0, 0, 0, 1, 1]
    """
    order = np.repeat(np.arange(len(rates)), quotas(rates, steps))
    if len(rates) > 1:
        order = order[np.random.default_rng([seed, epoch, 0x5A3D]).permutation(steps)]
    return order


def sub_batches(rates: np.ndarray, rows: int, key: str = "train.batch_size") -> np.ndarray:
    """Rows per source in a batch of ``rows`` (``mix: rows``): ``quotas`` of the rows, and a
    source the rounding left empty gets one row from the largest share, so every source's
    tasks are in every batch.

    Raises:
        RankerError: fewer rows than sources.

    Example:
        >>> sub_batches(np.array([0.95, 0.05]), 1024).tolist()
        [973, 51]
        >>> sub_batches(np.array([0.999, 0.001]), 100).tolist()
        [99, 1]
    """
    if rows < len(rates):
        raise RankerError(f"{key}: {rows} rows cannot hold a sub-batch of each of {len(rates)} sources "
                          "(train.task_sampling.mix: rows); raise it or use mix: batches")
    q = quotas(rates, rows)
    for i in np.flatnonzero(q == 0):
        q[int(np.argmax(q))] -= 1
        q[i] = 1
    return q


def batch_rows(rates: np.ndarray, batch_size: int, world: int, row_groups: bool, mix: str) -> tuple[list[int], list[int]]:
    """(b_s, reads_s) per source: the global rows source s gives a batch it is drawn into, and
    the rows a rank's loader reads for it. Under row-group sharding each rank splits its own
    batch_size / world rows (``sub_batches``), so b_s = world * reads_s; otherwise a rank reads
    all b_s and takes its slice. ``mix: batches``: b_s = batch_size.

    Example:
        >>> batch_rows(np.array([0.9, 0.1]), 1000, 2, True, "rows")
        ([900, 100], [450, 50])
        >>> batch_rows(np.array([0.9, 0.1]), 1000, 2, False, "batches")
        ([1000, 1000], [1000, 1000])
    """
    local = batch_size // world if row_groups else batch_size
    if mix == "rows":
        key = f"train.batch_size / {world} ranks" if row_groups and world > 1 else "train.batch_size"
        reads = [int(b) for b in sub_batches(rates, local, key)]
    else:
        reads = [local] * len(rates)
    return [b * world if row_groups else b for b in reads], reads


def plan_steps(rates: np.ndarray, steps: int, seed: int, epoch: int, mix: str) -> np.ndarray:
    """Which sources every step of an epoch draws on: a (steps, sources) boolean array, every
    row all True under ``mix: rows``, one True (``schedule``) under ``mix: batches``.

    Example:
        >>> plan_steps(np.array([0.5, 0.5]), 2, seed=0, epoch=0, mix="rows").tolist()
        [[True, True], [True, True]]
        >>> plan_steps(np.array([0.5, 0.5]), 4, seed=0, epoch=0, mix="batches").sum(0).tolist()
        [2, 2]
    """
    if mix == "rows":
        return np.ones((steps, len(rates)), dtype=bool)
    return np.eye(len(rates), dtype=bool)[schedule(rates, steps, seed, epoch)]  # the config admits rows | batches only


# ----- sources -----------------------------------------------------------------------------------
@dataclass
class TaskSource:
    """One data set and the tasks labelled in it.

    Args:
        name: the config key it comes from (``data`` or ``tasks[cvr].data``).
        tasks: the tasks labelled here.
        train, val, test: the opened splits (``test`` may be None).
    """

    name: str
    tasks: list[TaskSpec]
    train: ParquetSource
    val: ParquetSource
    test: ParquetSource | None

    def splits(self) -> Iterator[ParquetSource]:
        yield self.train
        yield self.val
        if self.test is not None:
            yield self.test


def source_groups(cfg: RankerConfig) -> list[tuple[str, DataConfig, list[TaskSpec]]]:
    """(config key, data, tasks labelled there) per source, in order of the first task reading
    it; a product task goes with its factors (the config checks they share one source).

    Example:
        >>> from ranker.config import parse_config
        >>> cfg = parse_config({"data": {"train": "clicks", "val": "clicks_val"},
        ...     "features": [{"name": "price", "type": "dense"}],
        ...     "tasks": [{"name": "ctr", "type": "binary", "label": "click"},
        ...               {"name": "cvr", "type": "binary", "label": "conversion", "data": {"train": "conv", "val": "conv_val"}}]})
        >>> [(key, d.train, [t.name for t in ts]) for key, d, ts in source_groups(cfg)]
        [('data', 'clicks', ['ctr']), ('tasks[cvr].data', 'conv', ['cvr'])]
    """
    homes: dict[DataConfig, tuple[str, list[TaskSpec]]] = {}
    by_name = {t.name: t for t in cfg.tasks}
    for t in cfg.tasks:
        data = by_name[t.product[0]].data if t.product else t.data
        key = "data" if data is None or data == cfg.data else f"tasks[{t.name}].data"
        homes.setdefault(data or cfg.data, (key, []))[1].append(t)
    return [(key, d, tasks) for d, (key, tasks) in homes.items()]


def task_sources(cfg: RankerConfig) -> list[TaskSource]:
    """Group the tasks by the data they read and open each source's splits; every file must
    hold the feature columns and the label columns of the source's own tasks.

    The source of the first task comes first; with no ``tasks[].data`` anywhere the result is
    the one top-level source, as before multi-source training.

    Raises:
        RankerError: a file lacks a column (one line naming the file and the column).
    """
    features = [f.source for f in cfg.features]
    out = []
    for key, d, tasks in source_groups(cfg):
        cols = list(dict.fromkeys(features + label_columns(tasks)))
        train = ParquetSource(d.train, f"{key}.train", cols)
        val = ParquetSource(d.val, f"{key}.val", cols)
        test = ParquetSource(d.test, f"{key}.test", cols) if d.test else None
        check_disjoint_splits({s.key: s.files for s in (train, val, test) if s is not None})
        out.append(TaskSource(key, tasks, train, val, test))
    return out


# ----- the streams -------------------------------------------------------------------------------
@dataclass
class SourceCursor:
    """Where every source's stream stands: pass number and batches consumed in that pass."""

    passes: list[int]
    batches: list[int]

    @classmethod
    def start(cls, n: int) -> SourceCursor:
        return cls([0] * n, [0] * n)

    def state(self) -> dict:
        return {"passes": list(self.passes), "batches": list(self.batches)}


@dataclass
class Streams:
    """Each rank's batches from every source, in lock-step with the other ranks.

    Args:
        sources: the task sources, in order.
        loaders: one training Loader per source (its own tasks labelled, the others NaN).
        seed: train.seed.
        rank, world: this rank and the number of ranks.
        batch_size: the global batch B.
        sizes: the global rows each source gives a batch it is drawn into (b_s; ``mix:
            batches``: B); under row-group sharding each rank takes b_s / world of them.
        row_groups: shard each pass's row groups across ranks (``plan_units``); else every rank
            reads the whole stream and takes its slice of each global batch.
        log: where notes on row groups left out of a pass go.

    Each step the trainer asks ``draw(plan[i], cursor, epoch)``; see ``Trainer._run``.
    """

    sources: list[TaskSource]
    loaders: list[Loader]
    seed: int
    rank: int
    world: int
    batch_size: int
    sizes: list[int]
    row_groups: bool
    log: Callable[[str], None] = print
    _open: dict[int, tuple[int, Iterator]] = field(default_factory=dict)  # source -> (pass, iterator)
    _plans: dict[tuple[int, int], list[list[Unit]]] = field(default_factory=dict)  # (source, pass) -> plan
    _steps: dict[tuple[int, int], int] = field(default_factory=dict)  # (source, pass) -> steps

    def _seed(self, s: int) -> int:
        return self.seed + SOURCE_SEED_STRIDE * s

    def plan(self, s: int, p: int) -> list[list[Unit]]:
        """The row-group plan of pass ``p`` of source ``s`` (asked for every step: cached)."""
        if (s, p) not in self._plans:
            if len(self._plans) > 4 * len(self.sources):  # only the passes in progress matter
                self._plans.clear()
                self._steps.clear()
            self._plans[(s, p)] = plan_units(self.sources[s].train.units, self.world, seed=self._seed(s), epoch=p)
        return self._plans[(s, p)]

    def steps(self, s: int, p: int) -> int:
        """Batches every rank takes in pass ``p`` of source ``s``."""
        if not self.row_groups:
            return -(-self.sources[s].train.num_rows // self.sizes[s])
        if (s, p) not in self._steps:
            local = self.sizes[s] // self.world
            self._steps[(s, p)] = min(-(-sum(u.rows for u in share) // local) for share in self.plan(s, p))
        return self._steps[(s, p)]

    def epoch_steps(self, epoch: int) -> int:
        """S: as many rows as one pass over every source (each source's pass numbered ``epoch``),
        ceil(sum_s steps_s * b_s / B); with every b_s = B (``mix: batches``) the sum of the steps."""
        rows = sum(self.steps(s, epoch) * self.sizes[s] for s in range(len(self.sources)))
        return -(-rows // self.batch_size)

    def _iterator(self, s: int, p: int, skip: int, what: str) -> Iterator:
        loader = self.loaders[s]
        seed = self._seed(s) * 1_000_003 + p
        if not self.row_groups:
            return loader(seed=seed, part=(self.rank, self.world), skip=skip)
        plan, local = self.plan(s, p), self.sizes[s] // self.world
        steps = self.steps(s, p)
        rows = [sum(u.rows for u in share) for share in plan]
        dropped = sum(r - min(r, steps * local) for r in rows)
        if dropped and skip == 0:
            self.log(f"{what}: ranks hold {'/'.join(f'{r:,}' for r in rows)} rows; {dropped:,} rows past "
                     f"the common {steps} steps sit this {'epoch' if len(self.sources) == 1 else 'pass'} out "
                     f"(the plan changes every {'epoch' if len(self.sources) == 1 else 'pass'})")
        return loader(seed=seed + 7_919 * self.rank, units=plan[self.rank], skip=skip, limit=steps)

    def next(self, s: int, cursor: SourceCursor, epoch: int) -> dict:
        """Source ``s``'s next batch on this rank; advances ``cursor`` (a new pass when one ends)."""
        if cursor.batches[s] >= self.steps(s, cursor.passes[s]):
            cursor.passes[s], cursor.batches[s] = cursor.passes[s] + 1, 0
        p = cursor.passes[s]
        if self._open.get(s, (-1, None))[0] != p:
            self._close(s)
            what = f"epoch {epoch + 1}" if len(self.sources) == 1 else f"epoch {epoch + 1}: {self.sources[s].name} pass {p + 1}"
            self._open[s] = (p, self._iterator(s, p, cursor.batches[s], what))
        try:
            batch = next(self._open[s][1])
        except StopIteration:
            raise RankerError(f"{self.sources[s].name}.train: pass {p + 1} ended after {cursor.batches[s]} of "
                              f"{self.steps(s, p)} batches (files changed while training?)") from None
        cursor.batches[s] += 1
        return batch

    def draw(self, take: np.ndarray, cursor: SourceCursor, epoch: int) -> tuple[dict, list[int]]:
        """One step's batch on this rank: the next sub-batch of every source ``take`` marks,
        concatenated in source order; and those sources."""
        drawn = [int(s) for s in np.flatnonzero(take)]
        parts = [self.next(s, cursor, epoch) for s in drawn]
        return (parts[0] if len(parts) == 1 else concat_batches(parts, self.loaders[0].pads)), drawn

    def _close(self, s: int) -> None:
        _, it = self._open.pop(s, (-1, None))
        close = getattr(it, "close", None)
        if close is not None:  # a generator: its background reader stops with it
            close()

    def close(self) -> None:
        """Stop every open stream."""
        for s in list(self._open):
            self._close(s)
