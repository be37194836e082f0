"""Streaming Parquet input: files, labels, a bounded shuffle buffer and background featurizing.

Nothing here holds the whole data set: files are read record batch by record batch with column
projection, featurized in a background thread, and shuffled inside a buffer of at most
``shuffle_buffer`` rows (plus one chunk). File and row-group order are shuffled per epoch too.
"""

from __future__ import annotations

import glob
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ranker.config import TaskSpec
from ranker.errors import RankerError
from ranker.features import Batch, Featurizer, bag_pads, concat_batches

CHUNK_ROWS = 65_536  # rows per record batch read from Parquet


@dataclass(frozen=True)
class Unit:
    """Rows of one Parquet row group, the unit of the data plan: a whole group as the footers
    list it, or the piece of one that the plan gives a rank when the group straddles two
    ranks' shares."""

    file: int  # index into ParquetSource.files
    group: int  # row group within the file
    rows: int
    start: int = 0  # first row of the piece within the group


def plan_units(units: Sequence[Unit], world: int, seed: int | None = None, epoch: int = 0) -> list[list[Unit]]:
    """Deal the rows to ``world`` ranks: disjoint shares, equal to within one row.

    The row groups are laid end to end (shuffled per epoch with ``seed``, for training; in
    file order without, for evaluation) and rank r takes rows [r n / world, (r + 1) n / world)
    of that sequence. A group that straddles a boundary is split between the two ranks, each
    reading the group and keeping its piece, so at most ``world - 1`` groups are read twice a
    pass and no rank idles for want of rows: with a few large row groups, dealing whole groups
    left a rank up to one group short, and every other rank's rows past its share sat the
    epoch out. The plan depends only on (units, world, seed, epoch), so every rank computes
    the same one from the file footers without talking to the others.

    Example:
        >>> us = [Unit(0, g, r) for g, r in enumerate([100, 100, 100])]
        >>> [[(u.group, u.start, u.rows) for u in share] for share in plan_units(us, 2)]
        [[(0, 0, 100), (1, 0, 50)], [(1, 50, 50), (2, 0, 100)]]
    """
    order = list(units)
    if seed is not None:
        rng = np.random.default_rng([seed, epoch])
        order = [order[i] for i in rng.permutation(len(order))]
    total = sum(u.rows for u in order)
    bounds = [r * total // world for r in range(world + 1)]
    shares: list[list[Unit]] = [[] for _ in range(world)]
    pos, r = 0, 0
    for u in order:
        lo, end = pos, pos + u.rows
        while lo < end:
            while bounds[r + 1] <= lo:  # ranks whose share is already full (or empty)
                r += 1
            cut = min(end, bounds[r + 1])
            shares[r].append(u if cut - lo == u.rows else Unit(u.file, u.group, cut - lo, u.start + lo - pos))
            lo = cut
        pos = end
    return shares


def _hidden(path: Path, below: Path) -> bool:
    """A name under ``below`` starting with ``.`` or ``_``: writers' temporary and bookkeeping
    entries (``_temporary/``, ``_SUCCESS``, ``.part-0.parquet.crc``), never data."""
    return any(part.startswith((".", "_")) for part in path.relative_to(below).parts)


def _parquet_below(folder: Path) -> list[Path]:
    """Every ``*.parquet`` file in ``folder`` and its sub-folders (partitioned layouts such as
    ``date=2024-01-01/part-0.parquet``), hidden entries skipped."""
    return [f for f in folder.rglob("*.parquet") if f.is_file() and not _hidden(f, folder)]


def resolve_files(spec: str, key: str) -> list[Path]:
    """A file, a folder (its *.parquet files, sub-folders included) or a glob (``**`` matches
    any depth; a folder it matches counts as that folder) -> sorted Parquet files, each once.

    Raises:
        RankerError: nothing found, naming ``key`` and ``spec``.
    """
    p = Path(spec)
    if p.is_dir():
        files = _parquet_below(p)
    elif p.is_file():
        files = [p]
    else:
        files = []
        fixed = Path(*[q for q in itertools.takewhile(lambda q: not glob.has_magic(q), p.parts)])
        for m in map(Path, glob.glob(spec, recursive=True)):
            if _hidden(m, fixed):
                continue
            files += _parquet_below(m) if m.is_dir() else [m] if m.is_file() else []
    if not files:
        raise RankerError(f"{key}: no Parquet files found at {spec}")
    return sorted(set(files))


def check_disjoint_splits(splits: Mapping[str, Sequence[Path]]) -> None:
    """Refuse a file read by two splits of one source (``data.train`` a folder above
    ``data.val``'s, say): val and test metrics would be measured on training rows.

    Raises:
        RankerError: naming the file and both keys.
    """
    seen: dict[Path, str] = {}
    for key, files in splits.items():
        for f in files:
            r = f.resolve()
            if r in seen and seen[r] != key:
                raise RankerError(f"{key}: {f} is also read by {seen[r]}; the splits must not share files")
            seen.setdefault(r, key)


def label_columns(tasks: Sequence[TaskSpec]) -> list[str]:
    cols: list[str] = []
    for t in tasks:
        for c in (t.label, t.mask):
            if c and c not in cols:
                cols.append(c)
    return cols


class ParquetSource:
    """A set of Parquet files read as one stream of record batches.

    Args:
        spec: file, directory or glob.
        key: where ``spec`` came from (e.g. ``data.train``), for error messages.
        required: columns every file must have.
    """

    def __init__(self, spec: str, key: str, required: Sequence[str]) -> None:
        self.key = key
        self.files = resolve_files(spec, key)
        self.num_rows = 0
        self.schema: pa.Schema | None = None  # the first file's, null-typed columns typed as in a later file
        self.schemas: list[pa.Schema] = []  # every file's, in file order
        self.units: list[Unit] = []  # every non-empty row group, in file order (from the footers)
        for i, f in enumerate(self.files):
            try:
                meta = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise RankerError(f"{f}: not a readable Parquet file ({e})") from None
            schema = meta.schema_arrow
            for c in required:
                if schema.get_field_index(c) < 0:
                    raise RankerError(f"{f}: missing column {c!r} ({key})")
            self.schema = self.schema or schema
            self.schemas.append(schema)
            self.num_rows += meta.metadata.num_rows
            md = meta.metadata
            self.units += [Unit(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups) if md.row_group(g).num_rows]
        if self.num_rows == 0:
            raise RankerError(f"{key}: {spec} holds no rows")
        self.schema = _merged_nulls(self.schemas)

    def check_files(self, featurizer: Featurizer) -> None:
        """Check every file's schema, not just the first's, against ``featurizer``: a column
        of another type in a later file would fail mid-epoch, or (int codes in one file,
        their digits as strings in another) hash the same value into other buckets."""
        for f, schema in zip(self.files, self.schemas, strict=True):
            featurizer.check_compatible(schema, str(f))

    def fingerprint(self) -> list[list[object]]:
        """What identifies the data for a resume: each file's path, size and row groups."""
        sizes = {i: f.stat().st_size for i, f in enumerate(self.files)}
        return [[str(f), sizes[i], [u.rows for u in self.units if u.file == i]] for i, f in enumerate(self.files)]

    def batches(
        self, columns: Sequence[str], rng: np.random.Generator | None = None, units: Sequence[Unit] | None = None
    ) -> Iterator[tuple[Path, pa.RecordBatch]]:
        """Yield (file, record batch) with only ``columns``, row group by row group: ``units`` in
        their order (a rank's plan), else every row group, shuffled if ``rng``."""
        if units is None:
            units = self.units
            if rng is not None:
                units = [units[i] for i in rng.permutation(len(units))]
        pf, open_file = None, -1
        for u in units:
            if u.file != open_file:
                pf, open_file = pq.ParquetFile(self.files[u.file]), u.file
            assert pf is not None
            at, stop = 0, u.start + u.rows  # a piece of the group: its rows [start, stop) only
            reader = pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=[u.group], columns=list(columns))
            while True:
                try:
                    rb = next(reader)
                except StopIteration:
                    break
                except (OSError, pa.ArrowInvalid) as e:  # a corrupt page: a one-line error, on every rank
                    raise RankerError(f"{self.files[u.file]}: row group {u.group} cannot be read ({e})") from None
                lo, hi = max(u.start - at, 0), min(stop - at, rb.num_rows)
                at += rb.num_rows
                if hi > lo:
                    yield self.files[u.file], rb if hi - lo == rb.num_rows else rb.slice(lo, hi - lo)
                if at >= stop:
                    break


