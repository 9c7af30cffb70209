"""A Parquet writer specialised to the shard schema (``scgpt_model.schema.SHARD_SCHEMA``).

Why not ``pyarrow.parquet.write_table``: for the three list columns (``genes``, ``counts``,
``bins``; ~1,500 values per cell) Arrow's generic writer builds, histograms and RLE-encodes a
repetition and a definition level for every single value (47M levels per 10k-cell shard), which
costs more CPU than reading the chunk from TileDB. Shards have no nulls inside the lists and no
empty cells are required, so the levels are fully determined by the list offsets: here they are
emitted as RLE runs per cell (O(cells), not O(values)), the values are byte-stream-split in
numba and each page is compressed with zstd through Arrow's codec. About half the CPU of
``write_table`` per shard (``benchmarks/bench_ingest.py`` measures both).

The file is ordinary Parquet (format 2.6, one row group, data pages v1, the same encodings
``SHARD_WRITE_OPTIONS`` asks Arrow for: BYTE_STREAM_SPLIT list values, RLE levels, PLAIN numbers
with min/max statistics, dictionary-encoded obs strings) with the Arrow schema stored under
``ARROW:schema``, so ``pq.read_table`` returns exactly the table that was written, with its
dictionary and uint8 types. Tables this writer does not specialise for (other schemas, nulls in
the list values or in the numeric columns) go to ``write_table`` with ``SHARD_WRITE_OPTIONS``.
"""

from __future__ import annotations

import base64
import functools
import struct
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.csr import Scratch
from scgpt_model.schema import SHARD_SCHEMA, SHARD_WRITE_OPTIONS

CREATED_BY = "scgpt-census shard writer (ingest.shard_writer)"
PAGE_VALUES = 1 << 20  # list values per data page (4 MiB of INT32/FLOAT), pages end on cell boundaries
ZSTD_LEVEL = int(SHARD_WRITE_OPTIONS["compression_level"])
_PAGES = Scratch()  # one reused page buffer per process
# what pyarrow stores under ARROW:schema (the IPC-serialized schema, base64), so readers get the
# dictionary and uint8 types back
_ARROW_SCHEMA_B64 = base64.b64encode(SHARD_SCHEMA.serialize().to_pybytes()).decode()

# parquet.thrift enums
_INT32, _INT64, _FLOAT, _BYTE_ARRAY = 1, 2, 4, 6
_REQUIRED, _OPTIONAL, _REPEATED = 0, 1, 2
_PLAIN, _RLE, _RLE_DICTIONARY, _BYTE_STREAM_SPLIT = 0, 3, 8, 9
_ZSTD = 6
_DATA_PAGE, _DICTIONARY_PAGE = 0, 2
_CONVERTED_UTF8, _CONVERTED_LIST, _CONVERTED_UINT_8 = 0, 3, 11


# --------------------------------------------------------------------------- thrift compact protocol
class _Thrift:
    """Just enough of Thrift's compact protocol to write Parquet's FileMetaData and PageHeaders.
    Structs are lists of ``(field_id, kind, value)``; kinds: i32, i64, i8, bool, bin, struct, list:<kind>."""

    _TYPE = {"bool": 1, "i8": 3, "i32": 5, "i64": 6, "bin": 8, "list": 9, "struct": 12}

    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        while n > 0x7F:
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7
        self.out.append(n)

    def zigzag(self, n: int) -> None:
        self.varint((n << 1) ^ (n >> 63))

    def value(self, kind: str, v) -> None:
        if kind in ("i32", "i64"):
            self.zigzag(int(v))
        elif kind == "i8":
            self.out += struct.pack("<b", v)
        elif kind == "bin":
            b = v.encode() if isinstance(v, str) else bytes(v)
            self.varint(len(b))
            self.out += b
        elif kind == "struct":
            self.struct(v)
        elif kind.startswith("list:"):
            elem = kind[5:]
            t = self._TYPE[elem.split(":")[0]] if elem != "bool" else 1
            if len(v) < 15:
                self.out.append((len(v) << 4) | t)
            else:
                self.out.append(0xF0 | t)
                self.varint(len(v))
            for x in v:
                self.value(elem, x)
        else:
            raise ValueError(kind)

    def struct(self, fields: list[tuple[int, str, object]]) -> None:
        last = 0
        for fid, kind, v in fields:
            if v is None:
                continue
            t = (1 if v else 2) if kind == "bool" else self._TYPE[kind.split(":")[0]]
            if 0 < fid - last <= 15:
                self.out.append(((fid - last) << 4) | t)
            else:
                self.out.append(t)
                self.zigzag(fid)
            last = fid
            if kind != "bool":
                self.value(kind, v)
        self.out.append(0)  # stop


