"""Shards as Parquet, written by ``pyarrow.parquet`` with the contract's column encodings.

The encodings (``scgpt_model.schema.SHARD_WRITE_OPTIONS``) are chosen per list column: gene ids
(sorted within a cell) DELTA_BINARY_PACKED, counts BYTE_STREAM_SPLIT, bins (< 256 distinct
values) dictionary; obs strings dictionary; min/max statistics on the number columns, so readers
can prune by ``soma_joinid``. BYTE_STREAM_SPLIT is kept on the FLOAT column only: on INT32 it is
a 2024 addition to the format (Parquet 2.11) that pyarrow < 17 (this project's floor is 15),
Spark on parquet-java < 1.14 and older DuckDB releases cannot decode. The shards' readability by
DuckDB and Polars is tested (tests/test_shard_writer.py). The file carries Arrow's schema
(``ARROW:schema``), so ``pq.read_table`` returns the dictionary and uint8 types that were written.
What this costs per shard, next to the hand-written encoder it replaces, is in BENCHMARKS.md
(ingest writer section).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scgpt_model.schema import SHARD_WRITE_OPTIONS


def write_shard(table: pa.Table, path: str | Path) -> None:
    """Write one shard (a table with ``SHARD_SCHEMA``; one row group) to ``path`` as Parquet."""
    # one row group per shard (readers take a shard as one unit): a shard is ~10k cells, below the
    # default cap of 1Mi rows per row group, but say so rather than depend on the default
    pq.write_table(table, path, row_group_size=max(table.num_rows, 1), **SHARD_WRITE_OPTIONS)
