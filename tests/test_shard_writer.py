"""The shard writer (``ingest.shard_writer``, pyarrow's Parquet writer with the contract's column
encodings): the same table must come back from ``pq.read_table``, with the contract's types,
encodings and statistics; DuckDB and Polars must read a shard set with the same rows, list lengths
and values as pyarrow; BYTE_STREAM_SPLIT only where every reader users have decodes it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ingest.shard_writer as sw
from scgpt_model import schema as S

_DICT = pa.dictionary(pa.int32(), pa.string())


def _table(lens, *, seed=0, obs_nulls=False, n_words=3, value_nulls=False) -> pa.Table:
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens, dtype=np.int64)
    n = lens.size
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    genes = np.concatenate([np.sort(rng.choice(70_000, size=k, replace=False)) for k in lens]).astype(np.int32) \
        if n else np.zeros(0, np.int32)
    counts = rng.negative_binomial(1, 0.3, size=offsets[-1]).astype(np.float32) + 1
    bins = rng.integers(1, 51, size=offsets[-1]).astype(np.uint8)
    ids = np.sort(rng.choice(10**9, size=n, replace=False)).astype(np.int64)

    def lst(v, t):
        mask = None
        if value_nulls and v.size:
            mask = np.zeros(v.size, bool)
            mask[0] = True
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(v, type=t, mask=mask))

    cols = {S.SOMA_JOINID: pa.array(ids), S.GENES: lst(genes, pa.int32()), S.COUNTS: lst(counts, pa.float32()),
            S.BINS: lst(bins, pa.uint8()), S.N_GENES: pa.array(lens.astype(np.int32)),
            S.TOTAL_COUNTS: pa.array(np.add.reduceat(counts, offsets[:-1]) if n and offsets[-1] else
                                     np.zeros(n, np.float32), pa.float32())}
    for k, c in enumerate(S.OBS_COLUMNS):
        words = [f"{c} value {w} \u00e9" for w in range(n_words + k)]
        vals = [words[i % len(words)] if not (obs_nulls and i % 7 == 3) else None for i in range(n)]
        cols[c] = pa.array(vals, pa.string()).dictionary_encode().cast(_DICT)
    return pa.table(cols, schema=S.SHARD_SCHEMA)


def _roundtrip(tmp_path, table: pa.Table) -> tuple[pa.Table, pq.FileMetaData]:
    path = tmp_path / "shard.parquet"
    sw.write_shard(table, path)
    back = pq.read_table(path)
    assert back.schema.equals(S.SHARD_SCHEMA)
    assert back.equals(table.combine_chunks())
    md = pq.ParquetFile(path).metadata
    assert md.created_by.startswith("parquet-cpp-arrow version")  # pyarrow wrote it
    assert md.num_rows == table.num_rows and md.num_row_groups <= 1
    return back, md


def _columns(md: pq.FileMetaData) -> dict[str, pq.ColumnChunkMetaData]:
    rg = md.row_group(0)
    return {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}


def test_shard_roundtrip_encodings_and_statistics(tmp_path):
    rng = np.random.default_rng(1)
    table = _table(rng.integers(1, 3000, size=400))
    _, md = _roundtrip(tmp_path, table)
    assert md.num_rows == 400 and md.num_row_groups == 1
    cols = _columns(md)
    expected = {S.GENES: "DELTA_BINARY_PACKED", S.COUNTS: "BYTE_STREAM_SPLIT", S.BINS: "RLE_DICTIONARY"}
    for c, enc in expected.items():
        meta = cols[f"{c}.list.element"]
        assert enc in meta.encodings and meta.compression == "ZSTD", (c, meta.encodings)
        assert meta.num_values == len(table.column(c).combine_chunks().values)
    for c in S.OBS_COLUMNS:
        assert "RLE_DICTIONARY" in cols[c].encodings and cols[c].compression == "ZSTD"
    for c in (S.SOMA_JOINID, S.N_GENES, S.TOTAL_COUNTS):
        st = cols[c].statistics
        v = table.column(c).to_numpy()
        assert st.has_min_max and st.min == pytest.approx(v.min()) and st.max == pytest.approx(v.max())
        assert st.null_count == 0
    # statistics are usable for filtering, the way readers prune by joinid
    ids = table.column(S.SOMA_JOINID).to_numpy()
    got = pq.read_table(tmp_path / "shard.parquet", filters=[(S.SOMA_JOINID, ">=", int(ids[200]))])
    assert got.num_rows == 200


def test_byte_stream_split_only_on_floating_point_columns(tmp_path):
    # BYTE_STREAM_SPLIT on INT32/INT64 is a Parquet 2.11 addition that pyarrow < 17, Spark on
    # parquet-java < 1.14 and older DuckDB cannot decode; on FLOAT/DOUBLE every reader has it.
    _, md = _roundtrip(tmp_path, _table(np.full(50, 40), seed=5))
    for path, meta in _columns(md).items():
        if "BYTE_STREAM_SPLIT" in meta.encodings:
            assert meta.physical_type in ("FLOAT", "DOUBLE"), path


def test_many_pages_cells_larger_than_a_page_single_genes_and_empty_cells(tmp_path):
    # a data page holds ~1 MiB (262k INT32 values): the large cells fill several pages per column
    lens = [1, 1, 1, 200, 0, 5, 1, 63, 64, 65, 0, 0, 1, 69_000, 2, 0, *[60_000] * 8, 1]
    table = _table(lens, seed=2)
    _, md = _roundtrip(tmp_path, table)
    assert _columns(md)[f"{S.COUNTS}.list.element"].total_uncompressed_size > 2 << 20  # several pages
    back = pq.read_table(tmp_path / "shard.parquet")
    assert [len(x) for x in back.column(S.GENES).to_pylist()] == lens


def test_obs_nulls_large_dictionaries_and_chunked_input(tmp_path):
    table = _table(np.full(600, 3), seed=3, obs_nulls=True, n_words=300)
    chunked = pa.concat_tables([table.slice(0, 250), table.slice(250)])
    assert chunked.column(S.GENES).num_chunks == 2
    _roundtrip(tmp_path, chunked)
    _roundtrip(tmp_path, table.slice(123, 300))  # one chunk with a non-zero offset


@pytest.mark.parametrize("case", ["no rows", "null list values"])
def test_edge_tables_round_trip(tmp_path, case):
    table = _table([], seed=4) if case == "no rows" else _table([3, 4, 5], seed=4, value_nulls=True)
    back, _ = _roundtrip(tmp_path, table)
    assert back.num_rows == table.num_rows


def _shard_set(root) -> tuple[list, pa.Table]:
    """Three shards (empty cells, obs nulls, one-gene cells) under root/shards, and their rows."""
    (root / "shards").mkdir(parents=True)
    parts = [_table([5, 0, 1, 2000, 17], seed=10), _table(np.full(40, 300), seed=11, obs_nulls=True),
             _table([1, 1, 0, 0, 9], seed=12)]
    paths = []
    for k, t in enumerate(parts):
        paths.append(root / "shards" / f"part-{k:05d}.parquet")
        sw.write_shard(t, paths[-1])
    return paths, pa.concat_tables([pq.read_table(p) for p in paths]).sort_by(S.SOMA_JOINID)


def test_duckdb_reads_the_shard_set_like_pyarrow(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    _, ref = _shard_set(tmp_path)
    glob = str(tmp_path / "shards" / "*.parquet")
    rows = duckdb.sql(f"SELECT soma_joinid, genes, counts, bins, n_genes, len(genes) AS lg, len(counts) AS lc, "
                      f"len(bins) AS lb, cell_type FROM read_parquet('{glob}') ORDER BY soma_joinid").fetchall()
    assert len(rows) == ref.num_rows
    want = ref.to_pydict()
    assert [r[0] for r in rows] == want[S.SOMA_JOINID]
    lens = [len(g) for g in want[S.GENES]]
    assert [r[5] for r in rows] == [r[6] for r in rows] == [r[7] for r in rows] == lens == [r[4] for r in rows]
    assert [r[1] for r in rows] == want[S.GENES]
    assert [r[2] for r in rows] == want[S.COUNTS]
    assert [r[3] for r in rows] == want[S.BINS]
    assert [r[8] for r in rows] == want["cell_type"]  # nulls included


def test_polars_reads_the_shard_set_like_pyarrow(tmp_path):
    pl = pytest.importorskip("polars")
    _, ref = _shard_set(tmp_path)
    df = pl.scan_parquet(str(tmp_path / "shards" / "*.parquet")).sort(S.SOMA_JOINID).collect()
    assert df.height == ref.num_rows
    want = ref.to_pydict()
    assert df[S.SOMA_JOINID].to_list() == want[S.SOMA_JOINID]
    lens = [len(g) for g in want[S.GENES]]
    for c in (S.GENES, S.COUNTS, S.BINS):
        assert df[c].list.len().to_list() == lens
        assert df[c].to_list() == want[c]
    assert df[S.N_GENES].to_list() == lens
    assert df["cell_type"].cast(pl.String).to_list() == want["cell_type"]
