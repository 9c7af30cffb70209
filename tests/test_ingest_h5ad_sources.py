"""What users bring: h5ad files with repeated gene names or GENCODE-versioned ids (build-census),
and a Census-layout store written by tiledbsoma.io.from_anndata (no derived obs columns)."""

from __future__ import annotations

import json
import logging

import anndata as ad
import cellxgene_census
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import tiledbsoma as soma
import tiledbsoma.io

from ingest.cli import main
from scgpt_model.vocab import GeneVocab

# symbols in the shipped table (data/gene_symbols_hg19.tsv): LYZ and FTL repeated, as in the study
SYMBOLS = ["LYZ", "CD74", "FTL", "LYZ", "JCHAIN", "FTL", "CD3E", "MS4A1"]


def _counts(n: int, g: int, seed: int) -> sp.csr_matrix:
    X = sp.random(n, g, density=0.5, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 9)
    return X


def _dup_h5ad(tmp_path):
    X = _counts(30, len(SYMBOLS), 0)
    with pytest.warns(UserWarning, match="not unique"):
        a = ad.AnnData(X=X, var=pd.DataFrame(index=pd.Index(SYMBOLS)))
    f = tmp_path / "dups.h5ad"
    a.write_h5ad(f)
    return f, X.toarray()


def _store_X(store) -> tuple[list[str], np.ndarray]:
    with cellxgene_census.open_soma(uri=str(store)) as census:
        got = cellxgene_census.get_anndata(census, "Homo sapiens")
    return list(got.var.feature_name), got.X.toarray()


def test_duplicate_gene_names_are_summed_with_a_warning_or_kept_first_or_refused(tmp_path, caplog, capsys):
    f, dense = _dup_h5ad(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ingest"):
        assert main(["build-census", "--h5ad", str(f), "--out", str(tmp_path / "sum")]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if "more than one column" in r.getMessage())
    assert "2 gene id(s)" in warning and "LYZ + LYZ" in warning and "FTL + FTL" in warning and "summed" in warning
    names, X = _store_X(tmp_path / "sum")
    assert names == ["LYZ", "CD74", "FTL", "JCHAIN", "CD3E", "MS4A1"]
    np.testing.assert_array_equal(X[:, 0], dense[:, 0] + dense[:, 3])
    np.testing.assert_array_equal(X[:, 2], dense[:, 2] + dense[:, 5])

    assert main(["build-census", "--h5ad", str(f), "--on-duplicate-genes", "first",
                 "--out", str(tmp_path / "first")]) == 0
    names, X = _store_X(tmp_path / "first")
    np.testing.assert_array_equal(X[:, 0], dense[:, 0])
    np.testing.assert_array_equal(X[:, 2], dense[:, 2])
    np.testing.assert_array_equal(X[:, 1], dense[:, 1])

    capsys.readouterr()
    assert main(["build-census", "--h5ad", str(f), "--on-duplicate-genes", "error", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "LYZ + LYZ" in err and "--on-duplicate-genes sum" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_gencode_versioned_ids_build_a_store_keyed_like_the_census(tmp_path):
    """ENSG...5.3 is keyed ENSG...5 (shardset.genes: the rule eval matches with), so the store's
    ids match a Census vocabulary; two versions of one gene are one gene (summed, with the warning)."""
    ids = ["ENSG00000090382.7", "ENSG00000019582.15", "ENSG00000087086.14", "ENSG00000019582.16_PAR_Y"]
    X = _counts(20, 4, 1)
    a = ad.AnnData(X=X, var=pd.DataFrame({"feature_id": ids, "feature_name": ["LYZ", "CD74", "FTL", "CD74"]},
                                         index=pd.Index(ids)))
    a.write_h5ad(tmp_path / "v.h5ad")
    assert main(["build-census", "--h5ad", str(tmp_path / "v.h5ad"), "--out", str(tmp_path / "s")]) == 0
    with cellxgene_census.open_soma(uri=str(tmp_path / "s")) as census:
        got = cellxgene_census.get_anndata(census, "Homo sapiens")
    assert list(got.var.feature_id) == ["ENSG00000090382", "ENSG00000019582", "ENSG00000087086"]
    census_vocab = GeneVocab.from_genes(["ENSG00000087086", "ENSG00000090382", "ENSG00000019582"], key="feature_id")
    assert (census_vocab.encode(list(got.var.feature_id)) >= 0).all()
    np.testing.assert_array_equal(got.X.toarray()[:, 1], X.toarray()[:, 1] + X.toarray()[:, 3])


def _from_anndata_store(tmp_path) -> tuple[str, np.ndarray]:
    """A CELLxGENE-style h5ad (Ensembl var index, no tissue_general / dataset_id / nnz) written with
    tiledbsoma.io.from_anndata into census_data/homo_sapiens, X layer raw."""
    n, g = 60, 40
    X = _counts(n, g, 2)
    X[:5] = 0  # 5 cells with fewer than 3 genes: 0, then 1 or 2 genes each
    X[1, 0] = X[2, 0] = X[2, 1] = X[3, 3] = 4
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type": rng.choice(["B cell", "T cell"], n), "is_primary_data": True,
                        "disease": "normal", "assay": "10x 3' v3", "tissue": "blood"},
                       index=[f"cell{i}" for i in range(n)])
    var = pd.DataFrame({"feature_name": [f"G{i}" for i in range(g)]}, index=[f"ENSG{i:011d}" for i in range(g)])
    uri = str(tmp_path / "fa")
    with soma.Collection.create(uri) as root:
        data = root.add_new_collection("census_data")
        exp_uri = tiledbsoma.io.from_anndata(f"{uri}/census_data/homo_sapiens", ad.AnnData(X=X, obs=obs, var=var),
                                             measurement_name="RNA", X_layer_name="raw")
        with soma.Experiment.open(exp_uri) as exp:
            data.set("homo_sapiens", exp, use_relative_uri=True)
    return uri, np.diff(X.indptr)


def test_a_from_anndata_store_is_accepted_and_min_genes_comes_from_x(tmp_path, capsys):
    uri, n_genes = _from_anndata_store(tmp_path)
    with soma.open(uri) as c:
        assert "nnz" not in c["census_data"]["homo_sapiens"].obs.schema.names
    out = tmp_path / "shards"
    assert main(["census", "--census-uri", uri, "--min-genes", "3", "--num-cpus", "1", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cells"] == int((n_genes >= 3).sum()) == 55
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["dataset_id"] for d in manifest["datasets"]] == ["fa"]
    tbl = pq.read_table(sorted((out / "shards").glob("*.parquet"))[0])
    assert min(tbl.column("n_genes").to_pylist()) >= 3
    assert set(tbl.column("cell_type").to_pylist()) == {"B cell", "T cell"}
    # an option that needs a column the store lacks says which and what to use instead
    assert main(["census", "--census-uri", uri, "--tissue", "blood", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tissue_general" in err and "--obs-filter" in err and not (tmp_path / "o").exists()
