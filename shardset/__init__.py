"""The shard-set contract: what ``ingest census`` writes and ``train``/``ingest validate`` read.

One owner for the manifest (typed, validated on load), the train/validation split rule and the
file layout of a shard set (``manifest.json``, ``vocab.json``, ``shards/part-NNNNN.parquet``).
The token contract (special tokens, shard columns and their Arrow types) stays in
``scgpt_model.schema``.
"""

from shardset.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    SHARDS_DIR,
    SPLIT_RULE,
    VOCAB_FILE,
    DatasetRef,
    Manifest,
    ManifestError,
    ShardEntry,
    Totals,
    atomic_write_bytes,
    canonical_json,
    is_validation,
    sha256_file,
    shard_name,
    split_uniform,
)

__all__ = [
    "MANIFEST_FILE", "MANIFEST_FORMAT", "SHARDS_DIR", "SPLIT_RULE", "VOCAB_FILE", "DatasetRef", "Manifest",
    "ManifestError",
    "ShardEntry", "Totals", "atomic_write_bytes", "canonical_json", "is_validation", "sha256_file", "shard_name",
    "split_uniform",
]
