"""Serving errors: each maps to one HTTP status and names the request field at fault."""

from __future__ import annotations

from typing import Literal, get_args

from ranker.errors import RankerError

# Why a /predict request was refused: the label values of ranker_invalid_requests_total.
Reason = Literal[
    "bad_json",  # not one JSON object
    "bad_type",  # a value of the wrong type, an item that is not an object, items and columns both
    "non_finite",  # NaN or +-inf in a dense feature
    "empty_items",  # "items" missing or []
    "too_many_items",  # more than settings.max_items
    "too_many_values",  # a candidate's multi-hot list longer than settings.max_list_values
    "body_too_large",  # more than settings.max_body_bytes
    "unknown_task",  # ?tasks= names a task the model does not have
    "bad_columns",  # column-wise bodies: columns of different lengths
    "bad_arrow",  # not a readable Arrow IPC stream, or a column of a type the feature cannot take
    "bad_media_type",  # a Content-Type or Content-Encoding not read (415), an Accept not answered or malformed (406)
]
REASONS: tuple[str, ...] = get_args(Reason)


class ServingError(RankerError):
    """A refused request: ``status`` and a message starting with the field at fault;
    ``close`` asks to close the connection after the answer (the request was not read whole)."""

    def __init__(self, status: int, reason: str, field: str, message: str, close: bool = False) -> None:
        super().__init__(f"{field}: {message}")
        self.status, self.reason, self.field, self.close = status, reason, field, close


class RequestError(ServingError):
    """A bad /predict request; counted in ranker_invalid_requests_total{reason}."""

    def __init__(self, reason: Reason, field: str, message: str, status: int = 422, close: bool = False) -> None:
        super().__init__(status, reason, field, message, close)


# Why a POST /feedback event was not counted: outcome values of ranker_feedback_events_total
# (besides "accepted") and the keys of the answer's "rejected".
FeedbackReason = Literal[
    "bad_event",  # not an object with model_version and task (strings), score and label (numbers)
    "unknown_model_version",  # a version this server has not loaded (labels stay bounded)
    "unknown_task",  # not a task of that model version
    "non_finite",  # score or label NaN or infinite
    "score_out_of_range",  # a binary task's score outside [0, 1]; a regression task's below 0
    "bad_label",  # a binary task's label other than 0 or 1; a regression task's below 0
]
FEEDBACK_REASONS: tuple[str, ...] = get_args(FeedbackReason)
# Why a whole POST /feedback request was refused: ranker_feedback_invalid_requests_total{reason}
# (unauthorized: a 401, no or the wrong RANKER_FEEDBACK_TOKEN).
FEEDBACK_REQUEST_REASONS = ("bad_json", "bad_type", "too_many_items", "body_too_large", "bad_media_type", "unauthorized")
