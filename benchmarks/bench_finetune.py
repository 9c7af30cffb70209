"""Annotation fine-tuning from random init on real cells, beside logistic regression on PCA.

The before/after table of BENCHMARKS.md "Why fine-tuning learned nothing" comes from:

    python benchmarks/bench_finetune.py --epochs 5 --lr 1e-3 --hvg 300 --max-cells 1200   # both inits
    python benchmarks/bench_finetune.py --epochs 10 --hvg 300 --max-cells 1200            # default lr

Run it with ``SRC=<a checkout of an older commit>`` (e.g. ``git worktree add /tmp/old bfc2e7e``) to
score that commit's code on the same cells.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import time

sys.path.insert(0, os.environ.get("SRC", os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from eval import baselines, metrics  # noqa: E402
from eval.data import batch_split, load_dataset, prepare, select_hvg, stratified_split  # noqa: E402
from eval.finetune import FineTuneConfig, fine_tune, predict_labels  # noqa: E402
from eval.genes import symbol_table  # noqa: E402
from scgpt_model.presets import get_preset  # noqa: E402
from scgpt_model.vocab import GeneVocab  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="pbmc3k", help="pbmc3k (stratified 20%% query) or symphony (5' query)")
    ap.add_argument("--hvg", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=None, help="default: eval.finetune.default_lr")
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--max-cells", type=int, default=0)
    ap.add_argument("--overrides", default="{}", help="ModelConfig fields, e.g. \"{'init_std': 0.02}\"")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    vocab = GeneVocab.from_genes(sorted(set(symbol_table().values())))
    name, adata, meta = load_dataset(a.dataset)
    d = prepare(adata, vocab, name=name, label_key="celltype", batch_key=meta.batch_key, max_cells=a.max_cells)
    ref_i, qry_i = batch_split(d.batches, meta.query_batches) if meta.query_batches else \
        stratified_split(d.labels, 0.2, 0)
    ref_all = d.subset(ref_i)
    cols = select_hvg(ref_all.counts, a.hvg)
    ref, qry = ref_all.take_genes(cols), d.subset(qry_i).take_genes(cols)
    pred = baselines.logreg_annotation(ref.lognorm(), ref.labels, qry.lognorm(), seed=0)
    print("logreg on PCA", metrics.classification_scores(qry.labels, pred))
    cfg = get_preset(a.preset, len(vocab), **ast.literal_eval(a.overrides))
    t = time.perf_counter()
    res = fine_tune(None, cfg, ref, FineTuneConfig(task="annotation", epochs=a.epochs, lr=a.lr, seed=0))
    pred = predict_labels(res.model, qry, res.classes, include_zeros=res.include_zeros)
    print("scGPT random init", metrics.classification_scores(qry.labels, pred), "best epoch", res.best_epoch,
          f"{time.perf_counter() - t:.0f}s")


if __name__ == "__main__":
    main()