def _merged_nulls(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """The first schema with each column of Arrow type null (all missing in that file) given
    the type the column has in the first file where it is not null, if any."""
    first = schemas[0]
    for i, field in enumerate(first):
        if pa.types.is_null(field.type):
            typed = next((s.field(field.name) for s in schemas[1:] if s.get_field_index(field.name) >= 0
                          and not pa.types.is_null(s.field(field.name).type)), None)
            if typed is not None:
                first = first.set(i, typed)
    return first


def label_values(col: pa.Array | pa.ChunkedArray, where: str, name: str) -> np.ndarray:
    """A label or mask column -> float64, NaN where null. An all-null column of Arrow type
    null (how writers store a partition without the value) is all NaN; int64 past 2**53
    rounds, as a number should (a checked cast raised a traceback on a sentinel like
    INT64_MIN; the binary check then names the value).

    Raises:
        RankerError: a non-numeric column, naming ``where`` and the column.
    """
    t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), np.nan)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise RankerError(f"{where}: label column {name!r} has type {t}; labels must be numeric")
    return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)


def extract_labels(rb: pa.RecordBatch, tasks: Sequence[TaskSpec], where: str) -> Batch:
    """``label:<task>`` (B,) float32 per task, NaN where the row adds nothing to that task:
    its label is null/NaN, or its mask column is not 1. Binary labels must be 0 or 1."""
    out: Batch = {}
    for t in tasks:
        if t.label is None:  # a product task: derived below from its factors
            continue
        y = label_values(rb.column(t.label), where, t.label)
        if np.isinf(y).any():  # NaN or null is "unlabelled"; an infinite label is broken data
            raise RankerError(f"{where}: column {t.label!r} has value {y[np.isinf(y)][0]:g}; task {t.name!r} needs finite "
                              "labels (null or NaN where a row has none)")
        if t.type == "binary":
            bad = np.isfinite(y) & (y != 0) & (y != 1)
            if bad.any():
                raise RankerError(f"{where}: column {t.label!r} has value {y[bad][0]:g}; binary task {t.name!r} needs 0 or 1")
        elif t.transform == "log1p" and (y < 0).any():  # log1p of a negative label was clamped to 0 unseen
            raise RankerError(f"{where}: column {t.label!r} has value {y[y < 0][0]:g}; task {t.name!r} learns log1p(label), "
                              "which needs labels >= 0 (drop transform: log1p for signed targets)")
        y = np.where(np.isfinite(y), y, np.nan)
        if t.mask:
            m = label_values(rb.column(t.mask), where, t.mask)
            y = np.where(m == 1, y, np.nan)
        out[f"label:{t.name}"] = torch.from_numpy(y.astype(np.float32))
    for t in tasks:
        if t.product:  # ESMM: 0 once any factor is 0 (no click, no conversion), NaN if still unknown
            ys = torch.stack([out[f"label:{f}"] for f in t.product])  # (k, B)
            y = torch.where(torch.isnan(ys).any(0), torch.nan, ys.prod(0))
            out[f"label:{t.name}"] = torch.where((ys == 0).any(0), 0.0, y)
    return out


