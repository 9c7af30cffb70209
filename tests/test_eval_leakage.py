"""Pretraining lineage: a trained model records the datasets it was pretrained on (manifest,
model-version tags, lineage.json), and evaluation warns when it scores the model on them."""

from __future__ import annotations

import logging

from eval.leakage import overlap, warn_if_pretrained_on


def _info(*datasets: tuple[str, str]) -> dict:
    return {"lineage": {"datasets": [{"dataset_id": i, "h5ad_path": p, "title": "", "collection_name": "",
                                      "n_cells": 10} for i, p in datasets]}}


def test_overlap_matches_by_file_name_or_dataset_name():
    info = _info(("pbmc3k", "pbmc3k_counts_celltype.h5ad"), ("kang-ifnb-ctrl", "kang_ifnb_ctrl_stim_counts.h5ad"),
                 ("pbmc-cite-10k", "pbmc_10k_protein_v3.h5ad"))
    assert overlap(info, "annotation", "pbmc3k") == ["pbmc3k"]
    assert overlap(info, "zero-shot", "symphony") == []
    assert overlap(info, "multiomic", "pbmc_cite") == ["pbmc-cite-10k"]
    assert overlap(info, "annotation", "/data/elsewhere/kang_ifnb_ctrl_stim_counts.h5ad") == ["kang-ifnb-ctrl"]
    assert overlap({}, "annotation", "pbmc3k") == []  # no lineage (e.g. an imported official model): silent
    assert overlap({"lineage": None}, "annotation", "pbmc3k") == []


def test_the_pipeline_records_pretraining_datasets_and_evaluation_warns(registered_debug_model, pretrain_run,
                                                                         caplog):
    from mlflow.tracking import MlflowClient

    from eval.api import ScGPTModel
    from shardset import Manifest

    tracking_uri, model_uri = registered_debug_model
    manifest = Manifest.load(pretrain_run.shards)
    ids = {d.dataset_id for d in manifest.datasets}
    # the demo atlas's blood query: every real PBMC set, each with its cell count; no synthetic tissue
    assert {"pbmc3k", "kang-ifnb-ctrl", "kang-ifnb-stim", "pbmc-cite-10k", "symphony-pbmc-5p"} <= ids
    assert not any(i.startswith("synthetic") for i in ids)
    assert sum(d.n_cells for d in manifest.datasets) == manifest.totals.cells_planned

    name, version = model_uri.removeprefix("models:/").split("/")
    tags = MlflowClient(tracking_uri=tracking_uri).get_model_version(name, version).tags
    assert set(tags["pretrain_datasets"].split(",")) == ids

    model = ScGPTModel.load(model_uri, tracking_uri=tracking_uri)
    assert {d["dataset_id"] for d in model.info["lineage"]["datasets"]} == ids
    assert model.info["lineage"]["manifest_hash"] == manifest.hash()
    with caplog.at_level(logging.WARNING, logger="eval.leakage"):
        assert warn_if_pretrained_on(model.info, "annotation", "pbmc3k") == ["pbmc3k"]
    assert "pretrained on these cells" in caplog.text and "--obs-filter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eval.leakage"):
        assert warn_if_pretrained_on(model.info, "annotation", "/nowhere/other_study.h5ad") == []
    assert caplog.text == ""
