"""``ranker init``: a working config from a Parquet schema and a sample of its rows.

Reads the schema of the first file and up to ``sample_rows`` rows, then decides per column:

- string (or dictionary of strings), boolean -> ``categorical``; a list of strings or integers ->
  ``multi_hot``. Hash buckets: 16x the distinct values d seen, at least 1,024 (a small table
  costs nothing) and at most 2**18; for d <= 256 at least d^2 / 2 and the first size from there
  on under which the sampled values hash without a single collision (the featurizer's own
  hash), since two merged
  values of a small vocabulary can be exactly the split that matters (on census, tax-filer
  status and household status each lost a pair at 128 and 1,024 buckets, and never-married AUC
  with them); embedding width 1.6 d^0.56 (a common
  rule of thumb for embedding sizes) clipped to [16, 32]. The floor matters: on census, widths
  of 4-11 for the small vocabularies learnt never-married markedly slower than 16.
- a column named as an identifier (``id``, ``*_id``, ``*_uid``, ``*_uuid``, ``*_guid``,
  ``*_key``, ``*_hash``, or camel case ``userId``/``itemID``) -> ``categorical`` whatever its
  type: the numeric order of user or item ids means nothing, and as a number an id would be
  one useless input where an embedding per id is what a recommender learns from. An
  identifier with every sampled value distinct is flagged in the header (a row key, such as a
  request id, is better left out with ``--exclude``).
- integer -> ``dense`` with the default encoding (quantile bins, no hand transform needed). An
  integer column with at most ``CODE_VALUES`` distinct values is often a code (industry,
  occupation, year) or a small count: it also enters as a categorical ``<column>_cat``, so the
  model can learn a per-value effect as well as the ordered one, the way trees split either.
- any table of ``SPARSE_BUCKETS`` rows or more (identifier tables, mostly) turns on
  ``train.sparse_embeddings``: a step then moves only the rows it looked up, so its cost no
  longer grows with the tables.
- float -> ``dense``. Other types (timestamps, binary, structs) and columns that are null in the
  whole sample are left out and listed in the file's header.
- each ``--label`` column: ``binary`` if its values are 0/1 (or boolean), else ``regression``
  (with ``transform: log1p`` when it is non-negative and heavy-tailed). A binary label that only
  exists under another (null wherever the other is not 1, or positive only where the other is:
  conversion only after a click) gets ``mask: <that label>``; of several candidates the one with
  the fewest positives, i.e. the closest parent.

The written YAML passes ``parse_config``; its data paths are relative to its own folder.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ranker.config import parse_config
from ranker.errors import RankerError
from ranker.features import _hash_array, value_kind
from ranker.files import usual_mode
from ranker.training.data import label_values, resolve_files

SAMPLE_ROWS = 100_000
CODE_VALUES = 64  # integer columns with at most this many distinct values also enter as a code
MAX_BUCKETS = 2**18
COLLISION_FREE_VALUES = 256  # vocabularies up to this size get collision-free buckets
# from this many rows in a table on, init turns on train.sparse_embeddings: below it a dense
# AdamW step costs the same (bench/bench_sparse.py: 1.0x at 65,536 rows, 2.3x at 262,144)
SPARSE_BUCKETS = 2**16
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test",)
# identifier columns, by name: snake case (``user_id``, ``session_key``) or camel case (``itemId``)
_ID_SNAKE = re.compile(r"(?:^|[_\-. ])(?:id|uid|uuid|guid|key|hash)$", re.IGNORECASE)  # "paid" is no id
_ID_CAMEL = re.compile(r"[a-z0-9](?:Id|ID|Uid|UID|Uuid|UUID|Guid|GUID|Key|Hash)$")


def is_identifier(column: str) -> bool:
    """Whether a column's name says it holds identifiers (``user_id``, ``itemId``, ``ID``)."""
    return bool(_ID_SNAKE.search(column) or _ID_CAMEL.search(column))


