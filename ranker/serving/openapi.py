"""The OpenAPI document of the loaded bundle: /predict's bodies typed feature by feature.

FastAPI's document knows only the generic ``PredictRequest``. This module rewrites the
/predict operation from the bundle being served: each feature's request key with its JSON type
(an int64 id as an integer, a decimal string or a boolean, a string, a number, a list of either), the
row-wise and column-wise JSON layouts, the Arrow stream, ``tasks`` as a list of the bundle's
task names, and the answer's ``scores`` keyed by those tasks. The document is rebuilt when a
reload swaps in another model version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from ranker.serving.formats import ARROW_STREAM, JSON
from ranker.serving.parsing import DECIMAL_RE2, INT64_MAX, INT64_MIN, Column
from ranker.serving.predictor import LoadedModel

_ARROW_TYPES = {"dense": "any integer, floating or decimal type", "int": "any integer type or boolean, or strings of decimal digits",
                "str": "string, large_string or dictionary<string>"}


def _value_schema(c: Column) -> dict[str, Any]:
    if c.type == "dense":
        return {"type": "number"}
    if c.kind == "int":
        # booleans too: a boolean training column is an int64 id column (hashed as 0/1)
        return {"anyOf": [{"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}, {"type": "string", "pattern": DECIMAL_RE2},
                          {"type": "boolean"}]}
    return {"type": "string"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [*schema["anyOf"], {"type": "null"}]} if "anyOf" in schema else {"anyOf": [schema, {"type": "null"}]}


def _feature_schema(c: Column, features: str, column: bool, max_items: int) -> dict[str, Any]:
    """One request key: its value (or, column-wise, its list of one value per candidate)."""
    value = _nullable(_value_schema(c))
    if c.type == "multi_hot":
        value = _nullable({"type": "array", "items": value})
    kind = f", {c.kind} values" if c.kind else ""
    desc = f"{features} ({c.type}{kind}); null or absent: missing"
    if column:
        values = {"type": "array", "minItems": 1, "maxItems": max_items, "items": value}
        return {"anyOf": [values, {"type": "null"}], "description": f"one value per candidate: {desc}"}
    return {**value, "description": desc}


def _arrow_description(loaded: LoadedModel) -> str:
    lines = ["An Arrow IPC stream, one row per candidate; columns named by request key (others ignored):"]
    for c, names in _columns(loaded):
        typ = _ARROW_TYPES["dense" if c.type == "dense" else c.kind or "str"]
        typ = f"list of ({typ})" if c.type == "multi_hot" else typ
        lines.append(f"- `{c.source}` ({names}): {typ}")
    return "\n".join(lines)


def _columns(loaded: LoadedModel) -> list[tuple[Column, str]]:
    by_source: dict[str, list[str]] = {}
    for f in loaded.bundle.config.features:
        by_source.setdefault(f.source, []).append(f.name)
    return [(c, "feature " + ", ".join(f"`{n}`" for n in by_source[c.source])) for c in loaded.parser.columns]


def predict_schemas(loaded: LoadedModel) -> dict[str, dict[str, Any]]:
    """JSON schemas of the bundle's /predict bodies and answer (OpenAPI 3.1 components).

    Example:
        >>> predict_schemas(loaded)["PredictColumns"]["properties"]["price"]  # doctest: +SKIP
        {'anyOf': [{'type': 'array', 'minItems': 1, 'maxItems': 10000, 'items': {'anyOf': [{'type': 'number'}, {'type': 'null'}]}}, ...]}
    """
    cols, n = _columns(loaded), loaded.parser.max_items
    item = {"type": "object", "properties": {c.source: _feature_schema(c, d, False, n) for c, d in cols}, "additionalProperties": True}
    columns = {"type": "object", "properties": {c.source: _feature_schema(c, d, True, n) for c, d in cols}, "additionalProperties": True}
    ref = "#/components/schemas/"
    context = {"anyOf": [{"$ref": ref + "PredictItem"}, {"type": "null"}]}  # null: no context
    tasks = loaded.task_names
    return {
        "PredictItem": {**item, "title": "PredictItem", "description": "One candidate's features, keyed by request key."},
        "PredictColumns": {**columns, "title": "PredictColumns", "description": "Every column as long as the others."},
        "PredictRows": {
            "title": "PredictRows",
            "type": "object",
            "required": ["items"],
            "properties": {
                "context": {**context, "description": "values for every item; an item's own non-null value wins"},
                "items": {"type": "array", "minItems": 1, "maxItems": loaded.parser.max_items, "items": {"$ref": ref + "PredictItem"}},
            },
        },
        "PredictColumnar": {
            "title": "PredictColumnar",
            "type": "object",
            "required": ["columns"],
            "properties": {
                "context": {**context, "description": "values for every candidate; a column's own non-null value wins"},
                "columns": {"$ref": ref + "PredictColumns"},
            },
        },
        "PredictScores": {
            "title": "PredictScores",
            "type": "object",
            "required": ["model_version", "scores"],
            "properties": {
                "model_version": {"type": "string", "examples": [loaded.version]},
                "scores": {
                    "type": "object",
                    "description": "one score per candidate, in order, for each requested task (null: not finite)",
                    "properties": {t: {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "null"}]}} for t in tasks},
                    "additionalProperties": False,
                },
            },
        },
    }


def _patch(doc: dict[str, Any], loaded: LoadedModel, path: str) -> dict[str, Any]:
    ref = "#/components/schemas/"
    doc.setdefault("components", {}).setdefault("schemas", {}).update(predict_schemas(loaded))
    op = doc["paths"][path]["post"]
    op["description"] = (f"Scores candidates with model {loaded.version} ({loaded.architecture}); "
                         f"tasks {', '.join(loaded.task_names)}. JSON bodies row-wise (`items`) or column-wise (`columns`).")
    binary = {"type": "string", "format": "binary"}
    op["requestBody"] = {
        "required": True,
        "content": {
            JSON: {"schema": {"oneOf": [{"$ref": ref + "PredictRows"}, {"$ref": ref + "PredictColumnar"}]}},
            ARROW_STREAM: {"schema": {**binary, "description": _arrow_description(loaded)}},
        },
    }
    for p in op.get("parameters", []):
        if p["name"] == "tasks" and p["in"] == "query":
            p.update({
                "style": "form",
                "explode": False,
                "description": "comma-separated task names; default all",
                "schema": {"type": "array", "items": {"type": "string", "enum": loaded.task_names}},  # a repeated name counts once
            })
    ok = op["responses"]["200"]
    ok["content"] = {
        JSON: {"schema": {"$ref": ref + "PredictScores"}},
        ARROW_STREAM: {"schema": {**binary, "description": "one record batch, a float32 column per requested task; "
                                                            "the model version in the schema metadata (model_version)"}},
    }
    return doc


def bundle_openapi(app: FastAPI, current: Callable[[], LoadedModel], path: str) -> Callable[[], dict[str, Any]]:
    """A replacement for ``app.openapi``: FastAPI's document with ``path``'s operation typed
    from the model ``current()`` returns, rebuilt when that model changes."""
    cache: dict[str, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        loaded = current()
        if loaded.version not in cache:
            app.openapi_schema = None  # FastAPI's own cache
            cache.clear()
            cache[loaded.version] = _patch(FastAPI.openapi(app), loaded, path)
        app.openapi_schema = cache[loaded.version]
        return app.openapi_schema

    return openapi
