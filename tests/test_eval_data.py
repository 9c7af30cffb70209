"""Data preparation on the shipped real data: count checks, vocabulary matching, HVGs, binning."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from eval.data import (align_genes, batch_split, check_counts, load_dataset, prepare, select_hvg,
                       stratified_split)
from eval.errors import EvalError
from eval.genes import match_genes, symbol_table
from scgpt_model.binning import bin_csr
from scgpt_model.vocab import GeneVocab


@pytest.fixture(scope="module")
def ens_vocab() -> GeneVocab:
    return GeneVocab.from_genes(sorted(set(symbol_table().values())))


@pytest.fixture(scope="module")
def pbmc3k():
    return load_dataset("pbmc3k")[1]


@pytest.fixture(scope="module")
def symphony():
    return load_dataset("symphony")[1]


def test_match_pbmc3k_by_ensembl_column(pbmc3k, ens_vocab):
    m = match_genes(pbmc3k, ens_vocab)
    assert m.via == "var['gene_ids']"
    assert m.n_total == 32738
    # hg19 has a few Ensembl ids under two symbols: each id is matched once, the rest counted
    assert m.n_matched + m.n_duplicates == m.n_total
    assert "32,738" in m.report()
    cd8a = list(pbmc3k.var_names).index("CD8A")
    j = list(m.var_index).index(cd8a)
    assert ens_vocab.tokens[m.token_ids[j]] == pbmc3k.var["gene_ids"].iloc[cd8a] and m.symbols[j] == "CD8A"


def test_match_symbol_only_dataset_through_the_table(symphony, ens_vocab):
    m = match_genes(symphony, ens_vocab)
    assert "symbol -> Ensembl" in m.via
    assert 1500 < m.n_matched < symphony.n_vars  # e.g. IGKC/TRAC have no hg19 10x entry
    assert "dropped" in m.report() and "IGKC" in m.report()


def test_match_symbol_vocabulary(symphony):
    vocab = GeneVocab.from_genes(["CD3E", "LYZ", "NOT_A_GENE"], key="feature_name")
    m = match_genes(symphony, vocab)
    assert m.n_matched == 2 and sorted(m.symbols) == ["CD3E", "LYZ"]


def test_no_gene_in_vocabulary_is_a_clear_error(ens_vocab):
    a = ad.AnnData(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    a.var_names = ["made_up_1", "made_up_2"]
    with pytest.raises(EvalError, match="none of the dataset's 2 genes is in the model's vocabulary"):
        match_genes(a, ens_vocab)


def test_log_normalized_input_is_refused(symphony):
    import scanpy as sc

    a = symphony[:50].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    with pytest.raises(EvalError, match="log-normalized") as e:
        check_counts(a, "symphony")
    assert "layers['counts']" in str(e.value)  # the dataset has raw counts there: say so
    bad = symphony[:5].copy()
    bad.X = bad.X.multiply(-1).tocsr()
    with pytest.raises(EvalError, match="negative"):
        check_counts(bad, "x")
    check_counts(symphony, "symphony")  # raw counts pass


def test_prepare_bins_hvgs_and_labels(pbmc3k, ens_vocab):
    d = prepare(pbmc3k, ens_vocab, name="pbmc3k", label_key="celltype", batch_key=None, n_hvg=500,
                max_cells=400, seed=3)
    assert d.n_cells == 400 and 490 <= d.n_genes <= 500  # HVGs never expressed in the sample dropped
    assert not np.any(d.obs["celltype"].isna())  # cells without a label are dropped
    # the binning is the model package's, seeded by each cell's row in the file
    expect = bin_csr(d.counts, d.obs["_row"].to_numpy(np.int64), n_bins=51, seed=3)
    np.testing.assert_array_equal(d.bins.toarray(), expect.toarray())
    assert d.bins.data.min() >= 1 and d.bins.data.max() <= 50
    assert (d.counts.indptr == d.bins.indptr).all()
    # sub-setting genes re-bins (quantiles are over a cell's own genes)
    sub = d.take_genes(np.arange(0, d.n_genes, 2))
    np.testing.assert_array_equal(sub.bins.toarray(),
                                  bin_csr(sub.counts, sub.obs["_row"].to_numpy(np.int64), seed=3).toarray())
    lg = d.lognorm()
    assert lg.shape == (400, d.n_genes) and np.isfinite(lg).all()


def test_select_hvg_is_deterministic_and_sized(symphony):
    X = sp.csr_matrix(symphony.X)
    a = select_hvg(X, 300, symphony.obs["batch"].to_numpy())
    b = select_hvg(X, 300, symphony.obs["batch"].to_numpy())
    assert a.size == 300 and np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert select_hvg(X, 10**6).size == X.shape[1]


def test_align_genes_adds_zero_columns(symphony, ens_vocab):
    d = prepare(symphony, ens_vocab, name="s", label_key="celltype", batch_key="batch", n_hvg=50, max_cells=60)
    want = np.r_[d.token_ids[:10], [3, 4]]  # two vocabulary genes the dataset does not carry
    out = align_genes(d, want, d.symbols[:10] + ["", ""])
    assert out.counts.shape == (60, 12)
    np.testing.assert_array_equal(out.counts[:, :10].toarray(), d.counts[:, :10].toarray())
    assert out.counts[:, 10:].nnz == 0


def test_splits():
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"])
    tr, te = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == labels.size
    assert (labels[te] == "a").sum() == 10 and (labels[te] == "b").sum() == 4
    assert "c" not in labels[te]  # a singleton type stays in the reference
    assert np.array_equal(stratified_split(labels, 0.2, seed=0)[1], te)
    ref, q = batch_split(np.array(["3p", "5p", "3p"]), ("5p",))
    assert list(ref) == [0, 2] and list(q) == [1]
    with pytest.raises(EvalError, match="empty"):
        batch_split(np.array(["3p", "3p"]), ("5p",))
