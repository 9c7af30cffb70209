"""End to end: `evaluate suite` on the debug model registered by the training pipeline, every
task on real data; scores finite and in range, logged to MLflow runs linked to the version;
the same command twice gives the same scores; the user-level API on the same model."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from eval.cli import main
from eval.report import SIGNED_UNIT, UNIT_INTERVAL
from eval.tasks import SUITE

# small enough for CI on 2 cores, large enough for every metric to be defined
FAST = ["--epochs", "1", "--max-cells", "240", "--n-hvg", "120", "--batch-size", "32",
        "--splits", "1", "--max-perturbations", "6"]  # perturbation: one split of 6 perturbations


@pytest.fixture(scope="module")
def suite_run(registered_debug_model, tmp_path_factory):
    tracking_uri, model_uri = registered_debug_model
    out = tmp_path_factory.mktemp("eval_suite")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["suite", "--model", model_uri, "--tracking-uri", tracking_uri, "--out", str(out), *FAST])
    assert code == 0
    return tracking_uri, model_uri, out, buf.getvalue()


def _check_table(df: pd.DataFrame, where: str) -> None:
    assert len(df) >= 3, where  # the model, its random-init twin, and at least one baseline
    for method, row in df.iterrows():
        for metric, v in row.items():
            if metric == "program_enriched_share" and row["n_programs"] == 0 and np.isnan(v):
                continue  # no gene program above the threshold: nothing to test for enrichment
            if method == "no change" and metric.startswith("pearson_delta"):
                assert np.isnan(v), f"{where} {method}/{metric} = {v}"  # undefined: a predicted change of 0
                continue
            assert np.isfinite(v), f"{where} {method}/{metric} = {v}"
            if metric in UNIT_INTERVAL and metric != "ARI_cell":  # ARI dips below 0 on random clusterings
                assert 0.0 <= v <= 1.0, f"{where} {method}/{metric} = {v}"
            if metric in SIGNED_UNIT or metric == "ARI_cell":
                assert -1.0 <= v <= 1.0, f"{where} {method}/{metric} = {v}"


def test_suite_scores_every_task_on_real_data(suite_run):
    _, _, out, printed = suite_run
    for task, dataset in SUITE:
        d = out / f"{task}_{dataset}"
        df = pd.read_csv(d / f"scores_{task}_{dataset}.csv", index_col=0)
        _check_table(df, f"{task}/{dataset}")
        assert f"**{task}** on `{dataset}`" in printed  # the CLI prints every score table
        assert {"scGPT", "scGPT random init"} <= set(df.index)
    # the fixture model was pretrained on every blood cell of the demo atlas: each table on it says so
    in_atlas = [d for _, d in SUITE if d in ("pbmc3k", "symphony", "pbmc_cite")]
    assert printed.count("*not held out: the model was pretrained on") == len(in_atlas) >= 5
    ann = pd.read_csv(out / "annotation_pbmc3k" / "scores_annotation_pbmc3k.csv", index_col=0)
    assert {"accuracy", "precision", "recall", "macro_f1"} <= set(ann.columns) and "logreg on PCA" in ann.index
    integ = pd.read_csv(out / "integration_symphony" / "scores_integration_symphony.csv", index_col=0)
    assert {"NMI_cell", "ARI_cell", "ASW_cell", "ASW_batch", "GraphConn", "AvgBIO", "AvgBATCH",
            "Overall"} <= set(integ.columns) and {"PCA", "Harmony"} <= set(integ.index)
    zs = pd.read_csv(out / "zero-shot_symphony" / "scores_zero-shot_symphony.csv", index_col=0)
    assert {"knn_accuracy", "knn_macro_f1", "Overall"} <= set(zs.columns)
    gn = pd.read_csv(out / "gene-network_pbmc3k" / "scores_gene-network_pbmc3k.csv", index_col=0)
    assert {"pathway_pearson", "CD8A_top10_immune_share", "hla_I_vs_II_separation", "n_programs"} <= set(gn.columns)
    assert "co-expression" in gn.index
    for png in ["annotation_pbmc3k/confusion_pbmc3k.png", "integration_symphony/umap_symphony_integration.png",
                "zero-shot_symphony/umap_symphony_zero_shot.png", "gene-network_pbmc3k/gene_network_pbmc3k.png"]:
        assert (out / png).stat().st_size > 1000, png


def test_suite_is_logged_to_runs_linked_to_the_model_version(suite_run):
    from mlflow.tracking import MlflowClient

    tracking_uri, model_uri, _, _ = suite_run
    c = MlflowClient(tracking_uri=tracking_uri)
    name, version = model_uri.removeprefix("models:/").split("/")
    mv = c.get_model_version(name, version)
    exp = c.get_experiment_by_name("scgpt-eval")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.model_name = '{name}'")
    parents = [r for r in runs if r.data.tags.get("eval_task") == "suite"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted((r.data.tags["eval_task"], r.data.tags["eval_dataset"]) for r in children) == sorted(SUITE)
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["model_version"] == str(version)
        assert r.data.tags["source_run_id"] == mv.run_id
        assert r.data.metrics, r.data.tags["eval_task"]
        assert all(np.isfinite(v) for v in r.data.metrics.values())
        arts = {a.path for a in c.list_artifacts(r.info.run_id, r.data.tags["eval_task"])}
        stem = f"{r.data.tags['eval_task']}/scores_{r.data.tags['eval_task']}_{r.data.tags['eval_dataset']}"
        assert {stem + ".csv", stem + ".md"} <= arts
        # the version points back at its evaluation runs
        assert mv.tags[f"eval.{r.data.tags['eval_task']}.{r.data.tags['eval_dataset']}"]
    assert "scGPT/accuracy" in next(r for r in children if r.data.tags["eval_task"] == "annotation").data.metrics


def test_same_command_twice_gives_same_scores(registered_debug_model, tmp_path):
    tracking_uri, model_uri = registered_debug_model
    tables = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        for task in ("annotation", "integration"):
            assert main(["--model", model_uri, "--task", task, "--dataset", "symphony", "--tracking-uri",
                         tracking_uri, "--out", str(out), "--no-plots", "--no-random-init", *FAST]) == 0
        tables.append([pd.read_csv(out / f"{t}_symphony" / f"scores_{t}_symphony.csv", index_col=0)
                       for t in ("annotation", "integration")])
    for a, b in zip(*tables):
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_user_api_on_the_registered_model(registered_debug_model):
    import anndata as ad

    from eval.api import ScGPTModel
    from eval.genes import DATA_DIR

    tracking_uri, model_uri = registered_debug_model
    m = ScGPTModel.load(model_uri, tracking_uri=tracking_uri, device="cpu")
    assert m.info["model_name"] and m.info["version"]
    a = ad.read_h5ad(DATA_DIR / "symphony_pbmc_3batch_counts.h5ad")[::10].copy()  # 150 cells
    emb = m.embed_cells(a)
    assert emb.shape == (150, m.config.d_model) and np.isfinite(emb).all()
    genes, gemb = m.embed_genes(["CD8A", "HLA-A", "NOT_A_GENE"])
    assert genes == ["CD8A", "HLA-A"] and gemb.shape == (2, m.config.d_model)
    ref, query = a[a.obs["batch"] != "5p"].copy(), a[a.obs["batch"] == "5p"].copy()
    ann = m.fine_tune(ref, task="annotation", label_key="celltype", n_hvg=100, epochs=1)
    pred = ann.predict(query)
    assert pred.shape == (query.n_obs,) and set(pred) <= set(ref.obs["celltype"].astype(str))
    assert ann.embed_cells(query).shape == (query.n_obs, m.config.d_model)
    with pytest.raises(ValueError, match="annotation"):
        m.predict(query)  # the pretrained model has no classifier
    integ = m.fine_tune(a, task="integration", label_key="celltype", batch_key="batch", n_hvg=100, epochs=1)
    assert integ.embed_cells(a).shape == (150, m.config.d_model)
