"""Small file-system helpers shared by the writers of bundles, synthetic logs and configs."""

from __future__ import annotations

import os
from pathlib import Path


def write_problem(folder: str | Path) -> tuple[Path, str] | None:
    """Why this process could not create files in ``folder`` (which may not exist yet, the
    rest of its path being created on write), judged at the nearest folder on its path that
    exists: ``(that path, "is a file")`` or ``(that folder, "is not writable")``, so that
    ``f"{path} {why}"`` reads as a sentence; None if it can."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return probe, "is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return probe, "is not writable"
    return None


def umask() -> int:
    """This process's umask, read without changing it where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a moment's window for other threads)
    os.umask(mask)
    return mask


def usual_mode(path: str | Path) -> None:
    """Give a ``tempfile.mkdtemp``/``mkstemp`` result (owner-only) the permissions a plain
    ``mkdir``/``open`` would have had under the umask, before it is renamed into place, so
    that a reader under another user (a serving container) can open what was written."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~umask())