def _thrift(fields: list) -> bytes:
    t = _Thrift()
    t.struct(fields)
    return bytes(t.out)


# --------------------------------------------------------------------------- numba encoders
@numba.njit(cache=True, nogil=True)
def _put_run(out, w, length, value, value_bytes):
    """One RLE run of the RLE/bit-packed hybrid: varint(length << 1), then the value."""
    h = length << 1
    while h > 0x7F:
        out[w] = (h & 0x7F) | 0x80
        w += 1
        h >>= 7
    out[w] = h
    w += 1
    for k in range(value_bytes):
        out[w] = (value >> (8 * k)) & 0xFF
        w += 1
    return w


@numba.njit(cache=True, nogil=True)
def _list_levels(lens, max_def):
    """Repetition and definition levels of a list<non-null element> column as RLE runs, from the
    per-cell lengths: a cell of n > 0 values is rep 0 then n-1 times 1, def ``max_def`` n times;
    an empty cell is one level entry, rep 0 and def 0. Returns (rep bytes, def bytes, n level entries)."""
    n = lens.shape[0]
    rep = np.empty(n * 12 + 16, dtype=np.uint8)
    dfl = np.empty(n * 12 + 16, dtype=np.uint8)
    wr = 0
    wd = 0
    zeros = 0  # pending run of rep 0 (cells of length <= 1 in a row)
    dval = -1
    drun = 0
    total = 0
    for i in range(n):
        m = lens[i]
        total += max(m, 1)
        zeros += 1
        if m > 1:
            wr = _put_run(rep, wr, zeros, 0, 1)
            zeros = 0
            wr = _put_run(rep, wr, m - 1, 1, 1)
        dv = max_def if m > 0 else 0
        k = max(m, 1)
        if dv == dval:
            drun += k
        else:
            if drun:
                wd = _put_run(dfl, wd, drun, dval, 1)
            dval = dv
            drun = k
    if zeros:
        wr = _put_run(rep, wr, zeros, 0, 1)
    if drun:
        wd = _put_run(dfl, wd, drun, dval, 1)
    return rep[:wr], dfl[:wd], total


@numba.njit(cache=True, nogil=True)
def _rle(values, value_bytes):
    """RLE/bit-packed hybrid of small non-negative ints, as RLE runs of equal values."""
    n = values.shape[0]
    out = np.empty(n * (6 + value_bytes) + 16, dtype=np.uint8)
    w = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n and values[j] == values[i]:
            j += 1
        w = _put_run(out, w, j - i, values[i], value_bytes)
        i = j
    return out[:w]


@numba.njit(cache=True, nogil=True)
def _byte_stream_split(src, out):
    """BYTE_STREAM_SPLIT of 4-byte values ``src`` (uint32 view) into ``out`` (4n bytes): stream k
    holds byte k (little-endian) of every value. One sequential pass, four sequential writes."""
    n = src.shape[0]
    for i in range(n):
        v = src[i]
        out[i] = v & 0xFF
        out[n + i] = (v >> 8) & 0xFF
        out[2 * n + i] = (v >> 16) & 0xFF
        out[3 * n + i] = v >> 24


@numba.njit(cache=True, nogil=True)
def _byte_stream_split_u8(src, out):
    """BYTE_STREAM_SPLIT of uint8 values stored as INT32: stream 0 is the bytes, streams 1-3 zero."""
    n = src.shape[0]
    out[:n] = src
    out[n:] = 0


# --------------------------------------------------------------------------- column chunks
class _Chunks:
    """Accumulates the column chunks of one row group in memory, with their metadata."""

    def __init__(self, offset: int) -> None:
        self.parts: list[bytes | pa.Buffer] = []
        self.offset = offset
        self.columns: list[list] = []
        self.raw_bytes = 0  # uncompressed size of all pages incl. headers (RowGroup.total_byte_size)
        self.codec = pa.Codec("zstd", compression_level=ZSTD_LEVEL)

    def page(self, kind: int, payload: bytes | np.ndarray, header: list[tuple[int, str, object]]) -> tuple[int, int]:
        """Compresses and appends one page; returns (uncompressed, compressed) size incl. header."""
        comp = self.codec.compress(payload, asbytes=False)
        raw_size = len(payload) if isinstance(payload, bytes) else payload.nbytes
        h = _thrift([(1, "i32", kind), (2, "i32", raw_size), (3, "i32", comp.size), *header])
        self.parts += [h, comp]
        self.offset += len(h) + comp.size
        return len(h) + raw_size, len(h) + comp.size

    def column(self, path: list[str], ptype: int, encodings: list[int], n_values: int, sizes: list[tuple[int, int]],
               start: int, data_offset: int, dict_offset: int | None, stats: list | None) -> None:
        meta = [(1, "i32", ptype), (2, "list:i32", encodings), (3, "list:bin", path), (4, "i32", _ZSTD),
                (5, "i64", n_values), (6, "i64", sum(s[0] for s in sizes)), (7, "i64", sum(s[1] for s in sizes)),
                (9, "i64", data_offset), (11, "i64", dict_offset), (12, "struct", stats)]
        self.columns.append([(2, "i64", start), (3, "struct", meta)])
        self.raw_bytes += sum(s[0] for s in sizes)


