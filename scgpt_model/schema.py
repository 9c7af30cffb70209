"""The data contract, defined once: special tokens, shard columns and their Arrow types.

Every writer (``ingest``) and every reader (``training``, ``eval``) imports these names;
nobody spells a column name or a special-token id by hand.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Special tokens come first in every vocabulary, in this order, so their ids are fixed.
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"  # reserved (end of cell); kept so ids match the reference layout
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)
PAD_ID = 0
CLS_ID = 1
EOC_ID = 2
N_SPECIAL = len(SPECIAL_TOKENS)

# Binning defaults (paper eq. 2): bins 1..n_bins-1 for nonzero values, 0 for zeros.
DEFAULT_N_BINS = 51
DEFAULT_SEED = 0
# The one n_bins range (ingest, binning, the model config): bins are stored as uint8, and there
# must be a zero bin and at least two nonzero ones (the quantile edges need two levels).
N_BINS_MIN, N_BINS_MAX = 3, 256


def n_bins_problem(n_bins: object) -> str | None:
    """What is wrong with ``n_bins`` (for a message that names the option), None when it is valid."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or not N_BINS_MIN <= n_bins <= N_BINS_MAX:
        return f"must be an integer from {N_BINS_MIN} to {N_BINS_MAX} (bins are stored as uint8), got {n_bins!r}"
    return None

# Shard columns. One row per cell; list columns are aligned and sorted by gene id.
SOMA_JOINID = "soma_joinid"
GENES = "genes"
COUNTS = "counts"
BINS = "bins"
N_GENES = "n_genes"
TOTAL_COUNTS = "total_counts"
OBS_COLUMNS: tuple[str, ...] = (
    "dataset_id",
    "assay",
    "cell_type",
    "tissue",
    "tissue_general",
    "disease",
    "donor_id",
    "suspension_type",
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field(SOMA_JOINID, pa.int64(), nullable=False),
        pa.field(GENES, pa.list_(pa.int32()), nullable=False),
        pa.field(COUNTS, pa.list_(pa.float32()), nullable=False),
        pa.field(BINS, pa.list_(pa.uint8()), nullable=False),
        pa.field(N_GENES, pa.int32(), nullable=False),
        pa.field(TOTAL_COUNTS, pa.float32(), nullable=False),
        *[pa.field(c, pa.dictionary(pa.int32(), pa.string())) for c in OBS_COLUMNS],
    ]
)

SHARD_COMPRESSION = "zstd"
# How shards are written (``pyarrow.parquet.write_table(table, path, **SHARD_WRITE_OPTIONS)``, in
# ``ingest.shard_writer``), per list column, each by what its values look like:
#   genes  - sorted within a cell: DELTA_BINARY_PACKED stores small deltas (one large jump per cell);
#   counts - float32 whose high bytes are mostly constant: BYTE_STREAM_SPLIT, then zstd;
#   bins   - uint8 (stored as INT32) with < 256 distinct values: dictionary (RLE-bit-packed indices).
# BYTE_STREAM_SPLIT stays on the FLOAT column only: on INT32 it is a Parquet 2.11 (2024) addition
# that pyarrow < 17, Spark on parquet-java < 1.14 and older DuckDB releases cannot decode. Against
# BYTE_STREAM_SPLIT on all three columns: 11% smaller shards for ~0.1 CPU-s more per 10k-cell write
# (BENCHMARKS.md, ingest writer section). Obs strings stay dictionary-encoded.
SHARD_WRITE_OPTIONS: dict = {
    "compression": SHARD_COMPRESSION,
    "compression_level": 1,
    "use_dictionary": [*OBS_COLUMNS, f"{BINS}.list.element"],
    "column_encoding": {f"{GENES}.list.element": "DELTA_BINARY_PACKED", f"{COUNTS}.list.element": "BYTE_STREAM_SPLIT"},
    "write_statistics": [SOMA_JOINID, N_GENES, TOTAL_COUNTS],
}

# Train/validation split is a deterministic function of soma_joinid (paper §4.8: 97% / 3%).
DEFAULT_VAL_FRACTION = 0.03
