"""The chunk worker in-process (no Ray): vocabulary reordering, duplicate symbols, dropped genes,
--min-genes, and the split function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp

from ingest.manifest import is_validation
from ingest.query import IngestConfig
from ingest.run import plan, sample_joinids
from ingest.store_writer import CensusStoreWriter, DatasetInfo
from ingest.worker import process_chunk
from scgpt_model.binning import bin_nonzero
from scgpt_model.vocab import GeneVocab


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
