"""The shard-set manifest as types, the split rule and the file layout.

``manifest.json`` is written atomically (temporary file, fsync, rename) after every finished
shard, so at any moment it lists only complete shards. Its ``manifest_hash`` is the sha256 of
the canonical JSON (sorted keys, no whitespace) without that key; it holds no timestamps, so
two runs with the same arguments over the same data have the same hash.

:class:`Manifest` is read with :meth:`Manifest.load` (format, field types and hash checked) and
written with :meth:`Manifest.write`; nothing else reads a manifest key by string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FORMAT = "scgpt-census-shards/1"
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.json"
SHARDS_DIR = "shards"
SPLIT_RULE = "shardset.is_validation(soma_joinid, val_fraction, seed)"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, of another format or edited; the message names the fix."""


def shard_name(index: int) -> str:
    """Path of shard ``index`` relative to the shard-set folder."""
    return f"{SHARDS_DIR}/part-{index:05d}.parquet"


# ---- the split rule --------------------------------------------------------------------------
_SPLIT_SALT = 0x5EED5A17  # keeps the split hash independent of the binning tie hash
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser on uint64 (wrap-around arithmetic is intended). The same
    function as ``scgpt_model.binning._splitmix64`` (numba); tests bind both to golden values."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _C1
        x = (x ^ (x >> np.uint64(27))) * _C2
        return x ^ (x >> np.uint64(31))


def split_uniform(soma_joinid: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in [0, 1) per joinid, a pure function of (joinid, seed)."""
    ids = np.asarray(soma_joinid, dtype=np.int64).view(np.uint64)
    s = splitmix64(np.array([(int(seed) ^ _SPLIT_SALT) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h = splitmix64(ids ^ s[0])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def is_validation(soma_joinid: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: True for validation cells. Deterministic in (joinid, val_fraction, seed)."""
    return split_uniform(soma_joinid, seed) < float(val_fraction)


# ---- hashing and atomic IO -------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file (fsync, rename); on any failure (a full
    disk, an interrupt) the temporary file is removed and ``path`` keeps its old content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- typed records ---------------------------------------------------------------------------