def _data_page_header(n_values: int, encoding: int) -> list:
    return [(5, "struct", [(1, "i32", n_values), (2, "i32", encoding), (3, "i32", _RLE), (4, "i32", _RLE)])]


def _with_len(b: np.ndarray | bytes) -> bytes:
    b = bytes(b)
    return struct.pack("<I", len(b)) + b


def _write_list(ch: _Chunks, name: str, offsets: np.ndarray, values: np.ndarray) -> None:
    """list<non-null element> column: BYTE_STREAM_SPLIT values, RLE levels, pages on cell boundaries."""
    lens = np.diff(offsets)
    start = ch.offset
    sizes = []
    n_total = 0
    isz = values.dtype.itemsize
    cuts = [0]
    while cuts[-1] < lens.size:  # cells per page: as many as fit in PAGE_VALUES values (at least one)
        lo = cuts[-1]
        hi = int(np.searchsorted(offsets, offsets[lo] + PAGE_VALUES, side="right")) - 1
        cuts.append(min(max(hi, lo + 1), lens.size))
    for lo, hi in zip(cuts, cuts[1:]):
        a, b = int(offsets[lo]), int(offsets[hi])
        rep, dfl, n_levels = _list_levels(lens[lo:hi], 2)
        head = _with_len(rep) + _with_len(dfl)
        page = _PAGES.array("page", len(head) + (b - a) * 4, np.uint8)  # compress() copies it out
        page[:len(head)] = np.frombuffer(head, dtype=np.uint8)
        if isz == 4:
            _byte_stream_split(values[a:b].view(np.uint32), page[len(head):])
        else:
            _byte_stream_split_u8(values[a:b].view(np.uint8), page[len(head):])
        sizes.append(ch.page(_DATA_PAGE, page, _data_page_header(n_levels, _BYTE_STREAM_SPLIT)))
        n_total += n_levels
    ptype = {np.dtype(np.int32): _INT32, np.dtype(np.float32): _FLOAT, np.dtype(np.uint8): _INT32}[values.dtype]
    ch.column([name, "list", "element"], ptype, [_RLE, _BYTE_STREAM_SPLIT], n_total, sizes, start, start, None, None)


def _write_plain(ch: _Chunks, name: str, values: np.ndarray) -> None:
    """REQUIRED number column: one PLAIN page (no levels), min/max statistics."""
    start = ch.offset
    values = np.ascontiguousarray(values)
    size = ch.page(_DATA_PAGE, values.view(np.uint8), _data_page_header(values.size, _PLAIN))
    ptype = {np.dtype(np.int64): _INT64, np.dtype(np.int32): _INT32, np.dtype(np.float32): _FLOAT}[values.dtype]
    stats = None
    if values.size and not (values.dtype.kind == "f" and np.isnan(values).any()):
        lo, hi = values.min(), values.max()
        if values.dtype.kind == "f":  # parquet: -0.0 as min, +0.0 as max
            lo = -0.0 if lo == 0 else lo
            hi = 0.0 if hi == 0 else hi
        stats = [(3, "i64", 0), (5, "bin", np.array(hi, values.dtype).tobytes()),
                 (6, "bin", np.array(lo, values.dtype).tobytes())]
    ch.column([name], ptype, [_PLAIN, _RLE], values.size, [size], start, start, None, stats)


