"""The one featurizer: Arrow columns in, model tensors out, for training and serving alike.

Categorical values are hashed with a stable hash (splitmix64 for integers, BLAKE2b for
strings), so a value lands in the same bucket in every process, on every machine, in training
and in serving. int64 ids are hashed from their exact bits, never through float. Bucket 0 is
"missing" (null); values go to buckets 1..B. Dense features are encoded with what one streaming
pass over the training data fitted (``FeatureSpec.encoding``):
    standard, log1p       z-score with the training mean and std (log1p: of sign(x) log1p(|x|));
                          null, NaN and inf become 0, i.e. the training mean
    piecewise_linear      fractional position q in [0, T] among T quantile bins (ranker.encodings);
                          null, NaN and inf stay NaN and the model learns a vector for them
    periodic              the same position scaled to [0, 1]; NaN as above
Features that tasks name as ``bias_features`` are training-only inputs of the bias towers: they
are left out of "cat"/"dense" and come as one tensor each under ``bias:<name>``.

A featurized batch is a dict of row-aligned tensors so it can be shuffled and sliced by row:
    "cat"        (B, n_categorical) int64    bucket per categorical feature
    "dense"      (B, n_dense)       float32  one encoded number per dense feature
    "bag:<name>" (B, L)             int64    multi-hot buckets, padded with ``buckets + 1``
    "bias:<name>" (B,)              int64 bucket or float32 number, per bias feature (training)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ranker.config import FeatureSpec
from ranker.encodings import QuantileSketch, bin_edges, bin_position
from ranker.errors import RankerError

ValueKind = Literal["int", "str"]
Batch = dict[str, torch.Tensor]

MISSING = 0
# standardised dense values are clipped here: a finite but absurd input (1e308) would otherwise
# overflow float32 to inf and turn every score of the row into NaN
DENSE_CLIP = 1e4
_STR_CACHE_MAX = 200_000  # distinct strings whose hash is remembered (ids repeat across batches)
_str_cache: dict[str, int] = {}
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def hash_int64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over the raw 64 bits of each value. (N,) int64 -> (N,) uint64."""
    z = values.astype(np.int64, copy=False).view(np.uint64) + _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def hash_str(value: str) -> int:
    """64-bit BLAKE2b of the UTF-8 bytes: stable across processes (unlike ``hash()``)."""
    h = _str_cache.get(value)
    if h is None:
        h = int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")
        if len(_str_cache) >= _STR_CACHE_MAX:
            _str_cache.clear()
        _str_cache[value] = h
    return h


def _hash_strs(values: list[str]) -> list[int]:
    """``hash_str`` of each value: one cache lookup per value inline (the usual case), and the
    function itself only for the misses."""
    hashes = [_str_cache.get(v) for v in values]
    if None in hashes:
        hashes = [hash_str(v) if h is None else h for v, h in zip(values, hashes, strict=True)]
    return hashes  # type: ignore[return-value]