def _buckets(distinct: int) -> int:
    """The bucket count for ``distinct`` values: 16 per value in [1024, 2**18]; for a small
    vocabulary at least d^2 / 2, where a collision-free size is a few tries away."""
    d = distinct
    want = max(1024, 16 * d, d * d // 2 if d <= COLLISION_FREE_VALUES else 0)
    return int(min(MAX_BUCKETS, want))


def _collision_free_buckets(values: pa.Array, kind: str) -> int:
    """For a small vocabulary, the first bucket count from ``_buckets`` on (trying 256 sizes)
    under which the distinct ``values`` land in distinct buckets; else ``_buckets``."""
    d = len(values)
    start = _buckets(d)
    if d > COLLISION_FREE_VALUES:
        return start
    for b in range(start, min(start + 256, MAX_BUCKETS + 1)):
        if len(np.unique(_hash_array(values, kind, b))) == d:  # type: ignore[arg-type]
            return b
    return start


def _dim(distinct: int) -> int:
    return int(min(32, max(16, round(1.6 * max(distinct, 1) ** 0.56))))


def _task_name(column: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", column)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _sibling(path: Path, names: Sequence[str]) -> Path | None:
    """``.../train`` -> ``.../val`` (or ``train.parquet`` -> ``val.parquet``) when it exists."""
    stem = path.name
    if not stem.startswith("train"):
        return None
    for n in names:
        cand = path.with_name(n + stem[len("train"):])
        if cand.exists():
            return cand
    return None


def _schema(files: Sequence[Path]) -> pa.Schema:
    """The files' common schema: the first file's columns, each with a type every file's
    values convert to (int32 and int64 as int64, int and float as float). A later file that
    lacks one of them, or holds it as another kind (strings where the first has numbers), is
    an error naming both files."""
    schemas = []
    for f in files:
        try:
            schemas.append(pq.ParquetFile(f).schema_arrow)
        except (pa.ArrowInvalid, OSError) as e:
            raise RankerError(f"{f}: not a readable Parquet file ({e})") from None
    first = schemas[0]
    merged = pa.schema([first.field(n) for n in first.names])
    for f, other in zip(files[1:], schemas[1:], strict=True):
        for name in first.names:
            i = other.get_field_index(name)
            if i < 0:
                raise RankerError(f"{f}: no column {name!r}, which {files[0]} has; the files must share their columns")
            try:
                merged = pa.unify_schemas([merged, pa.schema([other.field(i)])], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise RankerError(f"{f}: column {name!r} is {other.field(i).type}, "
                                  f"{first.field(name).type} in {files[0]}") from None
    return pa.schema([merged.field(n) for n in first.names])


def _sample(files: Sequence[Path], rows: int, schema: pa.Schema) -> pa.Table:
    """Up to ``rows`` rows from the start of the files, as ``schema`` (``_schema``) says."""
    parts, n = [], 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=min(rows, 65_536), columns=schema.names):
            parts.append(pa.Table.from_batches([rb.slice(0, rows - n)]).cast(schema))
            n += min(rb.num_rows, rows - n)
            if n >= rows:
                return pa.concat_tables(parts)
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _distinct(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Distinct non-null values."""
    u = pc.unique(col)
    return u.filter(pc.is_valid(u))


def _free_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base2``, ``base3``, ... : the first not in ``taken``."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name


def _feature(name: str, col: pa.ChunkedArray, taken: set[str] = frozenset()) -> tuple[list[dict], str]:  # type: ignore[assignment]
    """The feature specs for one column, and a note on what was decided. ``taken``: names
    already in use (every column's, and the features' so far), which an extra feature of this
    column must not reuse."""
    t = col.type
    if pa.types.is_dictionary(t):
        t = t.value_type
        col = col.cast(t)
    if col.null_count == len(col):
        return [], "left out: null in the whole sample"
    string = pa.types.is_string(t) or pa.types.is_large_string(t)
    identifier = is_identifier(name) and (string or pa.types.is_integer(t))
    if identifier or string or pa.types.is_boolean(t):
        u = _distinct(col)
        b, d = _collision_free_buckets(u, value_kind(t)), len(u)  # type: ignore[arg-type]
        note = f"categorical{' (an identifier, by its name)' if identifier else ''}, {d} distinct"
        if identifier and d == len(col) - col.null_count and d > 1:
            note += "; every sampled value distinct: if it is a row key (a request id), --exclude it"
        return [{"name": name, "type": "categorical", "buckets": b, "dim": _dim(d)}], note
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        vt = t.value_type
        if not (pa.types.is_integer(vt) or pa.types.is_string(vt) or pa.types.is_large_string(vt)):
            return [], f"left out: list of {vt}"
        u = _distinct(pc.list_flatten(col))
        b, d = _collision_free_buckets(u, value_kind(vt)), len(u)  # type: ignore[arg-type]
        return [{"name": name, "type": "multi_hot", "buckets": b, "dim": _dim(d)}], f"multi_hot, {d} distinct"
    if pa.types.is_integer(t):
        u = _distinct(col)
        d = len(u)
        feats = [{"name": name, "type": "dense"}]
        if d <= CODE_VALUES:
            b = _collision_free_buckets(u, "int")
            code = _free_name(f"{name}_cat", taken)
            feats.append({"name": code, "column": name, "type": "categorical", "buckets": b, "dim": _dim(d)})
            return feats, f"dense + categorical code {code!r}, {d} distinct"
        return feats, f"dense, {d} distinct"
    if pa.types.is_floating(t):
        if is_identifier(name):  # what pandas writes for an integer id column with nulls
            return [{"name": name, "type": "dense"}], ("dense; WARNING: named as an identifier but stored as floats, "
                                                       "so it cannot be embedded: write it as int64 or string, or --exclude it")
        return [{"name": name, "type": "dense"}], "dense"
    if pa.types.is_decimal(t):  # money in exact decimals: a number to the model
        return [{"name": name, "type": "dense"}], f"dense (from {t})"
    return [], f"left out: type {t}"


def _label_values(table: pa.Table, column: str, where: str) -> np.ndarray:
    y = label_values(table.column(column), where, column)
    return np.where(np.isfinite(y), y, np.nan)


def _tasks(table: pa.Table, labels: Sequence[str], where: str) -> tuple[list[dict], list[str]]:
    ys = {c: _label_values(table, c, where) for c in labels}
    binary = {c for c, y in ys.items() if np.isin(y[~np.isnan(y)], (0.0, 1.0)).all()}
    tasks, notes = [], []
    for c in labels:
        y = ys[c]
        known = y[~np.isnan(y)]
        if known.size == 0:
            raise RankerError(f"{where}: label column {c!r} is null in every sampled row")
        task: dict = {"name": _task_name(c), "type": "binary" if c in binary else "regression", "label": c}
        if c not in binary and known.min() >= 0 and np.quantile(known, 0.99) > 20 * max(np.median(known), 1e-9):
            task["transform"] = "log1p"
        if c in binary:
            parents = []
            for p in labels:
                if p == c or p not in binary:
                    continue
                under = ys[p] == 1
                exists_only_under = (~np.isnan(y) <= under).all() and (~under).any()
                positive_only_under = ((y == 1) <= under).all() and (y == 1).any() and ((~under) & (y == 0)).any()
                if exists_only_under or positive_only_under:
                    parents.append((int((ys[p] == 1).sum()), p))
            if parents:
                task["mask"] = min(parents)[1]
        tasks.append(task)
        notes.append(f"{c}: {task['type']}" + (f", only where {task['mask']} == 1" if "mask" in task else "")
                     + (", log1p" if "transform" in task else ""))
    return tasks, notes


def infer_config(
    data: str,
    labels: Sequence[str],
    out: str | Path,
    val: str | None = None,
    test: str | None = None,
    exclude: Sequence[str] = (),
    sample_rows: int = SAMPLE_ROWS,
) -> tuple[dict, list[str]]:
    """The config ``ranker init`` writes, and the header lines explaining it.

    Args:
        data: training Parquet (file, folder or glob).
        labels: label columns, one task each.
        out: where the config will live (data paths are made relative to its folder).
        val, test: held-out data; by default a ``val``/``test`` sibling of a ``train*`` path.
        exclude: columns that are neither features nor labels (ids, weights, leaks).
        sample_rows: rows read to decide types, cardinalities and tasks.

    Example:
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> pq.write_table(pa.table({"city": ["a", "b"] * 50, "age": list(range(100)), "click": [0, 1] * 50}), "/tmp/t.parquet")
        >>> cfg, _ = infer_config("/tmp/t.parquet", ["click"], "/tmp/c.yaml")
        >>> [f["type"] for f in cfg["features"]], cfg["tasks"][0]["type"]
        (['categorical', 'dense'], 'binary')
    """
    if not labels:
        raise RankerError("--label: name at least one label column")
    files = resolve_files(data, "--data")
    schema = _schema(files)
    where = str(files[0])
    for c in [*labels, *exclude]:
        if schema.get_field_index(c) < 0:
            raise RankerError(f"{where}: no column {c!r} (columns: {', '.join(schema.names[:12])}{', ...' if len(schema.names) > 12 else ''})")
    if len(set(labels)) != len(labels):
        raise RankerError("--label: a column is named twice")
    table = _sample(files, sample_rows, schema)
    if table.num_rows == 0:
        raise RankerError(f"{data}: holds no rows")

    features, notes = [], []
    for name in schema.names:
        if name in labels or name in exclude:
            continue
        feats, note = _feature(name, table.column(name), set(schema.names) | {f["name"] for f in features})
        features += feats
        notes.append(f"{name}: {note}")
    if not features:
        raise RankerError(f"{where}: no column is usable as a feature")
    tasks, task_notes = _tasks(table, labels, where)

    base = Path(out).resolve().parent
    data_path = Path(data)
    val_path = Path(val) if val else _sibling(data_path, VAL_NAMES)
    test_path = Path(test) if test else _sibling(data_path, TEST_NAMES)
    if val_path is None:
        val_path = data_path
        notes.append("WARNING: no --val and no val/ beside the data: data.val is the training data; point it at held-out rows")

    def rel(p: Path) -> str:
        if any(ch in str(p) for ch in "*?["):
            return str(p) if p.is_absolute() else os.path.relpath(Path.cwd() / p, base)
        return os.path.relpath(p.resolve(), base)

    cfg: dict = {
        "data": {"train": rel(data_path), "val": rel(val_path), **({"test": rel(test_path)} if test_path else {})},
        "features": features,
        "tasks": tasks,
        "model": {"architecture": "mmoe", "experts": 8, "expert_dims": [128, 64], "tower_dims": [32]},
        "train": {"epochs": 30, "patience": 5, "weighting": "static"},
    }
    header = [f"written by `ranker init` from {table.num_rows:,} sampled rows of {where}", "columns:"]
    header += [f"  {n}" for n in notes] + ["tasks:"] + [f"  {n}" for n in task_notes]
    largest = max((f["buckets"] for f in features if "buckets" in f), default=0)
    if largest >= SPARSE_BUCKETS:
        cfg["train"]["sparse_embeddings"] = True
        header += ["train:", f"  sparse_embeddings: the largest table has {largest:,} rows; a step updates only the rows it looked up"]
    return cfg, header


def write_init_config(out: str | Path, cfg: dict, header: Sequence[str], force: bool = False) -> Path:
    """Validate ``cfg`` and write it atomically (refusing to replace a file unless ``force``)."""
    p = Path(out)
    if p.exists() and not force:
        raise RankerError(f"{p}: exists; pass --force to replace it")
    parse_config(cfg, "ranker init")  # what is written must load
    # every line of every note commented (a column name may hold a line break)
    text = "".join(f"# {line}\n" for h in header for line in (h.splitlines() or [""])) + yaml.safe_dump(cfg, sort_keys=False)
    if yaml.safe_load(text) != cfg:
        raise RankerError(f"{p}: ranker init: the config text does not read back as written (a column name it cannot quote?)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        usual_mode(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