def _write_dictionary(ch: _Chunks, name: str, arr: pa.DictionaryArray) -> None:
    """OPTIONAL dictionary<int32, string> column: PLAIN dictionary page + RLE_DICTIONARY data page."""
    start = ch.offset
    words = [w.encode() for w in arr.dictionary.to_pylist()]
    dict_page = b"".join(struct.pack("<I", len(w)) + w for w in words)
    d_size = ch.page(_DICTIONARY_PAGE, dict_page, [(7, "struct", [(1, "i32", len(words)), (2, "i32", _PLAIN)])])
    data_offset = ch.offset
    valid = np.ones(len(arr), dtype=np.int32) if arr.null_count == 0 else \
        np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=np.int32)
    idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)[valid.astype(bool)]
    bw = max(int(len(words) - 1).bit_length(), 1)
    page = _with_len(_rle(valid, 1)) + bytes([bw]) + bytes(_rle(idx, (bw + 7) // 8))
    p_size = ch.page(_DATA_PAGE, page, _data_page_header(len(arr), _RLE_DICTIONARY))
    ch.column([name], _BYTE_ARRAY, [_PLAIN, _RLE, _RLE_DICTIONARY], len(arr), [d_size, p_size], start, data_offset,
              start, None)


# --------------------------------------------------------------------------- schema and file
@functools.cache
def _schema_elements() -> list[list]:
    """Parquet SchemaElements of SHARD_SCHEMA (obs strings are nullable there: OPTIONAL)."""
    els = [[(3, "i32", _REQUIRED), (4, "bin", "schema"), (5, "i32", len(SHARD_SCHEMA))]]
    for f in SHARD_SCHEMA:
        t = f.type
        if pa.types.is_list(t):
            elem = t.value_type
            els.append([(3, "i32", _REQUIRED), (4, "bin", f.name), (5, "i32", 1), (6, "i32", _CONVERTED_LIST),
                        (10, "struct", [(3, "struct", [])])])
            els.append([(3, "i32", _REPEATED), (4, "bin", "list"), (5, "i32", 1)])
            if pa.types.is_uint8(elem):
                els.append([(1, "i32", _INT32), (3, "i32", _OPTIONAL), (4, "bin", "element"),
                            (6, "i32", _CONVERTED_UINT_8),
                            (10, "struct", [(10, "struct", [(1, "i8", 8), (2, "bool", False)])])])
            else:
                els.append([(1, "i32", _INT32 if pa.types.is_int32(elem) else _FLOAT), (3, "i32", _OPTIONAL),
                            (4, "bin", "element")])
        elif pa.types.is_dictionary(t):
            els.append([(1, "i32", _BYTE_ARRAY), (3, "i32", _OPTIONAL), (4, "bin", f.name),
                        (6, "i32", _CONVERTED_UTF8), (10, "struct", [(1, "struct", [])])])
        else:
            ptype = {pa.int64(): _INT64, pa.int32(): _INT32, pa.float32(): _FLOAT}[t]
            els.append([(1, "i32", ptype), (3, "i32", _REQUIRED), (4, "bin", f.name)])
    return els


def _specialised(table: pa.Table) -> bool:
    """True when ``table`` is exactly what this writer encodes: the shard schema, at least one row,
    no nulls in the list values or in the number columns."""
    if table.num_rows == 0 or not table.schema.equals(SHARD_SCHEMA):
        return False
    for f in SHARD_SCHEMA:
        col = table.column(f.name)
        if pa.types.is_list(f.type):
            if col.null_count or any(c.values.null_count for c in col.chunks):
                return False
        elif not pa.types.is_dictionary(f.type) and col.null_count:
            return False
    return True


def write_shard(table: pa.Table, path: str | Path) -> None:
    """Write one shard (a table with ``SHARD_SCHEMA``) to ``path`` as Parquet; see the module doc."""
    if not _specialised(table):
        pq.write_table(table, path, **SHARD_WRITE_OPTIONS)
        return
    if any(c.num_chunks != 1 for c in table.columns):
        table = table.combine_chunks()
    ch = _Chunks(offset=4)
    for f in SHARD_SCHEMA:
        col = table.column(f.name).chunk(0)
        if pa.types.is_list(f.type):
            offsets = col.offsets.to_numpy()
            offsets = offsets - offsets[0]
            values = col.flatten().to_numpy(zero_copy_only=False)
            _write_list(ch, f.name, offsets, values)
        elif pa.types.is_dictionary(f.type):
            _write_dictionary(ch, f.name, col)
        else:
            _write_plain(ch, f.name, col.to_numpy(zero_copy_only=False))
    n_leaves = len(ch.columns)
    footer = _thrift([
        (1, "i32", 2),
        (2, "list:struct", _schema_elements()),
        (3, "i64", table.num_rows),
        (4, "list:struct", [[(1, "list:struct", ch.columns), (2, "i64", ch.raw_bytes), (3, "i64", table.num_rows)]]),
        (5, "list:struct", [[(1, "bin", "ARROW:schema"), (2, "bin", _ARROW_SCHEMA_B64)]]),
        (6, "bin", CREATED_BY),
        (7, "list:struct", [[(1, "struct", [])] for _ in range(n_leaves)]),
    ])
    with open(path, "wb") as fh:
        fh.write(b"PAR1")
        for p in ch.parts:
            fh.write(p)
        fh.write(footer)
        fh.write(struct.pack("<I", len(footer)))
        fh.write(b"PAR1")
