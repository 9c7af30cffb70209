"""The specialised shard writer (ingest.shard_writer) against Arrow's own Parquet writer: the same
table must come back from ``pq.read_table``, with the contract's types, encodings and statistics."""

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
    ref = tmp_path / "ref.parquet"
    pq.write_table(table, ref, **S.SHARD_WRITE_OPTIONS)
    back = pq.read_table(path)
    assert back.schema.equals(S.SHARD_SCHEMA)
    assert back.equals(pq.read_table(ref))
    assert back.equals(table.combine_chunks())
    return back, pq.ParquetFile(path).metadata


def test_shard_roundtrip_encodings_and_statistics(tmp_path):
    rng = np.random.default_rng(1)
    table = _table(rng.integers(1, 3000, size=400))
    _, md = _roundtrip(tmp_path, table)
    assert md.created_by == sw.CREATED_BY and md.num_rows == 400 and md.num_row_groups == 1
    rg = md.row_group(0)
    cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
    for c in (S.GENES, S.COUNTS, S.BINS):
        meta = cols[f"{c}.list.element"]
        assert "BYTE_STREAM_SPLIT" in meta.encodings and meta.compression == "ZSTD"
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


def test_many_pages_cells_larger_than_a_page_single_genes_and_empty_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(sw, "PAGE_VALUES", 64)  # pages end on cell boundaries; some cells span > 1 page
    lens = [1, 1, 1, 200, 0, 5, 1, 63, 64, 65, 0, 0, 1, 300, 2]
    _, md = _roundtrip(tmp_path, _table(lens, seed=2))
    assert md.row_group(0).column(1).total_compressed_size > 0


def test_obs_nulls_large_dictionaries_and_chunked_input(tmp_path):
    table = _table(np.full(600, 3), seed=3, obs_nulls=True, n_words=300)
    chunked = pa.concat_tables([table.slice(0, 250), table.slice(250)])
    assert chunked.column(S.GENES).num_chunks == 2
    _roundtrip(tmp_path, chunked)
    _roundtrip(tmp_path, table.slice(123, 300))  # one chunk with a non-zero offset


@pytest.mark.parametrize("case", ["no rows", "null list values"])
def test_tables_it_does_not_specialise_go_to_arrow(tmp_path, case):
    table = _table([], seed=4) if case == "no rows" else _table([3, 4, 5], seed=4, value_nulls=True)
    assert not sw._specialised(table)
    back, md = _roundtrip(tmp_path, table)
    assert md.created_by.startswith("parquet-cpp")  # Arrow wrote it
    assert back.num_rows == table.num_rows


def test_thrift_compact_varints_and_field_deltas():
    t = sw._Thrift()
    t.struct([(1, "i32", -1), (2, "i64", 300), (20, "bin", "ab"), (21, "bool", True), (22, "list:i32", [1] * 16)])
    # field 1 i32 zigzag(-1)=1; field 2 i64 zigzag(300)=600 -> varint 0xd8 0x04; field 20: long form
    # (type byte, zigzag id 40); bool true in the header; a 16-element list uses the long size form
    assert bytes(t.out) == bytes([0x15, 0x01, 0x16, 0xD8, 0x04, 0x08, 0x28, 0x02, ord("a"), ord("b"), 0x11,
                                  0x19, 0xF5, 0x10]) + bytes([0x02] * 16) + b"\x00"