def _check(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to the annotation ``tp`` (dataclasses, lists, dicts, X | None), or
    ManifestError naming the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
        return tp.from_dict(value, where=where)
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        (elem,) = typing.get_args(tp)
        return [_check(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    base = origin or tp
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
          dict: lambda v: isinstance(v, dict)}[base]
    if not ok(value):
        raise ManifestError(f"{where}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if base is float else value


class _Record:
    """from_dict / to_dict for the dataclasses below: every field required, no unknown keys."""

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "manifest"):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise ManifestError(f"{where}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown
                                                                          else [])))
        return cls(**{n: _check(data[n], hints[n], f"{where}.{n}") for n in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ShardEntry(_Record):
    """One finished shard, as its worker reported it."""

    index: int
    path: str            # relative to the shard-set folder (``shard_name(index)``)
    n_rows: int
    n_bytes: int
    sha256: str
    joinid_min: int      # of the chunk (cells below --min-genes included)
    joinid_max: int
    n_train: int
    n_val: int
    nnz: int
    n_dropped_min_genes: int


@dataclass(frozen=True, slots=True)
class Totals(_Record):
    cells_matched: int
    cells_planned: int
    cells: int
    cells_dropped_min_genes: int
    nonzeros: int
    n_train: int
    n_val: int
    genes_in_vocab: int
    genes_dropped: int
    genes_dropped_examples: list[str]

    @classmethod
    def of(cls, shards: list[ShardEntry], *, cells_matched: int, cells_planned: int, genes_in_vocab: int,
           genes_dropped: int, genes_dropped_examples: list[str]) -> Totals:
        return cls(cells_matched=cells_matched, cells_planned=cells_planned, cells=sum(s.n_rows for s in shards),
                   cells_dropped_min_genes=sum(s.n_dropped_min_genes for s in shards),
                   nonzeros=sum(s.nnz for s in shards), n_train=sum(s.n_train for s in shards),
                   n_val=sum(s.n_val for s in shards), genes_in_vocab=genes_in_vocab, genes_dropped=genes_dropped,
                   genes_dropped_examples=list(genes_dropped_examples))


@dataclass(frozen=True, slots=True)
class DatasetRef(_Record):
    """One source dataset of a shard set (from the store's ``census_info/datasets``): what a model
    pretrained on the set has seen, so that evaluation can warn when it scores on the same cells."""

    dataset_id: str
    title: str
    collection_name: str
    h5ad_path: str       # the dataset's file as the store names it ('' when the store does not say)
    n_cells: int         # cells of this dataset in the shard set's plan (before --min-genes)


@dataclass(frozen=True, slots=True)
class Manifest(_Record):
    """A shard set: its source and query, token settings, split, the finished shards.

    ``source`` is what the data came from: ``{"kind": "uri", "uri": ...}`` or ``{"kind": "census",
    "census_version": ..., ...}`` plus the store's identity; ``args`` is the fingerprint a re-run
    of ``ingest census`` into the same folder must match.
    """

    source: dict
    organism: str
    obs_filter: str
    vocab_hash: str
    vocab_size: int
    gene_key: str
    n_bins: int
    seed: int
    val_fraction: float
    args: dict
    n_shards_planned: int
    complete: bool
    totals: Totals
    shards: list[ShardEntry]
    project_version: str = "unknown"
    columns: list[str] = field(default_factory=list)
    datasets: list[DatasetRef] = field(default_factory=list)
    split: str = SPLIT_RULE
    format: str = MANIFEST_FORMAT

    # ---- what readers ask
    @property
    def census_version(self) -> str:
        """The public Census release, or '' for a store given by URI."""
        return str(self.source.get("census_version", ""))

    @property
    def min_genes(self) -> int:
        return max(int(self.args.get("min_genes", 1) or 1), 1)

    def split_of(self, soma_joinid: np.ndarray) -> np.ndarray:
        """(n,) bool, True for validation cells, by this shard set's split settings."""
        return is_validation(soma_joinid, self.val_fraction, self.seed)

    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    def to_json(self) -> dict:
        """The manifest as written: its fields plus ``manifest_hash``."""
        return {**self.to_dict(), "manifest_hash": self.hash()}

    # ---- IO
    def write(self, folder: str | Path) -> str:
        """Write ``<folder>/manifest.json`` atomically; returns the manifest hash."""
        data = self.to_json()
        atomic_write_bytes(Path(folder) / MANIFEST_FILE, json.dumps(data, indent=1, sort_keys=True).encode())
        return data["manifest_hash"]

    @classmethod
    def from_json(cls, data: Any, *, where: str = MANIFEST_FILE) -> Manifest:
        """A manifest from its JSON object; checks the format, every field's type and the hash."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where} is not a {MANIFEST_FORMAT} manifest; re-run `ingest census` into a "
                                "fresh --out")
        body = {k: v for k, v in data.items() if k != "manifest_hash"}
        try:
            m = cls.from_dict(body, where=where)
        except ManifestError as e:
            raise ManifestError(f"{e}; the manifest was not written by this version of `ingest census` (or was "
                                "edited): re-run `ingest census` into a fresh --out") from None
        if data.get("manifest_hash") != m.hash():
            # `ingest validate` and a re-run into the same --out both stop at this very check, so the
            # only fix that works is a new manifest: a fresh ingest
            raise ManifestError(f"{where}: manifest_hash does not match its content (the file was edited or "
                                "damaged after ingest), so the shard set cannot be trusted: ingest again into a "
                                "fresh --out, or delete this folder and re-run the `ingest census` command that "
                                "wrote it")
        return m

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """The manifest of a shard set (``path`` is the shard-set folder or its manifest file)."""
        path = Path(path)
        file = path / MANIFEST_FILE if path.is_dir() else path
        if not file.exists():
            raise ManifestError(f"{file} not found: {path} is not a shard set written by `ingest census`")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{file} is not valid JSON ({e}); re-run `ingest census` into a fresh --out") from e
        return cls.from_json(data, where=str(file))

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)
