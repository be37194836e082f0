"""Request and response codecs of /predict: row-wise JSON, column-wise JSON, Arrow IPC streams.

Every request codec produces the same thing, an Arrow table with one column per feature source
and one row per candidate, which then goes through the training featurizer; so the three
layouts give the same scores for the same values.

    Content-Type: application/json                       {"context": {...}, "items": [{...}, ...]}
                                                          {"context": {...}, "columns": {"price": [...]}}
    Content-Type: application/vnd.apache.arrow.stream    one or more record batches, a row per candidate

JSON bodies are read by ``parsing.RequestParser``. An Arrow stream is read here without a copy:
its columns are checked against the bundle's features (type, finiteness, the int64 range) and
cast only where the featurizer needs another type; dictionary-encoded string columns stay
dictionary-encoded, so each distinct value is hashed once. Columns the bundle does not read are
ignored, as unknown JSON keys are.

Answers are JSON by default (``{"model_version": ..., "scores": {task: [...]}}``) and an Arrow
stream of one record batch (a float32 column per task, null where a score is not finite, the
model version in the schema metadata and the ``X-Model-Version`` header) when ``Accept`` asks
for ``application/vnd.apache.arrow.stream``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranker.serving.errors import RequestError, ServingError
from ranker.serving.parsing import CONVERSION_ERRORS, DECIMAL_RE2, INT64_MAX, Column, RequestParser
from ranker.serving.schemas import encode_predict_response

JSON = "application/json"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
MODEL_VERSION_KEY = b"model_version"  # Arrow schema metadata key of an Arrow answer


_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")  # RFC 9110 section 12.4.2 (fullmatch)


def _media(header: str | None) -> list[tuple[str, float]]:
    """An ``Accept`` header: 'a/b;q=0.5, c/d' -> [('a/b', 0.5), ('c/d', 1.0)] (lower case, other
    parameters dropped).

    Raises:
        ServingError: 406 ``bad_media_type`` naming ``accept`` for a ``q`` that is not an RFC 9110
            quality value (a number from 0 to 1, at most three decimals): guessing what
            ``q=abc`` or ``q=2`` meant could answer in a type the client refused.
    """
    out = []
    for part in (header or "").split(","):
        kind, *params = [p.strip() for p in part.split(";")]
        if not kind:
            continue
        q = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "q":
                value = value.strip()
                if not _QVALUE.fullmatch(value):
                    raise ServingError(406, "bad_media_type", "accept", f"malformed: q={value!r} for {kind!r} is not a quality value from 0 to 1")
                q = float(value)
        out.append((kind.lower(), q))
    return out


def _quality(accepted: list[tuple[str, float]], media_type: str) -> float:
    """How ``Accept`` rates ``media_type``: by its most specific range (the type itself, then
    ``type/*``, then ``*/*``); 0 where none matches."""
    rate = dict(accepted)
    return next((rate[r] for r in (media_type, media_type.split("/")[0] + "/*", "*/*") if r in rate), 0.0)


def check_content_encoding(header: str | None) -> None:
    """Only identity bodies are read: a compressed body read as JSON or Arrow would be blamed
    on its JSON or Arrow, and decoding it would need bounds of its own.

    Raises:
        ServingError: 415 ``bad_media_type`` naming ``content-encoding``.
    """
    codings = [c.strip().lower() for c in (header or "").split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        raise ServingError(415, "bad_media_type", "content-encoding", f"{header!r} is not supported; send an identity (uncompressed) body")


def _content_type(header: str | None) -> str:
    """The media type of a ``Content-Type`` (lower case, parameters dropped); JSON when absent."""
    return (header or "").split(";")[0].strip().lower() or JSON


def _is_json(kind: str) -> bool:
    return kind == JSON or kind.endswith("+json")


@dataclass(frozen=True)
class WireFormat:
    """How one request's body is read and its answer written.

    Args:
        arrow_request: the body is an Arrow IPC stream (else JSON, row- or column-wise).
        arrow_response: answer with an Arrow IPC stream (else JSON).

    Example:
        >>> negotiate("application/vnd.apache.arrow.stream", "application/json")
        WireFormat(arrow_request=True, arrow_response=False)
    """

    arrow_request: bool = False
    arrow_response: bool = False

    @property
    def media_type(self) -> str:
        return ARROW_STREAM if self.arrow_response else JSON

    def decode(self, parser: RequestParser, body: bytes) -> pa.Table:
        """The feature table of one body. Raises RequestError naming the field at fault."""
        return read_arrow(parser, body) if self.arrow_request else parser.parse(body)

    def encode(self, version: str, scores: Mapping[str, np.ndarray]) -> bytes:
        return encode_arrow_response(version, scores) if self.arrow_response else encode_predict_response(version, scores)


JSON_WIRE = WireFormat()  # JSON in (rows or columns), JSON out: the default


def negotiate(content_type: str | None, accept: str | None, content_encoding: str | None = None) -> WireFormat:
    """The wire format from the request's ``Content-Type``, ``Accept`` and ``Content-Encoding``.

    A missing Content-Type, ``application/json`` and any ``+json`` type are JSON; the Arrow
    stream type is Arrow; anything else (``text/plain`` included) is a 415, and so is a
    Content-Encoding other than identity. Each answer type is rated by the most specific range
    of ``Accept`` that matches it (``*/*`` and ``application/*`` included); the answer is Arrow
    when Arrow is rated above JSON, JSON otherwise (a tie, no ``Accept`` at all). An ``Accept``
    that rates both 0 is a 406, and so is a malformed ``q``; a type rated 0 is never answered.

    Raises:
        ServingError: 415 or 406, reason ``bad_media_type``.
    """
    kind = _content_type(content_type)
    if kind == ARROW_STREAM:
        arrow_request = True
    elif _is_json(kind):
        arrow_request = False
    else:
        raise ServingError(415, "bad_media_type", "content-type", f"{kind!r} is not read; send {JSON} (rows or columns) or {ARROW_STREAM}")
    check_content_encoding(content_encoding)
    accepted = _media(accept)
    if not accepted:
        return WireFormat(arrow_request, False)
    q_json, q_arrow = _quality(accepted, JSON), _quality(accepted, ARROW_STREAM)
    if q_json <= 0 and q_arrow <= 0:
        raise ServingError(406, "bad_media_type", "accept", f"answers are {JSON} or {ARROW_STREAM}; {accept!r} accepts neither")
    return WireFormat(arrow_request, q_arrow > q_json)


def negotiate_json(content_type: str | None, accept: str | None, content_encoding: str | None = None) -> None:
    """The same checks for an endpoint that reads and answers JSON only (/feedback): a missing
    Content-Type or a JSON one, an identity body, an ``Accept`` that rates JSON above 0.

    Raises:
        ServingError: 415 or 406, reason ``bad_media_type``.
    """
    kind = _content_type(content_type)
    if not _is_json(kind):
        raise ServingError(415, "bad_media_type", "content-type", f"{kind!r} is not read; send {JSON}")
    check_content_encoding(content_encoding)
    accepted = _media(accept)
    if accepted and _quality(accepted, JSON) <= 0:
        raise ServingError(406, "bad_media_type", "accept", f"answers are {JSON}; {accept!r} does not accept it")


def encode_arrow_response(version: str, scores: Mapping[str, np.ndarray]) -> bytes:
    """One record batch, a float32 column per task (null where a score is not finite)."""
    cols = {}
    for task, s in scores.items():
        s = np.ascontiguousarray(s, dtype=np.float32)
        bad = ~np.isfinite(s)
        cols[task] = pa.array(s, pa.float32(), mask=bad if bad.any() else None)
    batch = pa.record_batch(cols, metadata={MODEL_VERSION_KEY: version.encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- Arrow requests


def _bad(column: str, message: str, reason: str = "bad_arrow") -> RequestError:
    return RequestError(reason, f"columns.{column}", message)  # type: ignore[arg-type]


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true value of a boolean array (nulls count as false)."""
    return int(np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))[0])


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _check_ids(col: pa.ChunkedArray, name: str, at: Callable[[int], str] | None = None, shown: pa.DataType | None = None) -> pa.ChunkedArray:
    """Integer ids as int64 (values kept exactly), or decimal strings cast exactly to int64.
    ``at`` names the value at a flat index (a list's element: ``tags[3][1]``); ``shown`` is the
    type an error names (the list's, when ``col`` holds a list column's values)."""
    at = at or (lambda i: f"{name}[{i}]")
    t = _value_type(col.type)
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, t)  # ids are hashed from their values; a dictionary buys nothing here
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        if pa.types.is_uint64(t) and col.null_count < len(col) and pc.max(col).as_py() > INT64_MAX:
            i = _first(pc.greater(col, pa.scalar(INT64_MAX, pa.uint64())))
            raise _bad(at(i), "integer out of the int64 range", "bad_type")
        return col if t == pa.int64() else pc.cast(col, pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = pc.match_substring_regex(col, DECIMAL_RE2)
        if not pc.all(ok, min_count=0).as_py():
            i = _first(pc.invert(pc.fill_null(ok, True)))
            raise _bad(at(i), "expected an int64 integer or a decimal string of one", "bad_type")
        try:
            return pc.cast(col, pa.int64())
        except CONVERSION_ERRORS:
            raise _bad(name, "a decimal string out of the int64 range", "bad_type") from None
    raise _bad(name, f"has type {shown or col.type}; feature values here are int64 ids (integers or decimal strings)", "bad_type")


def _check_strings(col: pa.ChunkedArray, name: str, at: Callable[[int], str] | None = None, shown: pa.DataType | None = None) -> pa.ChunkedArray:
    if pa.types.is_string(_value_type(col.type)) or pa.types.is_large_string(_value_type(col.type)):
        return col  # dictionary-encoded strings stay so: the featurizer hashes the dictionary
    raise _bad(name, f"has type {shown or col.type}; feature values here are strings", "bad_type")


def _with_values(chunk: pa.Array, values: pa.Array) -> pa.Array:
    """A list array with the offsets and validity of ``chunk`` over the child ``values``."""
    if values.type == chunk.type.value_type:
        return chunk
    cls = pa.LargeListArray if pa.types.is_large_list(chunk.type) else pa.ListArray
    return cls.from_arrays(chunk.offsets, values, mask=chunk.is_null() if chunk.null_count else None)


def _check_column(col: pa.ChunkedArray, c: Column) -> pa.ChunkedArray:
    """One Arrow column made ready for the featurizer, or a 422 naming it."""
    name = c.source
    if pa.types.is_null(col.type):  # all null: every candidate misses the feature
        return pc.cast(col, RequestParser.arrow_type(c))  # typed, as a JSON column of nulls would be
    if c.type == "dense":
        t = _value_type(col.type)
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
            raise _bad(name, f"has type {col.type}; a dense feature needs numbers", "bad_type")
        x = pc.cast(col, pa.float64(), safe=False)  # int64 past 2**53 rounds, as in training
        finite = pc.is_finite(x)
        if not pc.all(finite, min_count=0).as_py():  # nulls are missing values, not errors
            i = _first(pc.invert(pc.fill_null(finite, True)))
            raise _bad(f"{name}[{i}]", "must be a finite number (NaN and infinities are refused)", "non_finite")
        return x
    check = _check_ids if c.kind == "int" else _check_strings
    if c.type != "multi_hot":
        return check(col, name)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise _bad(name, f"has type {col.type}; a multi-hot feature needs lists", "bad_type")
    # each chunk's child values (what its offsets index) checked as one flat column; a bad
    # value is named by its row and place in the row's list
    out, row0 = [], 0
    for ch in col.chunks:
        offsets = ch.offsets.to_numpy()

        def at(i: int, offsets: np.ndarray = offsets, row0: int = row0) -> str:
            row = int(np.searchsorted(offsets, i, side="right")) - 1
            return f"{name}[{row0 + row}][{i - int(offsets[row])}]"

        out.append(_with_values(ch, check(pa.chunked_array([ch.values]), name, at, col.type).combine_chunks()))
        row0 += len(ch)
    return pa.chunked_array(out)


def _validate(rb: pa.RecordBatch) -> None:
    """Full validation of a decoded batch: offsets in order and in bounds, dictionary indices
    in range, strings UTF-8. The stream reader checks only the buffers' sizes, and the
    featurizer reads offsets and indices as they are (backward offsets crashed the process).

    Raises:
        RequestError: ``bad_arrow`` naming the first column at fault.
    """
    try:
        rb.validate(full=True)
    except pa.ArrowInvalid:
        for name, col in zip(rb.schema.names, rb.columns, strict=True):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid as e:
                raise RequestError("bad_arrow", f"columns.{name}", f"not a valid Arrow array ({e})") from None
        raise


def read_arrow(parser: RequestParser, body: bytes) -> pa.Table:
    """An Arrow IPC stream body -> the feature table (columns the bundle reads, checked).

    Raises:
        RequestError: ``bad_arrow`` for a body that is not an Arrow stream, ``bad_type`` or
            ``non_finite`` naming the column (``columns.price``, ``columns.price[3]``) at fault,
            ``empty_items``/``too_many_items`` for the row count.
    """
    buf = pa.py_buffer(body)
    try:
        # only the columns the bundle reads are decoded (a compressed stream's other columns
        # are never decompressed), batch by batch up to a bound on their decoded size: a small
        # compressed body must not unpack into gigabytes
        schema = pa.ipc.open_stream(buf).schema
        wanted = {c.source for c in parser.columns}
        # none wanted (every feature missing): one column still gives the row count, and an
        # empty list would mean every column to Arrow (a stream of no columns has only the count)
        keep = [i for i, n in enumerate(schema.names) if n in wanted] or ([0] if schema.names else [])
        reader = pa.ipc.open_stream(buf, options=pa.ipc.IpcReadOptions(included_fields=keep))
        batches, decoded = [], 0
        for rb in reader:
            decoded += rb.nbytes
            if decoded > parser.max_decoded_bytes:
                raise RequestError("body_too_large", "body", f"its columns decode to more than {parser.max_decoded_bytes:,} bytes",
                                   status=413)
            _validate(rb)
            batches.append(rb)
        table = pa.Table.from_batches(batches, schema=reader.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise RequestError("bad_arrow", "body", f"not a readable Arrow IPC stream ({e})") from None
    parser.check_count(table.num_rows, "body")
    names = table.schema.names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _bad(dup, "appears twice in the stream's schema")
    out = {}
    for c in parser.columns:
        if c.source in names:
            out[c.source] = _check_column(table.column(c.source), c)
    return parser.check_lists(pa.table(out), "columns") if out else pa.table({"__rows__": pa.nulls(table.num_rows)})