def _background(make: Callable[[], Iterator[Batch]], depth: int) -> Iterator[Batch]:
    """Iterate ``make()`` in a daemon thread, ``depth`` items ahead; errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for c in make():
                if stop.is_set():
                    return
                q.put(c)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while th.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.01)


def _take(batch: Batch, idx: torch.Tensor | slice) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


class Loader:
    """Featurized, labelled mini-batches from a ParquetSource.

    Args:
        source: the files.
        featurizer: the fitted featurizer.
        tasks: tasks whose labels to attach.
        batch_size: rows per mini-batch.
        shuffle_buffer: rows held for shuffling (training); 0 keeps file order (evaluation).
        labels: attach labels (False for scoring unlabelled data).
        pin: hand out batches in page-locked memory (for asynchronous copies to a GPU).
        unlabelled: tasks not labelled in this source (multi-source training): their
            ``label:<task>`` is all NaN, so every source's batches carry the same keys.
    """

    def __init__(
        self,
        source: ParquetSource,
        featurizer: Featurizer,
        tasks: Sequence[TaskSpec],
        batch_size: int,
        shuffle_buffer: int = 0,
        labels: bool = True,
        pin: bool = False,
        unlabelled: Sequence[str] = (),
    ) -> None:
        self.source, self.featurizer, self.tasks, self.pin = source, featurizer, list(tasks), pin
        self.unlabelled = list(unlabelled)
        self.batch_size, self.shuffle_buffer, self.labels = batch_size, shuffle_buffer, labels
        cols = featurizer.columns + (label_columns(tasks) if labels else [])
        self.columns = list(dict.fromkeys(cols))
        self.pads = bag_pads(featurizer.features)

    def _chunks(self, rng: np.random.Generator | None, units: Sequence[Unit] | None = None) -> Iterator[Batch]:
        for f, rb in self.source.batches(self.columns, rng, units):
            chunk = self.featurizer.transform(rb)
            if self.labels:
                chunk.update(extract_labels(rb, self.tasks, str(f)))
                for t in self.unlabelled:
                    chunk[f"label:{t}"] = torch.full((rb.num_rows,), float("nan"))
            yield chunk

    def _prefetched(self, rng: np.random.Generator | None, units: Sequence[Unit] | None = None, depth: int = 2) -> Iterator[Batch]:
        """Run ``_chunks`` in a background thread (Arrow and numpy release the GIL)."""
        return _background(lambda: self._chunks(rng, units), depth)

    def __call__(
        self,
        seed: int | None = None,
        units: Sequence[Unit] | None = None,
        part: tuple[int, int] | None = None,
        skip: int = 0,
        limit: int | None = None,
    ) -> Iterator[Batch]:
        """One pass. With ``seed`` (and a shuffle buffer) rows come in a seeded random order.

        Args:
            seed: shuffle seed; None keeps file order.
            units: the row groups to read, in order (a rank's plan); default all of them
                (shuffled when ``seed`` is given).
            part: (rank, world): yield only this rank's even slice of every batch, so the ranks
                together see exactly the batches of one process.
            skip: batches to pass over without yielding (resuming inside an epoch: the stream,
                shuffle buffer included, is replayed exactly up to the cursor).
            limit: stop after this many batches (counting the skipped ones).
        """
        out = self._sliced(seed, units, part, skip, limit)
        if self.pin:  # page-locked copies made in another thread: the trainer's host-to-GPU
            return _background(lambda: ({k: v.pin_memory() for k, v in b.items()} for b in out), 2)  # copies overlap
        return out

    def _sliced(
        self, seed: int | None, units: Sequence[Unit] | None, part: tuple[int, int] | None, skip: int, limit: int | None
    ) -> Iterator[Batch]:
        for i, batch in enumerate(self._batches(seed, units)):
            if limit is not None and i >= limit:
                return
            if i < skip:
                continue
            if part is not None:
                rank, world = part
                n = len(batch["cat"])
                batch = _take(batch, slice(rank * n // world, (rank + 1) * n // world))
            yield batch

    def _batches(self, seed: int | None, units: Sequence[Unit] | None) -> Iterator[Batch]:
        shuffle = seed is not None and self.shuffle_buffer > 0
        rng = np.random.default_rng(seed) if shuffle else None
        gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
        buf: list[Batch] = []
        rows = 0
        for chunk in self._prefetched(rng, units):
            buf.append(chunk)
            rows += len(chunk["cat"])
            if rows < (self.shuffle_buffer if shuffle else self.batch_size):
                continue
            merged = concat_batches(buf, self.pads) if len(buf) > 1 else buf[0]
            if shuffle:
                merged = _take(merged, torch.randperm(rows, generator=gen))
            full = rows - rows % self.batch_size
            for i in range(0, full, self.batch_size):
                yield _take(merged, slice(i, i + self.batch_size))
            buf = [_take(merged, slice(full, rows))] if full < rows else []
            rows -= full
        if rows:
            merged = concat_batches(buf, self.pads) if len(buf) > 1 else buf[0]
            if shuffle:
                merged = _take(merged, torch.randperm(rows, generator=gen))
            for i in range(0, rows, self.batch_size):
                yield _take(merged, slice(i, i + self.batch_size))
