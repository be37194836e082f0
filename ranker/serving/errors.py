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
    "body_too_large",  # more than settings.max_body_bytes
    "unknown_task",  # ?tasks= names a task the model does not have
    "bad_columns",  # column-wise bodies: columns of different lengths
    "bad_arrow",  # not a readable Arrow IPC stream, or a column of a type the feature cannot take
    "bad_media_type",  # a Content-Type /predict does not read (415) or an Accept it cannot answer (406)
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
