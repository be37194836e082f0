"""Server settings, validated once at start-up.

Values come from keyword arguments (the CLI's flags) over ``RANKER_<NAME>`` environment
variables over defaults. The admin token is read from the environment only
(``RANKER_ADMIN_TOKEN``), so it never shows in ``ps`` or shell history.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from ranker.errors import RankerError

ENV_PREFIX = "RANKER_"
ADMIN_TOKEN_ENV = "RANKER_ADMIN_TOKEN"
FEEDBACK_TOKEN_ENV = "RANKER_FEEDBACK_TOKEN"
# secret settings and the only variables they are read from; never serialised (a dump writes
# SecretStr as asterisks), so worker processes read them from the environment themselves
SECRET_ENV = {"admin_token": ADMIN_TOKEN_ENV, "feedback_token": FEEDBACK_TOKEN_ENV}


def _default_concurrency() -> int:
    # inference is CPU-bound: more in-flight forwards than cores only adds queueing inside torch
    return max(1, min(4, os.cpu_count() or 1))


class ServingSettings(BaseModel):
    """Everything the server needs besides the bundle's own contents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: Path
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    max_items: int = Field(default=10_000, gt=0)  # candidates per /predict request
    max_body_bytes: int = Field(default=16 * 2**20, gt=0)  # larger bodies get 413 before parsing
    # values in one candidate's multi-hot list: a bag is padded to the longest list of the
    # request, so one long list costs candidates x its length in memory
    max_list_values: int = Field(default=1_000, gt=0)
    # after a 413 the rest of the body is read and dropped (up to this many bytes, for at most
    # drain_seconds) so that clients which send the whole body before reading the answer see the
    # 413 instead of a connection reset; past either bound the connection is closed
    max_drain_bytes: int = Field(default=64 * 2**20, ge=0)
    drain_seconds: float = Field(default=5.0, ge=0)
    concurrency: int = Field(default_factory=_default_concurrency, gt=0)  # requests featurized/scored at once
    # requests allowed to wait for a worker; past that /predict sheds load with a 503 rather than
    # queueing without bound (every waiting request holds its body in memory)
    max_queue: int = Field(default=256, ge=0)
    admin_token: SecretStr | None = None  # None: POST /admin/reload answers 404
    # None: POST /feedback is open; else it needs "Authorization: Bearer <token>" (from the
    # RANKER_FEEDBACK_TOKEN environment variable only)
    feedback_token: SecretStr | None = None
    drift_window: int = Field(default=10_000, gt=0)  # recent scores per task behind ranker_task_drift_psi (NaN under min(1,000, this))
    warmup_rows: int = Field(default=1_000, gt=0)  # largest warm-up batch (capped at max_items) before ready
    # torch intra-op threads per forward; None = cores // (concurrency * workers), so concurrent forwards
    # do not oversubscribe the cores (OpenMP teams spin-wait: oversubscribed, a forward can
    # take 10-30x longer)
    torch_threads: int | None = Field(default=None, gt=0)
    # merge concurrent requests into one forward: the first waits at most this long for others
    # (0: off; never waits when no other request is in flight); meant for GPUs, where a forward's
    # cost hardly grows with its rows
    # worker processes sharing the port (each with `concurrency` request threads and its own
    # model copy): parsing and featurizing hold the GIL, so one process uses about one core
    workers: int = Field(default=1, ge=1, le=64)
    batch_window_ms: float = Field(default=0.0, ge=0, le=100)
    batch_max_items: int | None = Field(default=None, gt=0)  # candidates per merged forward (default max_items)

    @field_validator("admin_token", "feedback_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, v: object) -> object:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("device")
    @classmethod
    def _cuda_present(cls, v: str) -> str:
        if v == "cuda" and not torch.cuda.is_available():
            raise ValueError("'cuda' was asked for but torch sees no CUDA device; use auto or cpu")
        return v

    @property
    def intra_op_threads(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 1) // (self.concurrency * self.workers))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> ServingSettings:
        """Build settings from ``values`` (None means "not given") over ``RANKER_<NAME>`` variables.

        Raises:
            RankerError: naming the setting (and the variable it came from) at fault.
        """
        env = os.environ if env is None else env
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for name in cls.model_fields:
            key = SECRET_ENV.get(name, f"{ENV_PREFIX}{name.upper()}")
            if key in env:
                merged[name], origin[name] = env[key], key
        for name, v in values.items():
            if v is not None:
                if name in SECRET_ENV:
                    raise RankerError(f"{name}: set it with the {SECRET_ENV[name]} environment variable")
                merged[name], origin[name] = v, name
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "settings"
            where = origin.get(name, name)
            raise RankerError(f"serve: {where}: {err['msg'].removeprefix('Value error, ')}") from None
