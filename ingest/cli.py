"""The `ingest` command: census, build-census, synth-census, build-demo, validate.

Bad input exits with code 2 and one message naming the fix (SPEC §7).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import sys

import localray
from ingest.errors import USAGE_EXIT_CODE, IngestError
from localray.signals import Interrupted, stop_on_signals

log = logging.getLogger("ingest")


ORGANISMS = "Homo sapiens or Mus musculus in the public Census; a local store: the organism it was built with"


def version() -> str:
    """The installed package's version (package metadata), for ``--version``."""
    try:
        return importlib.metadata.version("scgpt-census")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without `pip install -e .`
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ingest", description="CELLxGENE Census -> binned Parquet shards for scGPT")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (per-stage wall/CPU seconds)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    # `ingest census`: every default is IngestConfig's (the option's default None = no override)
    from ingest.config import IngestConfig

    dflt = {f.name: f.default for f in dataclasses.fields(IngestConfig) if f.default is not dataclasses.MISSING}
    c = sub.add_parser("census", help="query a Census (public or local) and write binned shards")
    src = c.add_argument_group("source")
    src.add_argument("--census-uri", help="a local Census copy or a store from build-census/build-demo")
    src.add_argument("--census-version", help=f"public Census release (default: {dflt['census_version']}); "
                     "ignored when --census-uri is given")
    src.add_argument("--organism", help=f"{ORGANISMS} (default: {dflt['organism']})")
    q = c.add_argument_group("query")
    q.add_argument("--tissue", action="append", help="tissue_general value; repeat for several (OR)")
    q.add_argument("--disease", action="append", help="disease value; repeatable (OR)")
    q.add_argument("--assay", action="append", help="assay value; repeatable (OR)")
    q.add_argument("--obs-filter", action="append", help="raw SOMA value filter, ANDed with the rest; repeatable")
    q.add_argument("--include-non-primary", action="store_true", default=None,
                   help="also take is_primary_data == False cells (duplicates of cells in other datasets)")
    q.add_argument("--min-genes", type=int, help="minimum nonzero genes (in the vocabulary) per cell, "
                   f"an integer >= 0 (default: {dflt['min_genes']})")
    q.add_argument("--max-cells", type=int, help="a seeded sample of this many cells, an integer >= 1 "
                   "(quick runs; default: all)")
    t = c.add_argument_group("tokens")
    t.add_argument("--n-bins", type=int, help="expression bins per cell (paper eq. 2), an integer "
                   f"from 3 to 256 (stored as uint8; default: {dflt['n_bins']}, the paper's)")
    t.add_argument("--vocab", help="reuse this vocab.json (ours or an official scGPT one; default: the store's genes)")
    t.add_argument("--gene-key", choices=["feature_id", "feature_name"],
                   help="match genes by Ensembl id (feature_id) or symbol (feature_name); "
                   "default: the --vocab's key, else feature_id")
    o = c.add_argument_group("output and execution")
    o.add_argument("--out", required=True, help="shard directory (created; re-run with same args to resume)")
    o.add_argument("--cells-per-shard", type=int, help="cells per Parquet shard (one Ray task "
                   f"each; bounds worker memory), an integer >= 1 (default: {dflt['cells_per_shard']})")
    o.add_argument("--seed", type=int, help="seed of the binning tie draws, the validation split and "
                   f"--max-cells sampling, any integer (default: {dflt['seed']})")
    o.add_argument("--val-fraction", type=float, help="share of cells held out for validation, "
                   f"in [0, 1) (default: {dflt['val_fraction']}, the paper's 97/3 split)")
    o.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    o.add_argument("--num-cpus", type=int, help="CPUs for the local Ray, an integer >= 1 (default: all)")

    b = sub.add_parser("build-census", help="write a Census-layout store from .h5ad files")
    b.add_argument("--h5ad", action="append", required=True, help="an AnnData file with raw counts; repeatable")
    b.add_argument("--out", required=True, help="folder of the new store (must not exist)")
    b.add_argument("--layer", default=None, help="take raw counts from this layer of every file (default: X)")
    b.add_argument("--set", action="append", default=[], metavar="COLUMN=VALUE",
                   help="value for a Census obs column the sources lack, e.g. --set tissue_general=blood")
    b.add_argument("--organism", default="Homo sapiens", help="organism recorded in the store (its Experiment "
                   "name), e.g. Homo sapiens or Mus musculus (default: %(default)s)")
    b.add_argument("--on-duplicate-genes", choices=["sum", "first", "error"], default="sum",
                   help="columns of one file that map to the same gene id (a repeated symbol, two aliases, two "
                   "GENCODE versions): sum their counts, keep the first column, or refuse; a warning names them "
                   "(default: %(default)s)")

    s = sub.add_parser("synth-census", help="write a synthetic Census-layout store (scale tests)")
    s.add_argument("--cells", type=int, required=True, help="cells to write, an integer >= 1")
    s.add_argument("--genes", type=int, default=20_000, help="genes in var, an integer >= 1 (real Ensembl ids "
                   "first; default: %(default)s)")
    s.add_argument("--mean-genes", type=float, default=1500.0, help="median genes detected per cell, > 0 "
                   "(default: %(default)s)")
    s.add_argument("--chunk-cells", type=int, default=5000, help="cells generated and written per step (bounds "
                   "memory), an integer >= 1 (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator, any integer (default: %(default)s)")
    s.add_argument("--out", required=True, help="folder of the new store")

    d = sub.add_parser("build-demo", help="write the demo atlas (real PBMCs + synthetic lung/brain cells)")
    d.add_argument("--out", required=True, help="folder of the demo atlas")
    d.add_argument("--no-reuse", action="store_true", help="always build (fails if --out exists); default: keep an "
                   "existing complete demo atlas at --out")

    v = sub.add_parser("validate", help="re-check a shard set against its manifest")
    v.add_argument("path", help="a shard folder written by `ingest census` (manifest.json, vocab.json, shards/)")
    v.add_argument("--no-checksums", action="store_true", help="skip sha256 (faster on large sets)")
    return ap


