"""Resumable training state, written atomically; a resume that does not match is refused.

A checkpoint is one file ``step-<global step>.pt`` in ``train.checkpoint.dir`` holding
everything the rest of the run depends on: model, optimiser, weighting state (learned weights,
loss history, private generators), loss scaler, every rank's RNG states, the data cursor
(epoch and batches consumed in it: the stream is replayed up to there, shuffle buffer
included, so no row is skipped or repeated), early-stopping state with the best weights, the
history, and a fingerprint of config, data files and world size.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
final name (a rename within one file system is atomic), so a process killed at any moment
leaves either the previous checkpoints or the new one, never a torn file; leftovers of a killed
write are removed on the next write. Files are read with ``torch.load(weights_only=True)``:
tensors and plain containers only, no code.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ranker.errors import RankerError

_NAME = re.compile(r"^step-(\d{12})\.pt$")
FORMAT = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then keep the newest ``keep``."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".step-*.tmp*"):  # a write killed halfway
        stale.unlink(missing_ok=True)
    final = d / f"step-{step:012d}.pt"
    tmp = d / f".{final.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(d)
    for old in checkpoints(d)[keep:]:
        old.unlink(missing_ok=True)
    return final


def checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in ``folder``, newest (highest step) first."""
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(folder: str | Path, log: Any = None) -> dict[str, Any] | None:
    """The newest checkpoint that reads back whole, or None when there is none.

    A file that does not (truncated, or a member whose CRC fails: ``torch.load`` reads flipped
    bits without a word) is set aside as ``<name>.unreadable``: left in place it kept counting
    among the newest for pruning, which then deleted each new checkpoint below its step as
    soon as it was written."""
    for p in checkpoints(folder):
        try:
            with zipfile.ZipFile(p) as z:
                if (bad := z.testzip()) is not None:
                    raise ValueError(f"member {bad} fails its CRC")
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # an unreadable file: fall back to the one before
            aside = p.with_name(p.name + ".unreadable")
            try:
                os.replace(p, aside)  # another rank may have moved it already
            except OSError:
                pass
            if log:
                log(f"checkpoint {p} is unreadable ({type(e).__name__}: {e}); set aside as {aside.name}, trying an older one")
            continue
        if state.get("format") != FORMAT:
            raise RankerError(f"{p}: checkpoint format {state.get('format')!r}, this ranker writes {FORMAT}")
        state["path"] = str(p)
        return state
    return None


AT_DEFAULT: Any = object()  # ``first_difference``'s ``explicit`` for a part left wholly at its defaults


def first_difference(saved: Any, now: Any, where: str = "", explicit: Any = None) -> str | None:
    """The first key path where two JSON-like values differ, with both values, else None.

    ``explicit`` mirrors ``now`` with only the values that differ from their defaults (a
    config's ``model_dump(exclude_defaults=True)``; ``AT_DEFAULT`` for a part wholly at its
    defaults; None: no defaults known, compare strictly). A key that ``now`` has and ``saved``
    lacks is then accepted while ``now`` leaves it at its default: the key came into the config
    after the checkpoint was written, and keys come in with a default that keeps what runs did
    before. Every other difference, a key dropped since included, is reported.
    """
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in list(saved) + [k for k in now if k not in saved]:
            sub = f"{where}.{k}" if where else str(k)
            below = explicit.get(k, AT_DEFAULT) if isinstance(explicit, dict) else explicit
            if k not in saved and k in now and below is AT_DEFAULT:
                continue
            if k not in saved or k not in now:
                was = _short(saved[k]) if k in saved else "absent"
                is_now = _short(now[k]) if k in now else "absent"
                return f"{sub}: {was} in the checkpoint, {is_now} now"
            diff = first_difference(saved[k], now[k], sub, below)
            if diff:
                return diff
        return None
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)) and len(saved) == len(now):
        for i, (a, b) in enumerate(zip(saved, now, strict=True)):
            below = explicit[i] if isinstance(explicit, list) and len(explicit) == len(now) else (
                explicit if explicit is AT_DEFAULT else None)
            diff = first_difference(a, b, f"{where}[{i}]", below)
            if diff:
                return diff
        return None
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):  # lengths differ
        i = next((i for i, (a, b) in enumerate(zip(saved, now, strict=False)) if a != b), min(len(saved), len(now)))
        at = lambda v: _short(v[i]) if i < len(v) else "nothing"  # noqa: E731
        return f"{where}: {len(saved)} entries in the checkpoint, {len(now)} now; [{i}] was {at(saved)}, is {at(now)}"
    if saved != now:
        return f"{where}: {_short(saved)} in the checkpoint, {_short(now)} now"
    return None


def _short(value: Any, limit: int = 160) -> str:
    """repr cut to ``limit`` characters: a refusal names values, it does not dump lists."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 5] + " ...)"


def check_resume(path: str, saved: dict[str, Any], now: dict[str, Any], explicit: dict[str, Any] | None = None) -> None:
    """Refuse a resume whose config, data or world size differ from the checkpoint's.

    ``explicit``: ``now`` less its values at their defaults (see ``first_difference``), so a
    checkpoint written before a config key existed resumes while that key keeps its default.

    Raises:
        RankerError: one line naming the checkpoint and what changed.
    """
    diff = first_difference(saved, now, explicit=explicit)
    if diff:
        raise RankerError(f"--resume: {path} does not match this run: {diff}")
