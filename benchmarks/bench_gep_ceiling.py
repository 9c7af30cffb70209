"""How much of a cell's expressed-gene bins can any model predict? A ceiling for held-out GEP.

Per-cell binning (§4.1) ranks a cell's expressed genes into bins 1..n_bins-1 and spreads ties at
random (seeded). In shallow 10x data most expressed genes have a count of 1, so most bins are a
tie broken by a coin: no model can predict them. This measures, on labelled real cells:

* the per-gene-mean predictor's error (each gene's mean bin, fitted in-sample);
* an oracle that also knows the cell's type (each gene's mean bin within that type, in-sample,
  so optimistic): the gain a model could get from "which cell type is this" alone;
* the share of expressed genes whose count is 1, and of those tied within the cell.

    python benchmarks/bench_gep_ceiling.py --dataset pbmc3k --dataset symphony
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from eval.data import load_dataset, prepare  # noqa: E402
from eval.genes import symbol_table  # noqa: E402
from eval.gep import cells_from_prepared  # noqa: E402
from scgpt_model.vocab import GeneVocab  # noqa: E402


def ceiling(dataset: str) -> dict:
    name, adata, meta = load_dataset(dataset)
    vocab = GeneVocab.from_genes(sorted(set(symbol_table().values())))
    data = prepare(adata, vocab, name=name, label_key=meta.label_key if meta else None, batch_key=None)
    genes, bins = cells_from_prepared(data)
    V = len(vocab)
    G = np.concatenate(genes)
    B = np.concatenate(bins).astype(float)
    C = np.repeat(np.arange(len(genes)), [len(g) for g in genes])
    gm = np.bincount(G, B, V) / np.maximum(np.bincount(G, minlength=V), 1)
    lab = np.unique(data.labels, return_inverse=True)[1]
    key = lab[C] * V + G
    n_key = (lab.max() + 1) * V
    tm = np.bincount(key, B, n_key) / np.maximum(np.bincount(key, minlength=n_key), 1)
    counts = data.counts
    ones = float((counts.data == 1).mean())
    mse_g, mse_t = float(((gm[G] - B) ** 2).mean()), float(((tm[key] - B) ** 2).mean())
    return {"dataset": name, "cells": len(genes), "expressed_per_cell": float(np.mean([len(g) for g in genes])),
            "share_count_1": ones, "per_gene_mean": mse_g, "cell_type_oracle": mse_t, "oracle_gain": 1 - mse_t / mse_g}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="append", default=[])
    args = ap.parse_args()
    print("| dataset | cells | expressed genes / cell | share with count 1 | per-gene mean MSE | cell-type oracle MSE "
          "| oracle gain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d in args.dataset or ["pbmc3k", "symphony"]:
        r = ceiling(d)
        print(f"| {r['dataset']} | {r['cells']} | {r['expressed_per_cell']:.0f} | {r['share_count_1']:.2f} | "
              f"{r['per_gene_mean']:.1f} | {r['cell_type_oracle']:.1f} | {100 * r['oracle_gain']:.0f}% |")


if __name__ == "__main__":
    main()