def bucketize(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """uint64 hashes -> int64 buckets in 1..buckets (0 stays free for missing)."""
    return (hashes % np.uint64(buckets)).astype(np.int64) + 1


def _flat(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array. A chunked dictionary column (chunks may carry different
    dictionaries, e.g. from several Arrow IPC record batches) is decoded to its values first."""
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            return arr.chunk(0)
        if pa.types.is_dictionary(arr.type):
            arr = pa.chunked_array([c.dictionary_decode() for c in arr.chunks], arr.type.value_type)
        arr = arr.combine_chunks()
    return arr


_NUMPY_INT = {pa.int8().id: np.int8, pa.int16().id: np.int16, pa.int32().id: np.int32, pa.int64().id: np.int64,
              pa.uint8().id: np.uint8, pa.uint16().id: np.uint16, pa.uint32().id: np.uint32, pa.uint64().id: np.uint64}


def _values_and_validity(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """A flat fixed-width integer array's stored values and its validity as numpy, read from
    the Arrow buffers without a compute call: ((N,) values, (N,) bool valid, or None when the
    array has no nulls). A null slot's value is whatever the buffer holds there.

    Example:
        >>> v, ok = _values_and_validity(pa.array([3, None, 5], pa.int32()))
        >>> v[ok].tolist(), ok.tolist()
        ([3, 5], [True, False, True])
    """
    validity, data = arr.buffers()[:2]
    n, off = len(arr), arr.offset
    values = np.frombuffer(data, dtype=_NUMPY_INT[arr.type.id], count=off + n)[off:]
    if not arr.null_count or validity is None:
        return values, None
    bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
    return values, bits[off : off + n].astype(bool)


def _distinct_hashes(values: pa.Array, kind: ValueKind) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Dictionary-encode ``values`` (nulls get an entry of their own) and hash each distinct
    value once: ((N,) int64 codes, (U,) uint64 hashes, the null entry's code or None)."""
    enc = pc.dictionary_encode(values, null_encoding="encode")
    uniq = enc.dictionary
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    null_code = None
    if uniq.null_count:
        null_code = int(np.flatnonzero(np.asarray(uniq.is_null()))[0])
    if kind == "int":
        if pa.types.is_boolean(uniq.type):  # hashed as 0/1 (fill_null(bool, 0) would not cast)
            uniq = pc.cast(uniq, pa.int64())
        hashes = hash_int64(pc.fill_null(uniq, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
    else:
        strs = uniq.to_pylist()
        if null_code is not None:
            strs[null_code] = ""  # its bucket is overwritten with MISSING
        hashes = np.array(_hash_strs(strs), dtype=np.uint64)
    return codes, hashes, null_code


def bucket_values(arrays: Sequence[pa.Array | pa.ChunkedArray], kinds: Sequence[ValueKind], buckets: Sequence[int]) -> list[np.ndarray]:
    """Buckets of every value of several flat arrays, each with its own value kind ("int" or
    "str", plain or dictionary-encoded) and bucket count; nulls -> MISSING.

    No per-value Python and little per-column work: all integer values go through one Arrow
    dictionary encoding and all string values through another, so each distinct value of the
    whole batch is hashed once (splitmix64 in numpy; BLAKE2b through the string cache, one
    lookup per distinct string); the modulo runs on the distinct hashes, once per bucket
    count, and each value's bucket is one gather. A dictionary-encoded input contributes only
    its dictionary. The buckets equal ``bucketize(hash_int64(v))`` / ``bucketize(hash_str(v))``
    value by value.

    Returns, per array, its (N,) int64 buckets.

    Example:
        >>> import pyarrow as pa
        >>> out = bucket_values([pa.array(["ios", None]), pa.array([7], pa.int64())], ["str", "int"], [10, 10])
        >>> out[0].tolist() == [int(hash_str("ios") % 10) + 1, 0], out[1].tolist() == bucketize(hash_int64(np.array([7])), 10).tolist()
        (True, True)
    """
    flat = [_flat(a) for a in arrays]
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(flat)
    for kind in ("int", "str"):
        # arrays of this kind, ordered by bucket count so each count's values are one slice
        pick = sorted((i for i, k in enumerate(kinds) if k == kind), key=lambda i: buckets[i])
        if not pick:
            continue
        parts = [flat[i].dictionary if pa.types.is_dictionary(flat[i].type) else flat[i] for i in pick]
        target = pa.int64() if kind == "int" else pa.string()
        parts = [p if p.type == target else p.cast(target, safe=False) for p in parts]  # int32, bool, uint64 (bits kept), large_string
        codes, hashes, null_code = _distinct_hashes(pa.concat_arrays(parts) if len(parts) > 1 else parts[0], kind)
        bounds = np.cumsum([0] + [len(p) for p in parts])
        j = 0
        while j < len(pick):  # one run of arrays per bucket count
            k = j
            while k < len(pick) and buckets[pick[k]] == buckets[pick[j]]:
                k += 1
            table = bucketize(hashes, buckets[pick[j]])  # (U,) bucket of each distinct value
            if null_code is not None:
                table[null_code] = MISSING
            run = table[codes[bounds[j] : bounds[k]]]
            for m in range(j, k):
                i = pick[m]
                seg = run[bounds[m] - bounds[j] : bounds[m + 1] - bounds[j]]
                if pa.types.is_dictionary(flat[i].type):  # the dictionary's buckets, by its indices
                    idx = flat[i].indices
                    if not len(seg):
                        seg = np.zeros(len(idx), dtype=np.int64)
                    else:
                        codes_i, valid = _values_and_validity(idx)
                        if valid is None:
                            seg = seg[codes_i]
                        else:  # a null slot's stored index is undefined: read entry 0, then MISSING
                            seg = seg[np.where(valid, codes_i, 0)]
                            seg[~valid] = MISSING
                out[i] = seg
            j = k
    return out


def _hash_array(arr: pa.Array | pa.ChunkedArray, kind: ValueKind, buckets: int) -> np.ndarray:
    """Buckets of one flat array (``bucket_values`` for a single column)."""
    return bucket_values([arr], [kind], [buckets])[0]


def value_kind(t: pa.DataType) -> ValueKind | None:
    """The hashing kind of an Arrow scalar type, or None if it cannot be a categorical value."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


def _dense_values(arr: pa.Array | pa.ChunkedArray, encoding: str | None) -> np.ndarray:
    """Arrow numeric -> float64 with NaN for null/NaN/inf, log1p'd for that encoding."""
    # safe=False: an int64 past 2**53 rounds to the nearest float64, as a number should (the
    # checked cast would refuse it, and a dense feature is a float in the model all the same)
    x = pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    x = np.where(np.isfinite(x), x, np.nan) if x.dtype == np.float64 else x.astype(np.float64)
    if encoding == "log1p":
        x = np.sign(x) * np.log1p(np.abs(x))  # defined for negatives too (refunds, deltas)
    return x


def _standardise(x: np.ndarray, mean: float | np.ndarray, std: float | np.ndarray) -> np.ndarray:
    """(x - mean) / std in place, NaN (missing) -> 0, clipped to +-DENSE_CLIP; ``x`` is a float64
    array of the caller's own (one column, or (n, k) with per-column mean and std)."""
    x -= mean
    x /= std
    x[np.isnan(x)] = 0.0
    return np.clip(x, -DENSE_CLIP, DENSE_CLIP, out=x)


@dataclass
class RunningMoments:
    """Count, mean and M2 merged batch by batch (Chan et al.), stable for long streams."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> None:
        x = x[~np.isnan(x)]
        n = int(x.size)
        if n == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total

    def merge(self, other: RunningMoments) -> None:
        """Fold in moments kept over other values (another rank's rows)."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total

    @property
    def std(self) -> float:
        var = self.m2 / self.count if self.count else 0.0
        return math.sqrt(var) if var > 1e-12 else 1.0  # constant column: scale 1, centred at 0


@dataclass
class DenseFit:
    """What the fit pass keeps for the dense features: moments (standard, log1p) and quantile
    sketches (piecewise_linear, periodic). Both merge, so ranks can each fit their own share of
    the rows and combine the results."""

    moments: dict[str, RunningMoments]
    sketches: dict[str, QuantileSketch]

    @classmethod
    def empty(cls, dense: Sequence[FeatureSpec]) -> DenseFit:
        return cls({f.name: RunningMoments() for f in dense if not f.embedded}, {f.name: QuantileSketch() for f in dense if f.embedded})

    def merge(self, other: DenseFit) -> None:
        for name, m in other.moments.items():
            self.moments[name].merge(m)
        for name, sk in other.sketches.items():
            self.sketches[name].merge(sk)


@dataclass
class Featurizer:
    """Turns Arrow record batches into the model's tensors.

    Args:
        features: the configured features, in config order.
        kinds: per categorical/multi-hot feature, "int" or "str" as seen in the training data.
        dense_stats: per standard/log1p dense feature, (mean, std) after its transform.
        edges: per piecewise_linear/periodic feature, its ascending quantile bin edges.
        bias: names of the bias-tower features (training only; see the module docstring).

    Example:
        >>> import pyarrow as pa
        >>> from ranker.config import FeatureSpec
        >>> f = Featurizer([FeatureSpec(name="u", type="categorical", buckets=10, dim=4)], {"u": "int"}, {})
        >>> f.transform(pa.table({"u": [1, None]}))["cat"][:, 0].tolist()[1]
        0
    """

    features: list[FeatureSpec]
    kinds: dict[str, ValueKind] = field(default_factory=dict)
    dense_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    edges: dict[str, np.ndarray] = field(default_factory=dict)
    bias: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[FeatureSpec]:
        """The encoder's features: everything but the bias features. What serving reads."""
        return [f for f in self.features if f.name not in self.bias]

    @property
    def bias_features(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.name in self.bias]

    def without_bias(self) -> Featurizer:
        """The same featurizer minus the bias features: what scoring needs (no ``bias:*`` keys,
        and their columns are neither read nor checked)."""
        if not self.bias:
            return self
        keep = {f.name for f in self.inputs}
        return Featurizer(self.inputs, {k: v for k, v in self.kinds.items() if k in keep},
                          {k: v for k, v in self.dense_stats.items() if k in keep},
                          {k: v for k, v in self.edges.items() if k in keep}, [])

    @property
    def categorical(self) -> list[FeatureSpec]:
        return [f for f in self.inputs if f.type == "categorical"]

    @property
    def multi_hot(self) -> list[FeatureSpec]:
        return [f for f in self.inputs if f.type == "multi_hot"]

    @property
    def dense(self) -> list[FeatureSpec]:
        return [f for f in self.inputs if f.type == "dense"]

    @property
    def columns(self) -> list[str]:
        """Every column training reads (bias features included)."""
        return list(dict.fromkeys(f.source for f in self.features))

    # ----- fitting -------------------------------------------------------------------------
    @staticmethod
    def check_schema(features: Sequence[FeatureSpec], schema: pa.Schema, where: str, allow_null: bool = False) -> dict[str, ValueKind]:
        """Check every feature column exists with a usable type; return the hashing kinds.
        ``allow_null``: a column of Arrow type null (all missing: how writers store a file
        without the value) passes and has no kind; without it, that is an error (a split's
        merged schema, null only where no file holds a value)."""
        kinds: dict[str, ValueKind] = {}
        for f in features:
            idx = schema.get_field_index(f.source)
            if idx < 0:
                raise RankerError(f"{where}: missing column {f.source!r} (feature {f.name!r})")
            t = schema.field(idx).type
            if pa.types.is_null(t):
                if allow_null:
                    continue
                raise RankerError(f"{where}: column {f.source!r} holds no values in any file (Arrow type null); "
                                  f"feature {f.name!r} has nothing to learn from")
            if f.type == "dense":
                if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
                    raise RankerError(f"{where}: column {f.source!r} has type {t}; dense feature {f.name!r} needs a number")
                continue
            if f.type == "multi_hot":
                if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                    raise RankerError(f"{where}: column {f.source!r} has type {t}; multi_hot feature {f.name!r} needs list<int|string>")
                t = t.value_type
            kind = value_kind(t)
            if kind is None:
                raise RankerError(f"{where}: column {f.source!r} has type {t}; {f.type} feature {f.name!r} needs int or string values")
            kinds[f.name] = kind
        return kinds

    def check_compatible(self, schema: pa.Schema, where: str) -> None:
        """Check another data set's schema against this featurizer: every column present with a
        usable type, and each hashed feature holding the same kind (int or string) as in
        training, or its values would land in other buckets."""
        for name, kind in self.check_schema(self.features, schema, where, allow_null=True).items():
            if kind != self.kinds[name]:
                raise RankerError(f"{where}: feature {name!r} holds {kind} values but was trained on {self.kinds[name]} values")

    @classmethod
    def fit(
        cls,
        features: list[FeatureSpec],
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        where: str,
        bias: Sequence[str] = (),
        combine: Callable[[DenseFit], DenseFit] | None = None,
    ) -> Featurizer:
        """One streaming pass over training batches: value kinds from the schema, dense moments
        (standard, log1p) and quantile sketches (piecewise_linear, periodic), bounded memory.
        ``combine`` turns the statistics of these batches into those of all the training rows
        (a rank's share merged with the other ranks'); without it the batches are all of them."""
        kinds = cls.check_schema(features, schema, where)
        dense = [f for f in features if f.type == "dense"]
        fit = DenseFit.empty(dense)
        for rb in batches:
            for f in dense:
                x = _dense_values(rb.column(f.source), f.encoding)
                (fit.sketches[f.name] if f.embedded else fit.moments[f.name]).update(x)
        if combine is not None:
            fit = combine(fit)
        stats = {name: (m.mean, m.std) for name, m in fit.moments.items()}
        edges = {f.name: bin_edges(fit.sketches[f.name], f.bins) for f in dense if f.embedded}  # type: ignore[arg-type]
        return cls(list(features), kinds, stats, edges, list(bias))

    # ----- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able state stored in the bundle's manifest."""
        return {
            "kinds": dict(self.kinds),
            "dense_stats": {k: list(v) for k, v in self.dense_stats.items()},
            "edges": {k: [float(e) for e in v] for k, v in self.edges.items()},
            "bias": list(self.bias),
        }

    @classmethod
    def from_state(cls, features: list[FeatureSpec], state: dict) -> Featurizer:
        """Rebuild from ``state()``; a state from before numeric encodings has no edges or bias."""
        fz = cls(
            list(features),
            dict(state["kinds"]),
            {k: (float(v[0]), float(v[1])) for k, v in state["dense_stats"].items()},
            {k: np.asarray(v, dtype=np.float64) for k, v in state.get("edges", {}).items()},
            list(state.get("bias", [])),
        )
        for f in fz.features:
            if f.type == "dense" and f.name not in (fz.edges if f.embedded else fz.dense_stats):
                raise KeyError(f"no fitted {'edges' if f.embedded else 'dense_stats'} for dense feature {f.name!r}")
        return fz

    # ----- transform -----------------------------------------------------------------------
    def encode_dense(self, f: FeatureSpec, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """One dense column -> (n,) float32 as the feature's encoding wants it."""
        x = _dense_values(col, f.encoding)
        if f.embedded:
            edges = self.edges[f.name]
            q = bin_position(x, edges)
            return (q if f.encoding == "piecewise_linear" else q / max(len(edges) - 1, 1)).astype(np.float32)
        return _standardise(x, *self.dense_stats[f.name]).astype(np.float32)

    def _dense_matrix(self, columns: dict[str, pa.Array | pa.ChunkedArray], n: int) -> np.ndarray:
        """(n, D) float32 of the dense inputs. Embedded encodings go column by column; the
        standardised columns are scaled, cleaned and clipped as one (n, k) matrix
        (``_standardise``, as ``encode_dense`` does for one column), with a fraction of the
        per-column numpy calls."""
        dense = self.dense
        den = np.zeros((n, len(dense)), dtype=np.float32)
        std_cols: list[int] = []
        for j, f in enumerate(dense):
            if f.source not in columns:
                if f.embedded:
                    den[:, j] = np.nan  # absent = missing, which embedded encodings keep apart
            elif f.embedded:
                den[:, j] = self.encode_dense(f, columns[f.source])
            else:
                std_cols.append(j)
        if std_cols:
            x = np.empty((n, len(std_cols)), dtype=np.float64)
            for k, j in enumerate(std_cols):
                x[:, k] = _dense_values(columns[dense[j].source], dense[j].encoding)
            stats = np.array([self.dense_stats[dense[j].name] for j in std_cols], dtype=np.float64)  # (k, 2) mean, std
            den[:, std_cols] = _standardise(x, stats[:, 0], stats[:, 1])
        return den

    def transform(self, data: pa.Table | pa.RecordBatch, bias: bool = True) -> Batch:
        """Featurize every row of ``data`` column-wise; columns absent from ``data`` count as
        all-missing (serving may omit features; training checks the schema beforehand).
        ``bias=False`` leaves out the bias features (serving: the model does not use them)."""
        n = data.num_rows
        out: Batch = {}
        columns = dict(zip(data.schema.names, data.columns, strict=True))  # by name: one lookup each
        if any(pa.types.is_null(t) for t in data.schema.types):
            columns = self._typed_nulls(columns, n)
        names = columns.keys()

        # every hashed column at once (``bucket_values``): categorical and multi-hot values share
        # one dictionary encoding per value kind, so each distinct value is hashed once
        cats = self.categorical
        bags = self.multi_hot
        cols = [(j, f) for j, f in enumerate(cats) if f.source in names]
        bag_cols = {f.name: _flat(columns[f.source]) for f in bags if f.source in names}
        hashed = [f for _, f in cols] + [f for f in bags if f.name in bag_cols]
        bucketed = bucket_values(
            [columns[f.source] for _, f in cols] + [pc.list_flatten(c) for c in bag_cols.values()],
            [self.kinds[f.name] for f in hashed],
            [f.buckets for f in hashed],  # type: ignore[misc]
        )
        cat = np.zeros((n, len(cats)), dtype=np.int64)  # (n, C); absent columns stay MISSING
        for (j, _), values in zip(cols, bucketed, strict=False):
            cat[:, j] = values
        out["cat"] = torch.from_numpy(cat)

        out["dense"] = torch.from_numpy(self._dense_matrix(columns, n))

        bag_values = dict(zip(bag_cols, bucketed[len(cols) :], strict=True))
        for f in bags:
            out[f"bag:{f.name}"] = self._bag(bag_cols.get(f.name), bag_values.get(f.name), f, n)
        for f in self.bias_features if bias else ():
            out[f"bias:{f.name}"] = self._bias(columns.get(f.source), f, n)
        return out

    def _typed_nulls(self, columns: dict[str, pa.Array | pa.ChunkedArray], n: int) -> dict[str, pa.Array | pa.ChunkedArray]:
        """Columns of Arrow type null (a file where a feature is all missing) as nulls of the
        type each feature reads, so they featurize as missing values."""
        out = dict(columns)
        for f in self.features:
            col = columns.get(f.source)
            if col is None or not pa.types.is_null(col.type):
                continue
            value = pa.string() if self.kinds.get(f.name) == "str" else pa.int64()
            out[f.source] = pa.nulls(n, pa.float64() if f.type == "dense" else pa.list_(value) if f.type == "multi_hot" else value)
        return out

    def _bias(self, col: pa.Array | pa.ChunkedArray | None, f: FeatureSpec, n: int) -> torch.Tensor:
        """One bias feature -> (n,) bucket (categorical) or encoded number (dense)."""
        if f.type == "categorical":
            if col is None:
                return torch.zeros(n, dtype=torch.int64)
            return torch.from_numpy(_hash_array(col, self.kinds[f.name], f.buckets))  # type: ignore[arg-type]
        if col is None:
            return torch.full((n,), np.nan if f.embedded else 0.0)
        return torch.from_numpy(self.encode_dense(f, col))

    @staticmethod
    def _bag(col: pa.Array | None, values: np.ndarray | None, f: FeatureSpec, n: int) -> torch.Tensor:
        """list<...> and its flattened values' buckets -> (n, L) buckets padded with
        ``buckets + 1``; a null or empty list is one MISSING entry so the model still sees
        "this row has no tags"."""
        pad = f.buckets + 1  # type: ignore[operator]
        if col is None or values is None:
            return torch.zeros((n, 1), dtype=torch.int64)
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        width = max(int(lengths.max(initial=0)), 1)
        bag = np.full((n, width), pad, dtype=np.int64)
        bag[lengths == 0, 0] = MISSING
        rows = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        bag[rows, pos] = values
        return torch.from_numpy(bag)

    def missing_counts(self, data: pa.Table | pa.RecordBatch) -> dict[str, int]:
        """Nulls (or absent columns) per feature, for serving's missing-feature counter."""
        names = set(data.schema.names)
        return {f.name: (data.column(f.source).null_count if f.source in names else data.num_rows) for f in self.inputs}


def concat_batches(batches: Sequence[Batch], pads: dict[str, int]) -> Batch:
    """Concatenate featurized batches by row; multi-hot bags are right-padded to a common width.

    ``pads`` maps each ``bag:<name>`` key to its padding bucket.
    """
    out: Batch = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if key in pads:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pads[key]) for p in parts]
        out[key] = torch.cat(parts)
    return out


def bag_pads(features: Iterable[FeatureSpec]) -> dict[str, int]:
    """The padding bucket of each multi-hot key."""
    return {f"bag:{f.name}": f.buckets + 1 for f in features if f.type == "multi_hot"}  # type: ignore[operator]
