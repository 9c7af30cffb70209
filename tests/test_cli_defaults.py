"""CLI defaults come from the dataclass defaults (issue 13 item 6): an option left out is no override."""

from __future__ import annotations

import dataclasses

from ingest.cli import _parser, census_overrides
from ingest.config import IngestConfig


def test_ingest_census_options_left_out_keep_the_dataclass_defaults():
    args = _parser().parse_args(["census", "--out", "o"])
    assert census_overrides(args) == {}
    assert IngestConfig(out="o", **census_overrides(args)) == IngestConfig(out="o")


def test_every_ingest_census_option_reaches_its_field():
    argv = ["census", "--out", "o", "--census-uri", "u", "--census-version", "2025-01-01", "--organism",
            "Mus musculus", "--tissue", "blood", "--tissue", "lung", "--disease", "normal", "--assay", "10x",
            "--obs-filter", "nnz > 3", "--include-non-primary", "--min-genes", "5", "--max-cells", "7",
            "--n-bins", "11", "--vocab", "v.json", "--gene-key", "feature_name", "--cells-per-shard", "9",
            "--seed", "3", "--val-fraction", "0.1", "--ray-address", "auto", "--num-cpus", "2"]
    cfg = IngestConfig(out="o", **census_overrides(_parser().parse_args(argv)))
    want = dict(census_uri="u", census_version="2025-01-01", organism="Mus musculus", tissues=("blood", "lung"),
                diseases=("normal",), assays=("10x",), obs_filters=("nnz > 3",), include_non_primary=True,
                min_genes=5, max_cells=7, n_bins=11, vocab="v.json", gene_key="feature_name", cells_per_shard=9,
                seed=3, val_fraction=0.1, ray_address="auto", num_cpus=2)
    assert {k: getattr(cfg, k) for k in want} == want
    # every field a user may set has an option (progress_every_s and stop_grace_s are internal)
    settable = {f.name for f in dataclasses.fields(IngestConfig)} - {"out", "progress_every_s", "stop_grace_s"}
    assert settable == set(want)


def test_ingest_census_help_shows_the_dataclass_defaults():
    sub = _parser()._subparsers._group_actions[0].choices["census"]
    helps = {o: a.help for a in sub._actions for o in a.option_strings}
    d = IngestConfig(out="o")
    for option, value in (("--min-genes", d.min_genes), ("--n-bins", d.n_bins), ("--seed", d.seed),
                          ("--cells-per-shard", d.cells_per_shard), ("--val-fraction", d.val_fraction),
                          ("--census-version", d.census_version), ("--organism", d.organism)):
        assert f"default: {value}" in helps[option], (option, helps[option])


def test_evaluate_defaults_match_eval_options():
    # evaluate's parser stays import-light (no torch for --help), so it spells its defaults; this
    # binds each one to the EvalOptions field it fills
    from eval.cli import _parser as eval_parser
    from eval.tasks import EvalOptions

    args = eval_parser(False).parse_args(["--model", "m", "--task", "annotation", "--dataset", "d"])
    d = EvalOptions()
    fields = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup_fraction",
              "weight_decay": "weight_decay", "n_hvg": "n_hvg", "max_cells": "max_cells", "seed": "seed",
              "label_fraction": "label_fraction", "min_steps": "min_steps", "cell_emb": "cell_emb",
              "perturbation_min_steps": "perturbation_min_steps", "dropout": "dropout", "gene_dropout": "gene_dropout",
              "include_zeros": "include_zeros", "class_weight": "class_weight",
              "splits": "n_splits", "max_perturbations": "max_perturbations", "trunk": "trunk"}
    assert {dest: getattr(args, dest) for dest in fields} == {dest: getattr(d, f) for dest, f in fields.items()}
    assert (not args.no_random_init, not args.no_plots) == (d.random_init, d.plots)


def test_build_census_and_synth_census_defaults_match_their_functions():
    # these parsers spell their defaults so `ingest --help` stays free of anndata/tiledbsoma; bind them
    import inspect

    from ingest.build_census import build_census
    from ingest.synth import SynthConfig

    b = _parser().parse_args(["build-census", "--h5ad", "a.h5ad", "--out", "o"])
    sig = inspect.signature(build_census).parameters
    assert (b.layer, b.organism, b.on_duplicate_genes) == tuple(
        sig[k].default for k in ("layer", "organism", "on_duplicate_genes"))
    s = _parser().parse_args(["synth-census", "--cells", "10", "--out", "o"])
    d = SynthConfig(n_cells=10)
    assert (s.genes, s.mean_genes, s.chunk_cells, s.seed) == (d.n_genes, d.mean_genes, d.chunk_cells, d.seed)
