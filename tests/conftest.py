"""Shared fixtures: tiny Parquet logs and one trained bundle per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.datagen import write_logs


@pytest.fixture(scope="session")
def tiny_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of config.yaml beside train/, val/, test/ Parquet folders."""
    return write_logs(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained for two epochs on ``tiny_logs``."""
    from ranker.config import load_config
    from ranker.training.trainer import Trainer

    cfg = load_config(tiny_logs)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    Trainer(cfg, progress=False, log=lambda s: None).run(out)
    return out
