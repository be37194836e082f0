"""A /predict body -> one Arrow table with a column per feature source, one row per item.

The table then goes through the training ``Featurizer`` unchanged, so hashing, normalisation
and missing handling cannot drift between training and serving.

Fast path (no Python loop over items): Arrow's C++ JSON reader parses the whole body against an
explicit schema derived from the bundle's features; unknown keys are skipped. Context values
are broadcast column-wise with ``coalesce`` (an item's own non-null value wins), and int64 ids
sent as decimal strings are cast with Arrow's exact string -> int64 cast, never through float.

An int64 id may arrive as a JSON integer or as a decimal string (JavaScript clients cannot
carry integers above 2**53). The reader needs one JSON type per column, so the parser keeps the
convention each id column used last and flips a column when Arrow reports the other one.

Slow path: when the fast path cannot take a body (a type error, a column mixing both id
conventions, a repeated key), a pydantic model built from the same features validates it. It
either names the field at fault (``items[3].price``) or returns the validated values, which are
converted column-wise like the fast path's.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError

from ranker.errors import RankerError
from ranker.features import Featurizer
from ranker.serving.errors import Reason, RequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_DECIMAL = re.compile(r"[+-]?[0-9]+")  # fullmatch; Arrow's RE2 twin below
_DECIMAL_RE2 = r"^[+-]?[0-9]+$"
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
# Arrow's message when a value's JSON type differs from the schema's, e.g.
#   JSON parse error: Column(/items/[]/user_id) changed from string to number in row 0
_MISMATCH = re.compile(r"Column\(/(context|items/\[\])/(.+?)(?:/\[\])?\) changed from (?:number|string) to (?:number|string)")
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array", type(None): "null"}

Scope = str  # "context" or "items"


@dataclass(frozen=True)
class Column:
    """One request key: a feature's source column and how its values are typed."""

    source: str
    type: str  # "categorical" | "multi_hot" | "dense"
    kind: str | None  # "int" | "str" for categorical and multi-hot values


class _Fallback(Exception):
    """The fast path cannot take this body; the slow path decides."""


def _int64(v: object) -> int:
    """An int64 id from a JSON integer, a decimal string or a boolean; never via float."""
    if isinstance(v, bool):
        return int(v)  # boolean training columns hash as 0/1, like the featurizer's cast
    if isinstance(v, int) or (isinstance(v, str) and _DECIMAL.fullmatch(v)):
        i = int(v)
        if INT64_MIN <= i <= INT64_MAX:
            return i
        raise PydanticCustomError("int64_range", "integer out of the int64 range")
    raise PydanticCustomError("int64_type", "expected an int64 integer or a decimal string of one")


_Id = Annotated[int, BeforeValidator(_int64)]
_Dense = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _python_type(c: Column) -> Any:
    if c.type == "dense":
        return _Dense
    value = _Id if c.kind == "int" else StrictStr
    return list[value | None] if c.type == "multi_hot" else value  # type: ignore[valid-type]


def _validator(columns: list[Column], max_items: int) -> type[BaseModel]:
    """The pydantic request model of the slow path; keys are source columns (aliases)."""
    fields: dict[str, Any] = {
        f"f{i}": (_python_type(c) | None, Field(default=None, alias=c.source)) for i, c in enumerate(columns)
    }
    item = create_model("PredictItem", __config__=ConfigDict(extra="ignore"), **fields)
    return create_model(
        "PredictBody",
        __config__=ConfigDict(extra="ignore"),
        context=(item | None, None),
        items=(Annotated[list[item], Field(min_length=1, max_length=max_items)], ...),  # type: ignore[valid-type]
    )