# `ingest census` options -> IngestConfig fields; the repeatable ones become tuples
_CENSUS_FIELDS = {"census_uri": "census_uri", "census_version": "census_version", "organism": "organism",
                  "tissue": "tissues", "disease": "diseases", "assay": "assays", "obs_filter": "obs_filters",
                  "include_non_primary": "include_non_primary", "min_genes": "min_genes", "n_bins": "n_bins",
                  "vocab": "vocab", "gene_key": "gene_key", "cells_per_shard": "cells_per_shard",
                  "max_cells": "max_cells", "seed": "seed", "val_fraction": "val_fraction",
                  "ray_address": "ray_address", "num_cpus": "num_cpus"}


def census_overrides(args: argparse.Namespace) -> dict:
    """The IngestConfig fields given on the command line (an option left out keeps the dataclass default)."""
    out = {}
    for dest, name in _CENSUS_FIELDS.items():
        v = getattr(args, dest)
        if v is not None:
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "census":
        from ingest.query import IngestConfig
        from ingest.run import run_ingest

        cfg = IngestConfig(out=args.out, **census_overrides(args))
        m = run_ingest(cfg)
        print(json.dumps({"out": args.out, "cells": m.totals.cells, "shards": len(m.shards),
                          "n_val": m.totals.n_val, "manifest_hash": m.hash()}))
    elif args.cmd == "build-census":
        from ingest.build_census import build_census, parse_set_values

        build_census(args.h5ad, args.out, set_values=parse_set_values(args.set), layer=args.layer,
                     organism=args.organism, on_duplicate_genes=args.on_duplicate_genes)
        print(json.dumps({"out": args.out}))
    elif args.cmd == "synth-census":
        from ingest.synth import SynthConfig, synth_census

        synth_census(args.out, SynthConfig(n_cells=args.cells, n_genes=args.genes, mean_genes=args.mean_genes,
                                           chunk_cells=args.chunk_cells, seed=args.seed))
        print(json.dumps({"out": args.out}))
    elif args.cmd == "build-demo":
        from ingest.demo import build_demo

        build_demo(args.out, reuse=not args.no_reuse)
        print(json.dumps({"out": args.out}))
    elif args.cmd == "validate":
        from ingest.validate import validate_shards

        print(json.dumps(validate_shards(args.path, check_checksums=not args.no_checksums)))
    return 0


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command left and how to continue (one line)."""
    if args.cmd != "census":
        return "nothing half-written is left; run the same command again"
    from shardset import Manifest, ManifestError

    try:
        m = Manifest.load(args.out)
    except ManifestError:
        return f"no shard was finished in {args.out}; run the same `ingest census` command again"
    return (f"kept {len(m.shards)} of {m.n_shards_planned} shards in {args.out} (its manifest lists them); "
            "re-run the same `ingest census` command to finish the rest")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    localray.prepare(getattr(args, "ray_address", None))  # before anything imports ray
    try:
        with stop_on_signals():
            return _run(args)
    except Interrupted as e:  # Ray is shut down and temporary files removed by now
        print(f"ingest {args.cmd}: interrupted by {e.name}: {_kept(args)}", file=sys.stderr, flush=True)
        return e.exit_code
    except IngestError as e:
        print(f"ingest {args.cmd}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", USAGE_EXIT_CODE)  # 2 for bad input; 1 for a full disk
    except localray.LocalRayError as e:  # not bad input: the machine could not start Ray
        print(f"ingest {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
