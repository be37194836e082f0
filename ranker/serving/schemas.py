"""Request and response schemas of the HTTP API (pydantic), and the /predict response encoder.

``PredictRequest`` documents the body; the server does not validate it item by item with
pydantic (that is the slow path of ``parsing``), because features are read column-wise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

FeatureValue = int | float | str | list[int | str | None] | None


class PredictRequest(BaseModel):
    """Feature values keyed by source column. Context values apply to every item; an item's
    own non-null value wins. A missing or null feature counts as missing. int64 ids may be
    JSON integers or decimal strings."""

    context: dict[str, FeatureValue] = Field(default_factory=dict, examples=[{"user_id": "1152921504606846976", "device": "ios"}])
    items: list[dict[str, FeatureValue]] = Field(min_length=1, examples=[[{"item_category": "c3", "price": 12.5}]])


class PredictResponse(BaseModel):
    model_version: str
    # one score per item, in item order; probabilities for binary tasks, label units for
    # regression; null only where the model produced a non-finite number
    scores: dict[str, list[float | None]]


class ErrorResponse(BaseModel):
    detail: str  # starts with the field at fault, e.g. "items[3].price: ..."
    reason: str | None = None
    field: str | None = None


class Health(BaseModel):
    status: Literal["ok", "ready", "not ready"]
    model_version: str | None = None


class TaskInfo(BaseModel):
    name: str
    type: str
    transform: str


class FeatureInfo(BaseModel):
    name: str
    type: str
    column: str  # the request key
    kind: Literal["int", "str"] | None  # value type of categorical and multi-hot features


class ModelInfo(BaseModel):
    version: str
    architecture: str
    created_at: str | None
    bundle: str
    tasks: list[TaskInfo]
    features: list[FeatureInfo]
    metrics: dict[str, Any]  # the bundle's metrics.json (validation/test metrics per task)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(min_length=1, description="bundle folder on the server's file system")


class ReloadResponse(BaseModel):
    previous_version: str
    model_version: str
    architecture: str
    tasks: list[str]


def _floats(scores: np.ndarray) -> str:
    """Comma-separated scores, formatted in C++ by Arrow's float -> string cast (the shortest
    text that round-trips the float32 exactly; twice as fast as one "%.9g" format call and four
    times json.dumps)."""
    if np.isfinite(scores).all():
        text = pc.cast(pa.array(scores), pa.string())
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(text)], pa.int32()), text), ",")
        return joined[0].as_py()
    return json.dumps([v if math.isfinite(v) else None for v in scores.tolist()])[1:-1]


def encode_predict_response(version: str, scores: Mapping[str, np.ndarray]) -> bytes:
    """The JSON of a ``PredictResponse`` built directly from float32 score arrays."""
    body = ",".join(f"{json.dumps(task)}:[{_floats(s)}]" for task, s in scores.items())
    return f'{{"model_version":{json.dumps(version)},"scores":{{{body}}}}}'.encode()