def field_name(loc: tuple[str | int, ...]) -> str:
    """('items', 3, 'price') -> 'items[3].price'; () -> 'body'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _request_error(e: ValidationError) -> RequestError:
    err = e.errors(include_url=False)[0]
    loc, typ, msg = tuple(err["loc"]), err["type"], err["msg"]
    reason: Reason = "bad_type"
    if typ == "json_invalid":
        reason, msg = "bad_json", msg.removeprefix("Invalid JSON: ")
        return RequestError(reason, "body", f"not valid JSON ({msg})")
    if loc == ("items",) and typ in ("missing", "too_short"):
        return RequestError("empty_items", "items", "needs a list of at least one item")
    if loc == ("items",) and typ == "too_long":
        return RequestError("too_many_items", "items", msg)
    if typ == "finite_number":
        reason, msg = "non_finite", "must be a finite number (NaN and infinities are refused)"
    elif "input" in err and typ != "int64_range":
        msg = f"{msg[0].lower()}{msg[1:]}, got {_JSON_TYPES.get(type(err['input']), 'a value')}"
    return RequestError(reason, field_name(loc), msg)


class RequestParser:
    """Turns request bodies into feature tables for one bundle's featurizer.

    Args:
        featurizer: the bundle's featurizer (feature specs and value kinds).
        max_items: the most items one request may carry.

    Example:
        >>> from ranker.config import FeatureSpec as F
        >>> p = RequestParser(Featurizer([F(name="u", type="categorical", buckets=9, dim=2)], {"u": "int"}), 10)
        >>> p.parse(b'{"context": {"u": "9007199254740993"}, "items": [{}, {"u": 7}]}').column("u").to_pylist()
        [9007199254740993, 7]
    """

    def __init__(self, featurizer: Featurizer, max_items: int) -> None:
        self.max_items = max_items
        cols: dict[str, Column] = {}
        for f in featurizer.features:
            c = Column(f.source, f.type, featurizer.kinds.get(f.name))
            if cols.setdefault(f.source, c) != c:
                raise RankerError(f"features {f.name!r}: column {f.source!r} is read by two features of different types")
        self.columns = list(cols.values())
        self._ids = {c.source for c in self.columns if c.kind == "int"}
        # (scope, source) of id columns that came as decimal strings last time: the next
        # request most likely uses the same convention (one shared frozenset, swapped whole)
        self._string_ids: frozenset[tuple[Scope, str]] = frozenset()
        self._schemas: dict[frozenset[tuple[Scope, str]], pa.Schema] = {}
        self._validator = _validator(self.columns, max_items)

    # ----- Arrow types ---------------------------------------------------------------------
    @staticmethod
    def _arrow_type(c: Column, as_string: bool) -> pa.DataType:
        if c.type == "dense":
            return pa.float64()
        value = pa.int64() if c.kind == "int" and not as_string else pa.string()
        return pa.list_(value) if c.type == "multi_hot" else value

    def _struct(self, scope: Scope, strings: frozenset[tuple[Scope, str]]) -> pa.StructType:
        return pa.struct([(c.source, self._arrow_type(c, (scope, c.source) in strings)) for c in self.columns])

    def _schema(self, strings: frozenset[tuple[Scope, str]]) -> pa.Schema:
        schema = self._schemas.get(strings)
        if schema is None:
            schema = pa.schema([("context", self._struct("context", strings)), ("items", pa.list_(self._struct("items", strings)))])
            self._schemas[strings] = schema
        return schema

    # ----- parsing -------------------------------------------------------------------------
    def parse(self, body: bytes) -> pa.Table:
        """Parse and check one body. Raises RequestError naming the field at fault."""
        if not _OBJECT_START.match(body):
            # Arrow's reader crashes the process (SIGSEGV, pyarrow 26) on a body that starts
            # with a JSON null, so only a body that opens an object goes near it
            return self._slow(body)
        strings = self._string_ids
        flipped: set[tuple[Scope, str]] = set()
        while True:
            try:
                raw = self._read(body, strings)
                break
            except pa.ArrowException as e:
                key = self._mismatch(str(e))
                if key is None or key in flipped:
                    return self._slow(body)
                flipped.add(key)
                strings = strings ^ {key}
        if raw.num_rows != 1:  # empty, or several JSON documents
            return self._slow(body)
        try:
            table = self._assemble(raw, strings)
        except _Fallback:
            return self._slow(body)
        self._string_ids = strings
        return table

    def _read(self, body: bytes, strings: frozenset[tuple[Scope, str]]) -> pa.Table:
        # One block holds the whole body. Raw newlines can only be whitespace in valid JSON;
        # the newline-tolerant mode is twice as slow, so it is used only when one occurs.
        read = pj.ReadOptions(use_threads=False, block_size=max(len(body) + 1, 1 << 16))
        parse = pj.ParseOptions(
            explicit_schema=self._schema(strings),
            unexpected_field_behavior="ignore",
            newlines_in_values=b"\n" in body or b"\r" in body,
        )
        return pj.read_json(io.BytesIO(body), read_options=read, parse_options=parse)

    def _mismatch(self, message: str) -> tuple[Scope, str] | None:
        m = _MISMATCH.search(message)
        if m is None or m.group(2) not in self._ids:
            return None
        return ("context" if m.group(1) == "context" else "items", m.group(2))

    def _assemble(self, raw: pa.Table, strings: frozenset[tuple[Scope, str]]) -> pa.Table:
        items_list = raw.column("items").combine_chunks()  # list<struct>, one row
        if items_list.null_count:
            raise RequestError("empty_items", "items", "needs a list of at least one item")
        items = items_list.flatten()  # struct (n,)
        n = len(items)
        if n == 0:
            raise RequestError("empty_items", "items", "needs a list of at least one item")
        if n > self.max_items:
            raise RequestError("too_many_items", "items", f"{n} items; at most {self.max_items} per request")
        if items.null_count:
            raise _Fallback  # an item that is not an object: the slow path names it
        ctx = raw.column("context").combine_chunks()  # struct (1,)
        ctx_cols = dict(zip(ctx.type.names, ctx.flatten(), strict=True)) if ctx.null_count == 0 else {}
        out: dict[str, pa.Array] = {}
        for c, col in zip(self.columns, items.flatten(), strict=True):
            col = self._finish(col, c, ("items", c.source) in strings, "items")
            value = ctx_cols.get(c.source)
            if value is not None and value.null_count == 0:
                value = self._finish(value, c, ("context", c.source) in strings, "context")
                col = pc.coalesce(col, value[0])  # broadcast: the item's own value wins
            out[c.source] = col
        return pa.table(out)

    def _finish(self, col: pa.Array, c: Column, as_string: bool, scope: Scope) -> pa.Array:
        if c.kind == "str" or as_string:
            try:  # Arrow's JSON reader does not check UTF-8; the featurizer's hashing needs it
                col.validate(full=True)
            except pa.ArrowException:
                raise _Fallback from None
        if as_string:
            digits = pc.list_flatten(col) if c.type == "multi_hot" else col
            if not pc.all(pc.match_substring_regex(digits, _DECIMAL_RE2), min_count=0).as_py():
                raise _Fallback  # Arrow's cast would also take hex ("0x10"): decimal only
            try:
                return pc.cast(col, self._arrow_type(c, False))  # exact decimal -> int64
            except pa.ArrowException:
                raise _Fallback from None
        if c.type == "dense":
            bad = pc.fill_null(pc.invert(pc.is_finite(col)), False)
            if pc.any(bad).as_py():
                i = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
                where = f"items[{i}].{c.source}" if scope == "items" else f"context.{c.source}"
                raise RequestError("non_finite", where, "must be a finite number (NaN and infinities are refused)")
        return col

    def _slow(self, body: bytes) -> pa.Table:
        try:
            req = self._validator.model_validate_json(body)
        except ValidationError as e:
            raise _request_error(e) from None
        # Valid, but not in a shape the fast path takes (e.g. one column mixing JSON integers
        # and decimal strings): the validated values have every id as an int.
        ctx = req.context.model_dump(by_alias=True) if req.context is not None else None  # type: ignore[attr-defined]
        items = [it.model_dump(by_alias=True) for it in req.items]  # type: ignore[attr-defined]
        none: frozenset[tuple[Scope, str]] = frozenset()
        raw = pa.table(
            {
                "context": pa.array([ctx], self._struct("context", none)),
                "items": pa.array([items], pa.list_(self._struct("items", none))),
            }
        )
        try:
            return self._assemble(raw, none)
        except _Fallback:  # cannot happen for validated values; never let it become a 500
            raise RequestError("bad_type", "items", "could not be read") from None
