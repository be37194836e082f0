"""A /predict JSON body -> one Arrow table with a column per feature source, one row per item.

Two JSON layouts, one decoder: row-wise ``{"context": {...}, "items": [{...}, ...]}`` and
column-wise ``{"context": {...}, "columns": {"user_id": [...], "price": [...]}}`` (every column
one value per candidate; same value types, same context broadcast, errors named
``columns.price[3]``). Arrow IPC bodies are read in ``formats``.

The table then goes through the training ``Featurizer`` unchanged, so hashing, normalisation
and missing handling cannot drift between training and serving.

Fast path (no Python loop over items): msgspec decodes the whole body in C into typed structs
built from the bundle's features (strict types, int64 range, UTF-8; unknown keys skipped).
Each column is then taken out with ``map(attrgetter)`` and converted by Arrow in C++. Context
values are broadcast with ``coalesce`` (an item's own non-null value wins), and int64 ids sent
as decimal strings are cast with Arrow's exact string -> int64 cast, never through float.

An int64 id may arrive as a JSON integer or as a decimal string (JavaScript clients cannot
carry integers above 2**53); a column is read as integers first and as strings when that fails.

Slow path: when the fast path cannot take a body (invalid JSON, a type error, NaN, a column
mixing both id conventions), a pydantic model built from the same features validates it. It
either names the field at fault (``items[3].price``) or returns the validated values, which go
through the same column conversion as the fast path's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from operator import attrgetter
from typing import Annotated, Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from msgspec import UNSET, UnsetType
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
DECIMAL_RE2 = r"^[+-]?[0-9]+$"
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array", type(None): "null"}
CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)
NESTED_TOO_DEEPLY = "nested too deeply"  # the message of a body past a JSON parser's depth limit, valid or not


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
    column_fields: dict[str, Any] = {
        f"f{i}": (list[_python_type(c) | None] | None, Field(default=None, alias=c.source)) for i, c in enumerate(columns)
    }
    cols = create_model("PredictColumns", __config__=ConfigDict(extra="ignore"), **column_fields)
    # items and columns default to None when absent (checked after validation); an explicit
    # null is refused as the wrong type
    return create_model(
        "PredictBody",
        __config__=ConfigDict(extra="ignore"),
        context=(item | None, None),
        items=(Annotated[list[item], Field(min_length=1, max_length=max_items)], None),  # type: ignore[valid-type]
        columns=(cols, None),
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
        msg = msg.removeprefix("Invalid JSON: ")
        if msg.startswith("recursion limit exceeded"):  # valid JSON, as msgspec's RecursionError says
            return RequestError("bad_json", "body", NESTED_TOO_DEEPLY)
        return RequestError("bad_json", "body", f"not valid JSON ({msg})")
    if loc == ("items",) and typ in ("missing", "too_short"):
        return RequestError("empty_items", "items", "needs a list of at least one item")
    if loc == ("items",) and typ == "too_long":
        return RequestError("too_many_items", "items", msg)
    if typ == "finite_number":
        reason, msg = "non_finite", "must be a finite number (NaN and infinities are refused)"
    elif "input" in err and typ != "int64_range":
        msg = f"{msg[0].lower()}{msg[1:]}, got {_JSON_TYPES.get(type(err['input']), 'a value')}"
    return RequestError(reason, field_name(loc), msg)


def _decoder(columns: list[Column]) -> msgspec.json.Decoder:
    """The fast path's msgspec decoder: one struct field per source column (fields are named
    ``f0``, ``f1``... and renamed to the column, which need not be an identifier)."""
    i64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]

    def typ(c: Column) -> Any:
        if c.type == "dense":
            return float | None
        value = i64 | str if c.kind == "int" else str
        return list[value | None] | None if c.type == "multi_hot" else value | None  # type: ignore[operator]

    rename = {f"f{i}": c.source for i, c in enumerate(columns)}
    item = msgspec.defstruct(  # gc=False: items hold only scalars and lists, never a cycle
        "PredictItem", [(f"f{i}", typ(c), None) for i, c in enumerate(columns)], rename=rename, gc=False
    )
    cols = msgspec.defstruct(  # one list of values per column
        "PredictColumns", [(f"f{i}", list[typ(c)] | None, None) for i, c in enumerate(columns)], rename=rename, gc=False
    )
    body = msgspec.defstruct(
        "PredictBody",
        [("items", list[item] | UnsetType, UNSET), ("columns", cols | UnsetType, UNSET), ("context", item | None, None)],  # type: ignore[valid-type]
    )
    return msgspec.json.Decoder(body)


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

    def __init__(self, featurizer: Featurizer, max_items: int, max_list_values: int = 1_000, max_decoded_bytes: int = 64 * 2**20) -> None:
        self.max_items = max_items
        self.max_list_values = max_list_values
        self.max_decoded_bytes = max_decoded_bytes  # an Arrow body's columns, decompressed
        cols: dict[str, Column] = {}
        for f in featurizer.inputs:  # bias-tower features are training-only: not read
            c = Column(f.source, f.type, featurizer.kinds.get(f.name))
            prev = cols.setdefault(f.source, c)
            if prev == c:
                continue
            # a number read both as a dense feature and as a categorical one (age, weeks worked:
            # a trend and per-value effects) was an integer column in training: read it as int64
            # ids, which the dense feature casts to float as it did in training
            if {prev.type, c.type} == {"dense", "categorical"} and "int" in (prev.kind, c.kind):
                cols[f.source] = Column(f.source, "categorical", "int")
                continue
            raise RankerError(f"features {f.name!r}: column {f.source!r} is read by two features of different types")
        self.columns = list(cols.values())
        self._getters = [attrgetter(f"f{i}") for i in range(len(self.columns))]
        self._decoder = _decoder(self.columns)
        self._validator = _validator(self.columns, max_items)

    @staticmethod
    def arrow_type(c: Column, as_string: bool = False) -> pa.DataType:
        if c.type == "dense":
            return pa.float64()
        value = pa.int64() if c.kind == "int" and not as_string else pa.string()
        return pa.list_(value) if c.type == "multi_hot" else value

    # ----- parsing -------------------------------------------------------------------------
    def parse(self, body: bytes) -> pa.Table:
        """Parse and check one body (row-wise or column-wise). Raises RequestError naming the
        field at fault."""
        try:
            req = self._decoder.decode(body)
        except RecursionError:  # msgspec skipping an unknown key's deeply nested value
            raise RequestError("bad_json", "body", NESTED_TOO_DEEPLY) from None
        except (msgspec.MsgspecError, UnicodeDecodeError):
            return self._slow(body)  # invalid, or valid in a shape msgspec refuses: pydantic says which
        columns = None if req.columns is UNSET else req.columns
        items = None if req.items is UNSET else req.items
        n = self._check_shape(items, columns)
        try:
            table = self._table(items, columns, n, req.context)
        except _Fallback:
            return self._slow(body)
        return self.check_lists(table, "items" if items is not None else "columns")

    def check_lists(self, table: pa.Table, layout: str) -> pa.Table:
        """Refuse a candidate whose multi-hot list holds more than ``max_list_values`` values
        (``layout``: "items" or "columns", for the field's name); returns ``table``."""
        for c in self.columns:
            if c.type != "multi_hot" or c.source not in table.column_names:
                continue
            lengths = pc.list_value_length(table.column(c.source))
            longest = pc.max(lengths).as_py()
            if longest is not None and longest > self.max_list_values:
                i = int(np.flatnonzero(pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False) > self.max_list_values)[0])
                field = f"items[{i}].{c.source}" if layout == "items" else f"columns.{c.source}[{i}]"
                raise RequestError("too_many_values", field, f"{longest:,} values; at most {self.max_list_values:,} per candidate")
        return table

    def check_count(self, n: int, field: str = "items") -> None:
        """The candidate count of one request: at least one, at most ``max_items``."""
        if n == 0:
            what = "list of at least one item" if field == "items" else "value for at least one candidate"
            raise RequestError("empty_items", field, f"needs a {what}")
        if n > self.max_items:
            raise RequestError("too_many_items", field, f"{n} candidates; at most {self.max_items} per request")

    def _check_shape(self, items: list[Any] | None, columns: Any | None) -> int:
        """The candidate count of a decoded body, from its items or its columns (every column
        as long as the others)."""
        if items is not None and columns is not None:
            raise RequestError("bad_type", "body", "has both 'items' (row-wise) and 'columns' (column-wise); send one")
        if columns is None:
            n = 0 if items is None else len(items)
            self.check_count(n)
            return n
        lengths = {c.source: len(v) for c, get in zip(self.columns, self._getters, strict=True) if (v := get(columns)) is not None}
        if not lengths:
            raise RequestError("empty_items", "columns", "needs at least one feature column with a value per candidate")
        first, n = next(iter(lengths.items()))
        for name, m in lengths.items():
            if m != n:
                raise RequestError("bad_columns", f"columns.{name}", f"has {m} values but columns.{first} has {n}: one value per candidate in every column")
        self.check_count(n, "columns")
        return n

    def _table(self, items: list[Any] | None, columns: Any | None, n: int, ctx: Any | None) -> pa.Table:
        """Decoded items or columns and context (objects with one attribute ``f<j>`` per
        column, from msgspec or pydantic) -> the feature table, column by column."""
        out: dict[str, pa.Array] = {}
        for c, get in zip(self.columns, self._getters, strict=True):
            if items is not None:
                values = list(map(get, items))
            else:
                values = get(columns)
                if values is None:
                    values = [None] * n
            value = get(ctx) if ctx is not None else None
            if value is None:
                out[c.source] = self._array(values, c)
                continue
            if c.type == "multi_hot" and len(value) > self.max_list_values:  # named before it is broadcast to every item
                raise RequestError("too_many_values", f"context.{c.source}", f"{len(value):,} values; at most {self.max_list_values:,}")
            shared = self._array([value], c)[0]
            if values.count(None) == n:  # a context-only column (the usual case): no per-item values to read
                out[c.source] = pa.repeat(shared, n)
            else:  # broadcast: the item's own value wins
                out[c.source] = pc.coalesce(self._array(values, c), shared)
        return pa.table(out)

    def _array(self, values: list[Any], c: Column) -> pa.Array:
        """Python values of one column -> its Arrow array; ids from decimal strings are checked.
        Dense values are finite already: msgspec refuses NaN, infinities and out-of-range
        numbers (the slow path then reports them), and so does the pydantic model."""
        if c.kind != "int":
            return pa.array(values, self.arrow_type(c))
        try:
            return pa.array(values, self.arrow_type(c))  # ids as JSON integers
        except CONVERSION_ERRORS:
            pass
        try:
            col = pa.array(values, self.arrow_type(c, as_string=True))  # ids as decimal strings
        except CONVERSION_ERRORS:
            raise _Fallback from None  # one column mixing both conventions
        digits = pc.list_flatten(col) if c.type == "multi_hot" else col
        if not pc.all(pc.match_substring_regex(digits, DECIMAL_RE2), min_count=0).as_py():
            raise _Fallback  # Arrow's cast would also take hex ("0x10"): decimal only
        try:
            return pc.cast(col, self.arrow_type(c))  # exact decimal -> int64
        except CONVERSION_ERRORS:
            raise _Fallback from None  # out of the int64 range

    def _slow(self, body: bytes) -> pa.Table:
        try:
            req = self._validator.model_validate_json(body)
        except ValidationError as e:
            raise _request_error(e) from None
        except RecursionError:
            raise RequestError("bad_json", "body", NESTED_TOO_DEEPLY) from None
        # Valid, but not in a shape the fast path takes (e.g. one column mixing JSON integers
        # and decimal strings, or a boolean id): the validated values have every id as an int.
        items, columns = req.items, req.columns  # type: ignore[attr-defined]
        n = self._check_shape(items, columns)
        try:
            table = self._table(items, columns, n, req.context)  # type: ignore[attr-defined]
        except _Fallback:  # cannot happen for validated values; never let it become a 500
            raise RequestError("bad_type", "columns" if columns is not None else "items", "could not be read") from None
        return self.check_lists(table, "items" if items is not None else "columns")
