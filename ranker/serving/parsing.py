"""A /predict body -> one Arrow table with a column per feature source, one row per item.

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
import pyarrow as pa
import pyarrow.compute as pc
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
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array", type(None): "null"}
_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)


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


def _decoder(columns: list[Column]) -> msgspec.json.Decoder:
    """The fast path's msgspec decoder: one struct field per source column (fields are named
    ``f0``, ``f1``... and renamed to the column, which need not be an identifier)."""
    i64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]

    def typ(c: Column) -> Any:
        if c.type == "dense":
            return float | None
        value = i64 | str if c.kind == "int" else str
        return list[value | None] | None if c.type == "multi_hot" else value | None  # type: ignore[operator]

    item = msgspec.defstruct(  # gc=False: items hold only scalars and lists, never a cycle
        "PredictItem",
        [(f"f{i}", typ(c), None) for i, c in enumerate(columns)],
        rename={f"f{i}": c.source for i, c in enumerate(columns)},
        gc=False,
    )
    body = msgspec.defstruct("PredictBody", [("items", list[item]), ("context", item | None, None)])  # type: ignore[valid-type]
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

    def __init__(self, featurizer: Featurizer, max_items: int) -> None:
        self.max_items = max_items
        cols: dict[str, Column] = {}
        for f in featurizer.inputs:  # bias-tower features are training-only: not read
            c = Column(f.source, f.type, featurizer.kinds.get(f.name))
            if cols.setdefault(f.source, c) != c:
                raise RankerError(f"features {f.name!r}: column {f.source!r} is read by two features of different types")
        self.columns = list(cols.values())
        self._getters = [attrgetter(f"f{i}") for i in range(len(self.columns))]
        self._decoder = _decoder(self.columns)
        self._validator = _validator(self.columns, max_items)

    @staticmethod
    def _arrow_type(c: Column, as_string: bool = False) -> pa.DataType:
        if c.type == "dense":
            return pa.float64()
        value = pa.int64() if c.kind == "int" and not as_string else pa.string()
        return pa.list_(value) if c.type == "multi_hot" else value

    # ----- parsing -------------------------------------------------------------------------
    def parse(self, body: bytes) -> pa.Table:
        """Parse and check one body. Raises RequestError naming the field at fault."""
        try:
            req = self._decoder.decode(body)
        except (msgspec.MsgspecError, UnicodeDecodeError):
            return self._slow(body)  # invalid, or valid in a shape msgspec refuses: pydantic says which
        self._check_count(len(req.items))
        try:
            return self._table(req.items, req.context)
        except _Fallback:
            return self._slow(body)

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise RequestError("empty_items", "items", "needs a list of at least one item")
        if n > self.max_items:
            raise RequestError("too_many_items", "items", f"{n} items; at most {self.max_items} per request")

    def _table(self, items: list[Any], ctx: Any | None) -> pa.Table:
        """Decoded items and context (objects with one attribute ``f<j>`` per column, from
        msgspec or pydantic) -> the feature table, column by column."""
        out: dict[str, pa.Array] = {}
        n = len(items)
        for c, get in zip(self.columns, self._getters, strict=True):
            values = list(map(get, items))
            value = get(ctx) if ctx is not None else None
            if value is None:
                out[c.source] = self._array(values, c)
                continue
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
            return pa.array(values, self._arrow_type(c))
        try:
            return pa.array(values, self._arrow_type(c))  # ids as JSON integers
        except _CONVERSION_ERRORS:
            pass
        try:
            col = pa.array(values, self._arrow_type(c, as_string=True))  # ids as decimal strings
        except _CONVERSION_ERRORS:
            raise _Fallback from None  # one column mixing both conventions
        digits = pc.list_flatten(col) if c.type == "multi_hot" else col
        if not pc.all(pc.match_substring_regex(digits, _DECIMAL_RE2), min_count=0).as_py():
            raise _Fallback  # Arrow's cast would also take hex ("0x10"): decimal only
        try:
            return pc.cast(col, self._arrow_type(c))  # exact decimal -> int64
        except _CONVERSION_ERRORS:
            raise _Fallback from None  # out of the int64 range

    def _slow(self, body: bytes) -> pa.Table:
        try:
            req = self._validator.model_validate_json(body)
        except ValidationError as e:
            raise _request_error(e) from None
        # Valid, but not in a shape the fast path takes (e.g. one column mixing JSON integers
        # and decimal strings, or a boolean id): the validated values have every id as an int.
        try:
            return self._table(req.items, req.context)  # type: ignore[attr-defined]
        except _Fallback:  # cannot happen for validated values; never let it become a 500
            raise RequestError("bad_type", "items", "could not be read") from None
