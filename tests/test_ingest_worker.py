"""The chunk worker in-process (no Ray): vocabulary reordering, duplicate symbols, dropped genes,
--min-genes, and the split function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from ingest.csr import Scratch, row_sums
from ingest.query import IngestConfig
from ingest.run import plan, sample_joinids
from ingest.store_writer import CensusStoreWriter, DatasetInfo
from ingest.worker import process_chunk, rows_from_tables
from scgpt_model.binning import bin_nonzero
from scgpt_model.vocab import GeneVocab
from shardset import is_validation


def _store(path, X, names):
    var = pd.DataFrame({"feature_id": [f"ENSG{i:011d}" for i in range(X.shape[1])], "feature_name": names})
    w = CensusStoreWriter(path, var, X.shape[0])
    w.append(pd.DataFrame({"tissue_general": ["blood"] * X.shape[0], "cell_type": ["T cell"] * X.shape[0]}), X,
             DatasetInfo(dataset_id="d1", title="tiny"))
    w.close()
    return var


def _run_chunk(cfg: IngestConfig, tmp_path):
    p = plan(cfg)
    (tmp_path / "out" / "shards").mkdir(parents=True, exist_ok=True)
    res = process_chunk({"source": p.source, "organism": cfg.organism, "index": 0, "joinids": p.joinids,
                         "out": str(tmp_path / "out"), "var_to_vocab": p.var_to_vocab,
                         "merge_duplicates": p.merge_duplicates, "n_bins": cfg.n_bins, "seed": cfg.seed,
                         "val_fraction": cfg.val_fraction, "min_genes": cfg.min_genes})
    return p, res, pq.read_table(tmp_path / "out" / res["path"])


def test_reordered_vocab_duplicate_symbols_and_min_genes(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(40, 30, density=0.3, format="csr", random_state=2, dtype=np.float32)
    X.data = np.ceil(X.data * 30)
    X = sp.csr_matrix(X.multiply(np.where(np.arange(40) == 5, 0, 1)[:, None]), dtype=np.float32)  # cell 5 empty
    X.eliminate_zeros()
    names = [f"G{i}" for i in range(30)]
    names[7] = names[3]  # two var rows share a symbol (as in recent Census schemas)
    _store(tmp_path / "store", X, names)
    # a vocabulary in another order, missing two genes
    vocab_genes = [g for g in dict.fromkeys(names) if g not in ("G10", "G11")][::-1]
    GeneVocab.from_genes(vocab_genes, key="feature_name").save(tmp_path / "vocab.json")
    cfg = IngestConfig(out=str(tmp_path / "out"), census_uri=str(tmp_path / "store"), tissues=("blood",),
                       vocab=str(tmp_path / "vocab.json"), min_genes=3, n_bins=11, seed=4)
    p, res, table = _run_chunk(cfg, tmp_path)
    assert p.merge_duplicates and p.genes_dropped == 2
    vocab = GeneVocab.load(tmp_path / "vocab.json")
    dense = X.toarray()
    expect_ids = []
    for r in range(X.shape[0]):
        cell = {}
        for j in np.flatnonzero(dense[r]):
            if names[j] in vocab:
                cell[vocab[names[j]]] = cell.get(vocab[names[j]], 0.0) + dense[r, j]
        if len(cell) >= 3:
            expect_ids.append(r)
            k = expect_ids.index(r)
            genes = np.asarray(table.column("genes")[k].as_py())
            counts = np.asarray(table.column("counts")[k].as_py())
            np.testing.assert_array_equal(genes, sorted(cell))
            np.testing.assert_array_equal(counts, [cell[g] for g in sorted(cell)])
            bins = bin_nonzero(np.array([0, len(counts)]), counts, np.array([r]), n_bins=11, seed=4)
            np.testing.assert_array_equal(np.asarray(table.column("bins")[k].as_py()), bins)
    assert table.column("soma_joinid").to_pylist() == expect_ids
    # cell 5 (empty) fails the obs query (nnz >= 3); the rest of the shortfall is dropped by the worker
    assert 5 not in p.joinids and p.joinids.size == int((np.diff(X.indptr) >= 3).sum())
    assert res["n_dropped_min_genes"] == p.joinids.size - len(expect_ids)
    assert set(table.column("cell_type").to_pylist()) == {"T cell"}
    del rng


def test_split_and_sample_are_pure_functions():
    ids = np.arange(200_000, dtype=np.int64)
    v = is_validation(ids, 0.03, 0)
    assert abs(v.mean() - 0.03) < 0.002
    np.testing.assert_array_equal(v, is_validation(ids, 0.03, 0))
    np.testing.assert_array_equal(v[1000:2000], is_validation(ids[1000:2000], 0.03, 0))  # order/chunk free
    assert (v != is_validation(ids, 0.03, 1)).any()
    assert not is_validation(ids, 0.0, 0).any()
    s = sample_joinids(ids[::3], 500, seed=2)
    assert s.size == 500 and np.all(np.diff(s) > 0) and np.array_equal(s, sample_joinids(ids[::3], 500, seed=2))


def _reference_csr(d0, d1, val, joinids, var_to_vocab, merge):
    """Plain-Python reference: per cell, vocabulary ids ascending with their counts."""
    cells = {int(j): {} for j in joinids}
    order = {}
    for r, c, x in zip(d0.tolist(), d1.tolist(), val.tolist()):
        g = int(var_to_vocab[c])
        if x == 0 or g < 0:
            continue
        cell = cells[r]
        if merge:
            cell[g] = cell.get(g, 0.0) + x
        else:
            cell.setdefault(g, []).append(x)
            order[(r, g)] = order.get((r, g), 0) + 1
    out = []
    for j in joinids.tolist():
        items = sorted(cells[j].items())
        genes = [g for g, v in items for _ in (v if isinstance(v, list) else [v])]
        vals = [x for g, v in items for x in (v if isinstance(v, list) else [v])]
        out.append((genes, vals))
    return out


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("merge", [True, False])
def test_row_assembler_matches_reference(contiguous, merge):
    """Several Arrow tables in tile-like (not row-major) order; sparse joinids use the binary-search
    path; genes outside the vocabulary and explicit zeros are dropped; a vocabulary that reverses
    and merges var rows forces per-row sorting and duplicate summing."""
    rng = np.random.default_rng(3)
    n_var = 50
    joinids = np.sort(rng.choice(np.arange(5, 200) if contiguous else np.arange(0, 10**9, 997), 40, replace=False))
    var_to_vocab = (n_var - 1 - np.arange(n_var)).astype(np.int32) // (2 if merge else 1)  # reversed (+ merged)
    var_to_vocab[[3, 17]] = -1
    dense = rng.poisson(0.7, size=(joinids.size, n_var)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.05] = 0  # (explicit zeros are stored below too)
    r, c = np.nonzero(np.ones_like(dense))
    keep = (dense[r, c] > 0) | (rng.random(r.size) < 0.1)
    r, c = r[keep], c[keep]
    tiles = np.lexsort((r, c // 16, r // 8))  # tile order: row tiles, then column tiles, row-major inside
    r, c = r[tiles], c[tiles]
    d0, d1, val = joinids[r], c.astype(np.int64), dense[r, c]
    parts = np.array_split(np.arange(d0.size), 4)
    tables = [pa.table({"soma_dim_0": d0[p], "soma_dim_1": d1[p], "soma_data": val[p]}) for p in parts]
    indptr, genes, values = rows_from_tables(tables, joinids, var_to_vocab, merge_duplicates=merge)
    # the worker's path: outputs in reused scratch buffers (a stale larger buffer must not leak in)
    scratch = Scratch()
    scratch.array("genes", 10 * genes.size, np.int32)[:] = -7
    scratch.array("values", 10 * genes.size, np.float32)[:] = -7
    i2, g2, v2 = rows_from_tables(tables, joinids, var_to_vocab, merge_duplicates=merge, scratch=scratch)
    np.testing.assert_array_equal(i2, indptr)
    np.testing.assert_array_equal(g2, genes)
    np.testing.assert_array_equal(v2, values)
    np.testing.assert_allclose(row_sums(indptr, values), [values[indptr[k]:indptr[k + 1]].sum()
                                                          for k in range(joinids.size)], rtol=1e-6)
    ref = _reference_csr(d0, d1, val, joinids, var_to_vocab, merge)
    assert indptr.shape == (joinids.size + 1,) and indptr[-1] == genes.size == values.size
    for k, (g_ref, v_ref) in enumerate(ref):
        s, e = indptr[k], indptr[k + 1]
        np.testing.assert_array_equal(genes[s:e], g_ref)
        np.testing.assert_allclose(values[s:e], v_ref)
    assert genes.dtype == np.int32 and values.dtype == np.float32 and (values > 0).all()
    if merge:
        assert all(np.all(np.diff(genes[indptr[k]:indptr[k + 1]]) > 0) for k in range(joinids.size))


def test_row_assembler_rejects_cells_outside_the_chunk():
    tbl = pa.table({"soma_dim_0": np.array([1, 7]), "soma_dim_1": np.array([0, 1]),
                    "soma_data": np.ones(2, np.float32)})
    with pytest.raises(RuntimeError, match="soma_joinid 7"):
        rows_from_tables([tbl], np.array([1, 2]), np.arange(2, dtype=np.int32))


def test_scratch_reuses_and_grows_its_buffers():
    s = Scratch()
    a = s.array("x", 100, np.int32)
    assert a.shape == (100,) and a.dtype == np.int32
    b = s.array("x", 110, np.int32)  # within the 25% headroom: same memory
    assert np.shares_memory(a, b)
    c = s.array("x", 1000, np.int32)
    assert c.shape == (1000,) and not np.shares_memory(a, c)
    assert s.array("x", 10, np.float32).dtype == np.float32  # another dtype: a new buffer
