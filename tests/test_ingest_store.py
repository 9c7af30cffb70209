"""build-census from real h5ad files and synth-census: Census layout, gene mapping, counts kept exactly."""

from __future__ import annotations

import anndata as ad
import cellxgene_census
import numpy as np
import pandas as pd

from ingest.build_census import DATA_DIR, resolve_genes
from ingest.cli import main
from ingest.synth import SynthConfig, synth_census


def test_build_census_from_shipped_h5ads(tmp_path, capsys):
    out = tmp_path / "store"
    pbmc_f, sym_f = DATA_DIR / "pbmc3k_counts_celltype.h5ad", DATA_DIR / "symphony_pbmc_3batch_counts.h5ad"
    assert main(["build-census", "--h5ad", str(pbmc_f), "--h5ad", str(sym_f), "--set", "tissue_general=blood",
                 "--set", "tissue=blood", "--set", "assay=10x 3' v2", "--out", str(out)]) == 0
    sym = ad.read_h5ad(sym_f)
    with cellxgene_census.open_soma(uri=str(out)) as census:
        got = cellxgene_census.get_anndata(census, "Homo sapiens",
                                           obs_value_filter="dataset_id == 'symphony_pbmc_3batch_counts'")
        info = census["census_info"]["datasets"].read().concat().to_pandas()
        summary = dict(zip(*census["census_info"]["summary"].read().concat().to_pandas()[["label", "value"]].T.values))
    assert list(info.dataset_id) == ["pbmc3k_counts_celltype", "symphony_pbmc_3batch_counts"]
    assert summary["total_cell_count"] == str(2700 + 1500)
    assert got.n_obs == 1500 and set(got.obs.tissue_general) == {"blood"}
    assert set(got.obs.cell_type) == set(sym.obs.celltype)  # `celltype` is taken as cell_type
    assert (got.obs.tissue_general_ontology_term_id == "UBERON:0000178").all()
    assert (got.obs.assay_ontology_term_id == "EFO:0009899").all()
    # symbols were mapped to Ensembl ids through the shipped table; counts identical per mapped gene
    mapping = resolve_genes(sym.var)
    assert 1500 < sum(i is not None for i in mapping.feature_id) < sym.n_vars  # some genes have no id
    fid_col = {f: j for j, f in enumerate(got.var.feature_id)}
    cols = [(k, fid_col[f]) for k, f in enumerate(mapping.feature_id) if f is not None]
    src = sym.X.toarray()[:, [k for k, _ in cols]]
    dst = got.X.toarray()[:, [j for _, j in cols]]
    np.testing.assert_array_equal(dst, src)
    # var bookkeeping: symphony measured only its genes
    measured = got.var.n_measured_obs.to_numpy()
    assert measured.max() == 4200 and measured.min() == 2700
    assert "CXCL8" in set(got.var.feature_name) or "IL8" in set(got.var.feature_name)


def test_resolve_genes_paths():
    by_col = resolve_genes(pd.DataFrame({"gene_ids": ["ENSG00000000003", "ENSG00000000005"]}, index=["A", "B"]))
    assert by_col.feature_id == ["ENSG00000000003", "ENSG00000000005"] and by_col.feature_name == ["A", "B"]
    by_index = resolve_genes(pd.DataFrame({"feature_name": ["X", "Y"]}, index=["ENSG00000000003", "ENSG00000000005"]))
    assert by_index.feature_id == ["ENSG00000000003", "ENSG00000000005"] and by_index.feature_name == ["X", "Y"]
    by_symbol = resolve_genes(pd.DataFrame(index=["CD74", "JCHAIN", "NOT_A_GENE"]))
    assert by_symbol.feature_id[0].startswith("ENSG") and by_symbol.feature_id[1] == "ENSG00000132465"
    assert by_symbol.feature_id[2] is None and by_symbol.n_unmapped == 1


def test_synth_census_is_realistic(tmp_path):
    out = synth_census(tmp_path / "synth", SynthConfig(n_cells=600, n_genes=3000, mean_genes=400, chunk_cells=250,
                                                       seed=5))
    with cellxgene_census.open_soma(uri=str(out)) as census:
        a = cellxgene_census.get_anndata(census, "Homo sapiens")
        titles = census["census_info"]["datasets"].read().concat().to_pandas().dataset_title
    nnz = np.diff(a.X.tocsr().indptr)
    assert a.n_obs == 600 and a.n_vars == 3000
    assert 300 < np.median(nnz) < 500 and nnz.std() > 50           # lognormal genes per cell around the target
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() >= 1 and a.X.data.max() > 20
    assert set(a.obs.tissue_general) == {"blood", "lung", "brain"}  # one tissue per chunk of 250
    assert 0 < (~a.obs.is_primary_data).sum() < 100
    assert titles.str.contains("SYNTHETIC").all()
    np.testing.assert_array_equal(a.obs.nnz.to_numpy(), nnz)


def test_build_demo_reuses_a_finished_atlas(demo_census, tmp_path, capsys):
    from ingest.demo import existing_demo

    assert existing_demo(demo_census)
    before = sorted(p.stat().st_mtime_ns for p in demo_census.rglob("*") if p.is_file())
    assert main(["build-demo", "--out", str(demo_census)]) == 0  # the demo script can be re-run
    assert sorted(p.stat().st_mtime_ns for p in demo_census.rglob("*") if p.is_file()) == before
    assert main(["build-demo", "--no-reuse", "--out", str(demo_census)]) == 2
    assert "already exists" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    assert not existing_demo(half)
