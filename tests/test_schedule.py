"""Learning-rate schedules (train.lr_schedule): the factors, their config checks, and what the
trainer does with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ranker.config import LrSchedule, load_config, parse_config
from ranker.errors import RankerError
from ranker.training.schedule import build_schedule
from ranker.training.trainer import Trainer


def test_plateau_cuts_after_patience_restarts_its_count_and_stops_at_the_floor() -> None:
    s = build_schedule(LrSchedule(type="plateau", factor=0.5, patience=2, min_factor=0.2), epochs=10)
    assert s.factor(0, 0, 10) == 1.0
    assert s.end_of_epoch(False) is None and s.factor(1, 0, 10) == 1.0  # one bad epoch: not yet
    assert s.end_of_epoch(True) is None  # a gain restarts the count
    assert s.end_of_epoch(False) is None and s.factor(3, 5, 10) == 1.0
    assert "0.5 x train.lr" in (s.end_of_epoch(False) or "")
    assert s.factor(4, 0, 10) == 0.5
    s.end_of_epoch(False)
    s.end_of_epoch(False)
    assert s.factor(6, 0, 10) == 0.25
    s.end_of_epoch(False)
    s.end_of_epoch(False)
    assert s.factor(8, 0, 10) == 0.2  # floored at min_factor, and no more cuts logged
    assert s.end_of_epoch(False) is None and s.end_of_epoch(False) is None and s.factor(9, 0, 10) == 0.2
    other = build_schedule(LrSchedule(type="plateau", factor=0.5, patience=2, min_factor=0.2), epochs=10)
    other.load_state_dict(s.state_dict())
    assert other.factor(9, 0, 10) == 0.2 and other.state_dict() == s.state_dict()


def test_cosine_goes_from_one_to_the_floor_step_by_step() -> None:
    s = build_schedule(LrSchedule(type="cosine", min_factor=0.1), epochs=4)
    f = [s.factor(e, i, 10) for e in range(4) for i in range(10)]
    assert f[0] == 1.0
    assert all(a > b for a, b in zip(f, f[1:], strict=False))  # falls every step, not per epoch
    assert s.factor(2, 0, 10) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: half way down
    assert s.factor(4, 0, 10) == pytest.approx(0.1)
    assert build_schedule(LrSchedule(), epochs=4).factor(3, 9, 10) == 1.0  # constant, the default


def _raw(tiny_logs: Path, **train: object) -> dict:
    raw = yaml.safe_load(tiny_logs.read_text())
    raw["train"] = {**raw.get("train", {}), **train}
    return raw


def test_config_errors_name_the_key(tiny_logs: Path) -> None:
    with pytest.raises(RankerError, match=r"^cfg: train\.lr_schedule\.type: Input should be 'constant', 'plateau' or 'cosine'$"):
        parse_config(_raw(tiny_logs, lr_schedule={"type": "step"}), "cfg")
    with pytest.raises(RankerError, match=r"^cfg: train\.lr_schedule\.factor: "):
        parse_config(_raw(tiny_logs, lr_schedule={"type": "plateau", "factor": 1.5}), "cfg")
    with pytest.raises(RankerError, match=r"^cfg: train\.lr_schedule\.typo: unknown key$"):
        parse_config(_raw(tiny_logs, lr_schedule={"typo": 1}), "cfg")
    msg = r"^cfg: train: lr_schedule\.patience: 3 must be below train\.patience \(3\), or early stopping ends training before the first cut$"
    with pytest.raises(RankerError, match=msg):
        parse_config(_raw(tiny_logs, patience=3, lr_schedule={"type": "plateau", "patience": 3}), "cfg")
    parse_config(_raw(tiny_logs, patience=3, lr_schedule={"type": "cosine", "patience": 3}), "cfg")  # plateau's key only


def test_trainer_applies_the_plateau_cuts_it_decides(tiny_logs: Path, tmp_path: Path) -> None:
    """The recorded learning rate of every epoch is train.lr times the factor replayed from the
    recorded monitors; the run is chosen so that at least one cut happens."""
    cfg = load_config(tiny_logs)
    train = cfg.train.model_copy(update={"epochs": 6, "patience": 5, "lr": 0.03, "threads": 1,
                                         "lr_schedule": LrSchedule(type="plateau", factor=0.5, patience=1)})
    cfg = cfg.model_copy(update={"train": train})
    hist = Trainer(cfg, progress=False, log=lambda s: None).run(tmp_path / "b").metrics["history"]
    replay = build_schedule(train.lr_schedule, train.epochs)
    best = float("-inf")
    for h in hist:
        assert h["lr"] == pytest.approx(train.lr * replay.factor(h["epoch"] - 1, 0, 1))
        replay.end_of_epoch(h["monitor"] > best)
        best = max(best, h["monitor"])
    assert min(h["lr"] for h in hist) < train.lr, "no cut in this run: the test checks nothing"
