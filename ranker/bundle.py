"""The bundle: the only thing that crosses from training to serving.

    BUNDLE_DIR/model.safetensors   weights (no pickle anywhere)
    BUNDLE_DIR/manifest.json       config, featurizer state, tasks, reference histograms, version
    BUNDLE_DIR/metrics.json        {"val": {task: {metric: v}}, "test": {...}, "throughput": {...}}

Writes go to a temporary sibling folder that is renamed into place, so a reader never sees a
half-written bundle. The version id is a content hash of the weights and the manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ranker import __version__
from ranker.config import RankerConfig, parse_config
from ranker.errors import RankerError
from ranker.features import Featurizer
from ranker.files import usual_mode, write_problem
from ranker.model import MultiTaskRanker, build_ranker

FORMAT = 1
WEIGHTS, MANIFEST, METRICS = "model.safetensors", "manifest.json", "metrics.json"


@dataclass
class Bundle:
    path: Path
    config: RankerConfig
    featurizer: Featurizer
    model: MultiTaskRanker
    manifest: dict
    metrics: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def reference(self) -> dict[str, dict[str, list[float]]]:
        return self.manifest["reference"]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def json_safe(obj: object) -> object:
    """NaN and infinities (an undefined metric: AUC of a split with one class) as JSON null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _json_bytes(obj: object) -> bytes:
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False).encode()


def check_bundle_target(out: str | Path, key: str = "--out") -> Path:
    """Refuse, before any work, a bundle destination that writing would damage or cannot reach:
    a file, a folder that holds anything but a bundle's files (it is replaced whole), a
    parent path that runs into a file, or a folder this process cannot write. An absent
    ``out`` (created on write) and an earlier bundle (replaced atomically) are fine.

    Raises:
        RankerError: one line naming ``key`` and the path at fault.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise RankerError(f"{key}: {out} exists and is not a folder; a bundle is a folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS, MANIFEST, METRICS))
        if foreign:
            raise RankerError(f"{key}: {out} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                              "so it is not a ranker bundle; writing one there would replace the folder whole; "
                              "choose an empty or new folder")
    problem = write_problem(out.absolute().parent)  # where the new bundle is first written, as a sibling
    if problem is not None:
        at, why = problem
        raise RankerError(f"{key}: {out} cannot be created: {at} is a file" if why == "is a file"
                          else f"{key}: {out}: no permission to write in {at}")
    return out


def write_atomic_dir(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh sibling folder, then swap it in for ``out``. The folder
    gets the usual permissions under the umask (``mkdtemp`` makes it owner-only), so a server
    under another user can read it."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise RankerError(f"{out}: cannot write a bundle there ({e.strerror or e})") from None
    try:
        usual_mode(tmp)
        for name, data in files.items():
            _fsync_write(tmp / name, data)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "b")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous bundle back: --out must not be left missing
                os.replace(old / "b", out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RankerError(f"{out}: cannot write a bundle there ({e.strerror or e}); nothing there was changed") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_bundle(
    out: str | Path,
    config: RankerConfig,
    featurizer: Featurizer,
    model: MultiTaskRanker,
    reference: dict[str, dict[str, list[float]]],
    metrics: dict,
) -> str:
    """Write a bundle atomically; returns its version id."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as td:
        save_file(state, os.path.join(td, WEIGHTS), metadata={"format": str(FORMAT)})
        weights = Path(td, WEIGHTS).read_bytes()
    manifest = {
        "format": FORMAT,
        "ranker_version": __version__,
        "config": config.model_dump(mode="json"),
        "featurizer": featurizer.state(),
        "tasks": [t.model_dump(mode="json") for t in config.tasks],
        "reference": reference,
    }
    version = hashlib.sha256(weights + _json_bytes(manifest)).hexdigest()[:16]
    manifest["version"] = version
    manifest["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_atomic_dir(check_bundle_target(out), {WEIGHTS: weights, MANIFEST: _json_bytes(manifest), METRICS: _json_bytes(metrics)})
    return version


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RankerError(f"{path}: missing from the bundle")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RankerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RankerError(f"{path}: expected a JSON object")
    return obj


def _pre_encoding_compat(manifest: dict) -> object:
    """A bundle written before numeric encodings (no fitted ``edges``) standardised every dense
    feature: pin those features' encoding so today's default does not reinterpret its weights."""
    raw, state = manifest["config"], manifest["featurizer"]
    if not isinstance(raw, dict) or not isinstance(state, dict) or "edges" in state:
        return raw
    feats = raw.get("features")
    if not isinstance(feats, list):
        return raw
    pinned = [
        {**f, "encoding": "log1p" if f.get("transform") == "log1p" else "standard"}
        if isinstance(f, dict) and f.get("type") == "dense" and f.get("encoding") is None else f
        for f in feats
    ]
    return {**raw, "features": pinned}


def load_bundle(path: str | Path) -> Bundle:
    """Load and check a bundle; any defect is a RankerError naming the file at fault."""
    p = Path(path)
    if not p.is_dir():
        raise RankerError(f"{p}: bundle folder not found")
    manifest = _read_json(p / MANIFEST)
    metrics = _read_json(p / METRICS)
    for key in ("format", "version", "config", "featurizer", "reference"):
        if key not in manifest:
            raise RankerError(f"{p / MANIFEST}: missing key {key!r}")
    if manifest["format"] != FORMAT:
        raise RankerError(f"{p / MANIFEST}: format {manifest['format']!r} is not supported (expected {FORMAT})")
    config = parse_config(_pre_encoding_compat(manifest), f"{p / MANIFEST}: config")
    try:
        featurizer = Featurizer.from_state(config.features, manifest["featurizer"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RankerError(f"{p / MANIFEST}: featurizer state is malformed ({e!r})") from None
    model = build_ranker(config.features, config.tasks, config.model)
    weights = p / WEIGHTS
    if not weights.is_file():
        raise RankerError(f"{weights}: missing from the bundle")
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankerError(f"{weights}: cannot load weights ({first})") from None
    model.eval()
    return Bundle(p, config, featurizer, model, manifest, metrics)


def probe(bundle: Bundle) -> None:
    """One forward on a tiny all-missing batch: catches a bundle that loads but cannot run."""
    import pyarrow as pa

    batch = bundle.featurizer.transform(pa.table({"__probe__": [0, 1]}))
    with torch.inference_mode():
        out = bundle.model.predict(batch)
    for task, s in out.items():
        if s.shape != (2,) or not torch.isfinite(s).all():
            raise RankerError(f"{bundle.path / WEIGHTS}: probe forward gave bad scores for task {task!r}")
