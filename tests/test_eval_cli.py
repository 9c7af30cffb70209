"""Bad input to `evaluate`: one clear message, exit code 2, and no MLflow run left behind."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from eval.cli import main


def _runs_client(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _bad(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    msg = [ln for ln in err.splitlines() if ln.startswith("evaluate: error:")]
    assert len(msg) == 1, err  # one message (MLflow may log its own INFO lines around it)
    for n in needles:
        assert n in err, err
    return err


def test_model_uri_that_does_not_resolve(capsys, uri, tmp_path):
    _bad(capsys, ["--model", "models:/no-such-model/1", "--task", "zero-shot", "--dataset", "pbmc3k",
                  "--tracking-uri", uri], "no-such-model")
    _bad(capsys, ["--model", str(tmp_path / "missing_folder"), "--task", "zero-shot", "--dataset", "pbmc3k",
                  "--tracking-uri", uri], "missing_folder")
    assert _runs_client(uri) == []


def test_dataset_with_no_gene_in_vocabulary(capsys, uri, tmp_path, eval_debug_model_dir):
    a = ad.AnnData(sp.csr_matrix(np.random.default_rng(0).poisson(1, (20, 5)).astype(np.float32)))
    a.var_names = [f"NOT_A_GENE_{i}" for i in range(5)]
    a.obs["celltype"] = ["t"] * 20
    path = tmp_path / "nogenes.h5ad"
    a.write_h5ad(path)
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "zero-shot", "--dataset", str(path),
                  "--label-key", "celltype", "--tracking-uri", uri], "none of the dataset's 5 genes")
    assert _runs_client(uri) == []


def test_missing_label_and_batch_keys_name_the_existing_ones(capsys, uri, eval_debug_model_dir, symphony_small):
    err = _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "annotation", "--dataset",
                        str(symphony_small), "--label-key", "cell_type", "--tracking-uri", uri],
               "'cell_type'", "--label-key")
    assert "celltype" in err and "batch" in err  # the columns that do exist
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "integration", "--dataset",
                  str(symphony_small), "--label-key", "celltype", "--batch-key", "donor", "--tracking-uri", uri],
         "'donor'", "batch")
    # an unlabeled user file: the label key must be given
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "zero-shot", "--dataset",
                  str(symphony_small), "--tracking-uri", uri], "--label-key")
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "annotation", "--dataset", "pbmc3k",
                  "--query-batch", "5p", "--tracking-uri", uri], "--query-batch needs a batch column")
    # pbmc3k has no batch column: integration says so
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "integration", "--dataset", "pbmc3k",
                  "--tracking-uri", uri], "--batch-key")
    assert _runs_client(uri) == []


def test_one_batch_only_for_integration(capsys, uri, tmp_path, eval_debug_model_dir, symphony_small):
    a = ad.read_h5ad(symphony_small)
    one = a[a.obs["batch"] == "5p"].copy()
    path = tmp_path / "one_batch.h5ad"
    one.write_h5ad(path)
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "integration", "--dataset", str(path),
                  "--label-key", "celltype", "--batch-key", "batch", "--tracking-uri", uri],
         "at least 2 batches", "5p")
    assert _runs_client(uri) == []


def test_log_normalized_data(capsys, uri, tmp_path, eval_debug_model_dir, symphony_small):
    import scanpy as sc

    a = ad.read_h5ad(symphony_small)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    path = tmp_path / "lognorm.h5ad"
    a.write_h5ad(path)
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "annotation", "--dataset", str(path),
                  "--label-key", "celltype", "--tracking-uri", uri], "log-normalized", "raw counts")
    assert _runs_client(uri) == []


def test_unknown_dataset_and_bad_numbers(capsys, uri, eval_debug_model_dir):
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "zero-shot", "--dataset", "pbmc4k",
                  "--tracking-uri", uri], "pbmc4k", "pbmc3k, symphony")
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "annotation", "--dataset", "pbmc3k",
                  "--epochs", "0", "--tracking-uri", uri], "--epochs")
    with pytest.raises(SystemExit) as e:  # argparse: unknown task
        main(["--model", str(eval_debug_model_dir), "--task", "clustering", "--dataset", "pbmc3k"])
    assert e.value.code == 2


def test_continuous_label_key_is_refused(capsys, uri, tmp_path, eval_debug_model_dir, symphony_small):
    # nGene: integer-valued float64 with ~280 distinct values in 300 cells (the case)
    a = ad.read_h5ad(symphony_small)
    assert a.obs["nGene"].nunique() > 200
    err = _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "annotation", "--dataset",
                        str(symphony_small), "--label-key", "nGene", "--tracking-uri", uri],
               "'nGene'", "looks continuous", "distinct values in 300 cells", "--label-key")
    assert "celltype" in err and "batch" in err and "percent_mito" not in err.split("candidates")[1]
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "zero-shot", "--dataset",
                  str(symphony_small), "--label-key", "percent_mito", "--tracking-uri", uri],
         "'percent_mito'", "looks continuous", "celltype")
    # text labels, one per cell (a barcode column): too many distinct values
    a.obs["barcode"] = [f"cell{i}" for i in range(a.n_obs)]
    path = tmp_path / "barcodes.h5ad"
    a.write_h5ad(path)
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "annotation", "--dataset", str(path),
                  "--label-key", "barcode", "--tracking-uri", uri],
         "'barcode'", "too many distinct values", "300 in 300 cells", "celltype")
    assert _runs_client(uri) == []


def test_single_cell_type_and_empty_dataset_are_refused(capsys, uri, tmp_path, eval_debug_model_dir,
                                                         symphony_small):
    a = ad.read_h5ad(symphony_small)
    top = a.obs["celltype"].value_counts().index[0]
    one = a[a.obs["celltype"] == top].copy()
    one.obs["celltype"] = one.obs["celltype"].astype(str)
    path = tmp_path / "one_type.h5ad"
    one.write_h5ad(path)
    for task in ("annotation", "zero-shot"):
        _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", task, "--dataset", str(path),
                      "--label-key", "celltype", "--tracking-uri", uri],
             "single cell type", repr(str(top)), "at least 2")
    empty = a[:0].copy()
    path = tmp_path / "empty.h5ad"
    empty.write_h5ad(path)
    _bad(capsys, ["--model", str(eval_debug_model_dir), "--task", "zero-shot", "--dataset", str(path),
                  "--label-key", "celltype", "--tracking-uri", uri], "has no cells")
    assert _runs_client(uri) == []
