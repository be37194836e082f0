"""Request and response schemas of the HTTP API (pydantic), and the /predict response encoder.

``PredictRequest`` documents the body; the server does not validate it item by item with
pydantic (that is the slow path of ``parsing``), because features are read column-wise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

FeatureValue = int | float | str | list[int | str | None] | None


class PredictRequest(BaseModel):
    """Feature values keyed by source column. Context values apply to every item; an item's
    own non-null value wins. A missing or null feature counts as missing. int64 ids may be
    JSON integers, decimal strings or booleans (hashed as 0/1)."""

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
    # the column whose value 1 marks the rows this task is labelled on (cvr: click): /feedback
    # events for the task belong to those rows only, as its training labels did
    mask: str | None = None


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


class FeedbackEvent(BaseModel):
    """One labelled event: the score a model version served for a task, and the final label."""

    model_version: str = Field(examples=["3f2a9c01d4e5b6a7"])
    task: str = Field(examples=["ctr"])
    score: float = Field(description="the served score: a probability for a binary task, label units for regression")
    label: float = Field(description="0 or 1 for a binary task; the observed value for regression")


class FeedbackRequest(BaseModel):
    events: list[FeedbackEvent]


def _feedback_request_schema() -> dict[str, Any]:
    """The request's JSON schema with the event schema inlined (OpenAPI has no ``$defs``)."""
    schema = FeedbackRequest.model_json_schema()
    schema["properties"]["events"]["items"] = schema.pop("$defs")["FeedbackEvent"]
    return schema


FEEDBACK_REQUEST_SCHEMA = _feedback_request_schema()


class FeedbackResponse(BaseModel):
    accepted: int
    rejected: dict[str, int]  # refused events by reason
    detail: dict[str, str] | None = None  # per reason, the first refused event and why


def encode_predict_response(version: str, scores: Mapping[str, np.ndarray]) -> bytes:
    """The JSON of a ``PredictResponse`` built directly from float32 score arrays: orjson
    writes each float32 in C as the shortest text that reads back to the same float32 (four
    times faster than formatting through Arrow), and a non-finite score as null."""
    arrays = {t: np.ascontiguousarray(s, dtype=np.float32) for t, s in scores.items()}  # orjson takes C order only
    return orjson.dumps({"model_version": version, "scores": arrays}, option=orjson.OPT_SERIALIZE_NUMPY)
