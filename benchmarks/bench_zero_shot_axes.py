"""Is there cell type beneath the depth axis of a zero-shot embedding?

The CPU-scale pretrained embedding has one dominant principal component that follows sequencing
depth (BENCHMARKS.md, issue 10). This scores, for the pretrained model and its random-init twin,
each cell embedding (`<cls>` and the mean gene state) as `evaluate --task zero-shot` computes it,
and four post-hoc edits of it: a linear regression on the cell's log number of expressed genes
removed, the first principal component removed, each dimension standardized, and PCA whitening
(the top 50 components, each scaled to unit variance). Per row: AvgBIO (scib, S.2), kNN label
transfer accuracy (reference -> query, as the zero-shot task splits), the first PC's share of
the variance and its |correlation| with log expressed genes. An analysis, not a tool option.

    python benchmarks/bench_zero_shot_axes.py --model models:/scgpt-cpu/1 \\
        --tracking-uri sqlite:///demo_out/mlflow.db --dataset symphony --max-cells 800
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from eval import tasks  # noqa: E402
from eval.api import ScGPTModel  # noqa: E402


def first_pc(e: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(centred embedding, unit first PC, its share of the variance)."""
    ec = e - e.mean(0)
    _, s, vt = np.linalg.svd(ec, full_matrices=False)
    return ec, vt[0], float(s[0] ** 2 / (s ** 2).sum())


def regress_out(e: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    x = np.c_[np.ones_like(covariate), covariate]
    return e - x @ np.linalg.lstsq(x, e, rcond=None)[0]


def drop_first_pc(e: np.ndarray) -> np.ndarray:
    ec, v, _ = first_pc(e)
    return ec - np.outer(ec @ v, v)


def standardize(e: np.ndarray) -> np.ndarray:
    """Each embedding dimension centred and scaled to unit variance over the cells."""
    return (e - e.mean(0)) / (e.std(0) + 1e-8)


def whiten(e: np.ndarray, k: int = 50) -> np.ndarray:
    """Projected on the top ``k`` principal components, each scaled to unit variance (PCA whitening)."""
    ec = e - e.mean(0)
    u, _, _ = np.linalg.svd(ec, full_matrices=False)
    return u[:, :k] * np.sqrt(len(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="models:/<name>/<version> or a model folder")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--dataset", default="symphony")
    ap.add_argument("--max-cells", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = ScGPTModel.load(args.model, tracking_uri=args.tracking_uri, device="cpu")
    opts = tasks.EvalOptions(max_cells=args.max_cells, seed=args.seed, plots=False)
    p = tasks.plan("zero-shot", model, args.dataset, opts)
    d = p.data
    ref, qry, how = tasks.reference_query_split(p, opts)
    depth = np.log1p(np.asarray((d.counts > 0).sum(1)).ravel())
    print(f"{args.dataset}: {d.n_cells} cells, {d.n_genes} genes, kNN split {how}, seed {args.seed}\n")
    print("| model | embedding | edit | AvgBIO | kNN accuracy | PC1 share | \\|r(PC1, log expressed genes)\\| |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, m in (("pretrained", model), ("random init", model.random_init(args.seed))):
        for style in ("avg-pool", "cls"):
            e = m.embed_cells(d, seed=args.seed, style=style)
            for edit, x in (("none", e), ("log expressed genes regressed out", regress_out(e, depth)),
                            ("PC1 removed", drop_first_pc(e)), ("dimensions standardized", standardize(e)),
                            ("PCA-whitened, 50 PCs", whiten(e))):
                s = tasks.zero_shot_scores(x, d, ref, qry, opts)
                ec, v, share = first_pc(x)
                r = abs(np.corrcoef(ec @ v, depth)[0, 1])
                print(f"| {name} | {style} | {edit} | {s['AvgBIO']:.3f} | {s['knn_accuracy']:.3f} | {share:.2f} | "
                      f"{r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
