"""The shard-set manifest: what a shard set is, where it came from, and the train/val split.

``manifest.json`` is written atomically (temporary file, fsync, rename) after every finished
shard, so at any moment it lists only complete shards. Its ``manifest_hash`` is the sha256 of
the canonical JSON (sorted keys, no whitespace) without that key; it holds no timestamps, so
two runs with the same arguments over the same data have the same hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ingest.errors import IngestError
from scgpt_model.schema import MANIFEST_FILE

MANIFEST_FORMAT = "scgpt-census-shards/1"
_SPLIT_SALT = 0x5EED5A17  # keeps the split hash independent of the binning tie hash
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser on uint64 (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _C1
        x = (x ^ (x >> np.uint64(27))) * _C2
        return x ^ (x >> np.uint64(31))


def split_uniform(soma_joinid: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in [0, 1) per joinid, a pure function of (joinid, seed)."""
    ids = np.asarray(soma_joinid, dtype=np.int64).view(np.uint64)
    s = _splitmix64(np.array([(int(seed) ^ _SPLIT_SALT) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h = _splitmix64(ids ^ s[0])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def is_validation(soma_joinid: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: True for validation cells. Deterministic in (joinid, val_fraction, seed)."""
    return split_uniform(soma_joinid, seed) < float(val_fraction)


# ---- hashing and atomic IO -------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "manifest_hash"})).hexdigest()


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out: str | Path, manifest: dict) -> dict:
    """Set ``manifest_hash`` and write ``<out>/manifest.json`` atomically; returns the manifest."""
    manifest = dict(manifest)
    manifest["manifest_hash"] = compute_manifest_hash(manifest)
    atomic_write_bytes(Path(out) / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def load_manifest(path: str | Path) -> dict:
    """Read a shard set's manifest (``path`` is the shard directory or the manifest file).

    Raises IngestError when it is missing, unparsable, of another format, or its hash does
    not match its content (edited or truncated by hand).
    """
    path = Path(path)
    file = path / MANIFEST_FILE if path.is_dir() else path
    if not file.exists():
        raise IngestError(f"{file} not found: {path} is not a shard set written by `ingest census`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngestError(f"{file} is not valid JSON ({e}); re-run `ingest census` into a fresh --out") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IngestError(f"{file} is not a {MANIFEST_FORMAT} manifest; re-run `ingest census` into a fresh --out")
    if manifest.get("manifest_hash") != compute_manifest_hash(manifest):
        raise IngestError(f"{file}: manifest_hash does not match its content (edited by hand?); "
                          "re-run `ingest census` with the same arguments to rebuild it")
    return manifest
