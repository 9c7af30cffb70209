"""Held-out generative loss: does a pretrained model predict expression better than trivia?

The pretraining objective (GEP, §4.3.2) scored on cells the model never trained on, with the
pretraining protocol (each cell's expressed genes, sub-sampled to ``max_seq_len``, a share of
them unknown), against two predictors that need no model:

* ``per_gene_mean``: each unknown gene's mean bin over the training cells that express it;
* ``cell_mean``: the cell's own mean bin over its known genes.

Bins are per-cell quantiles (1 .. n_bins-1 over expressed genes), so the cell mean is close to
the middle bin for every cell; the per-gene mean knows which genes sit high in most cells. A
model that beats both has learned something from the context of the cell.

Cells come from a shard set's validation split (``cells_from_shards``) or from a prepared
AnnData (``cells_from_prepared``), e.g. a dataset held out of pretraining.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scgpt_model.batching import collate_generative
from scgpt_model.model import ScGPT

UNKNOWN_RATIOS = (0.25, 0.5, 0.75)  # the pretraining protocol's (training.config DataConfig)


@dataclass(frozen=True, slots=True)
class GepScores:
    """Mean squared error in bins over the unknown tokens of the held-out cells."""

    model: float
    per_gene_mean: float
    cell_mean: float
    n_cells: int
    n_tokens: int

    @property
    def best_trivial(self) -> float:
        return min(self.per_gene_mean, self.cell_mean)

    @property
    def gain(self) -> float:
        """1 - model / best trivial predictor: 0.2 means 20% below the better one."""
        return 1.0 - self.model / self.best_trivial

    def to_dict(self) -> dict:
        return {**asdict(self), "best_trivial": self.best_trivial, "gain": self.gain}


def _read_shards(shards: str | Path, *, validation: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(genes, bins) of one split of a shard set, read as training reads it (``training.data``:
    the manifest's split rule, the shard decoder)."""
    from training.data import ShardStore, build_index

    index = build_index(shards)[1 if validation else 0]
    genes, bins, _ = ShardStore(index).cells(np.arange(len(index)))
    return genes, bins


def gene_means(genes: list[np.ndarray], bins: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """(vocab_size,) each gene's mean bin over the cells that express it; the overall mean elsewhere."""
    g = np.concatenate(genes) if genes else np.zeros(0, np.int64)
    b = np.concatenate(bins).astype(np.float64) if bins else np.zeros(0)
    total = np.bincount(g, weights=b, minlength=vocab_size)
    count = np.bincount(g, minlength=vocab_size)
    overall = float(b.mean()) if b.size else 0.0
    return np.where(count > 0, total / np.maximum(count, 1), overall)


def training_gene_means(shards: str | Path, vocab_size: int) -> np.ndarray:
    """The per-gene-mean predictor, fitted on a shard set's training cells."""
    return gene_means(*_read_shards(shards, validation=False), vocab_size)


def cells_from_shards(shards: str | Path, max_cells: int | None = None,
                      seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(genes, bins) of a shard set's validation cells: the cells pretraining never trained on."""
    genes, bins = _read_shards(shards, validation=True)
    if max_cells is not None and len(genes) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(genes), max_cells, replace=False))
        genes, bins = [genes[i] for i in keep], [bins[i] for i in keep]
    return genes, bins


def cells_from_prepared(data) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(genes, bins) of each cell's expressed genes in an ``eval.data.PreparedData``."""
    B = data.bins
    genes, bins = [], []
    for r in range(data.n_cells):
        sl = slice(B.indptr[r], B.indptr[r + 1])
        v = np.asarray(B.data[sl], dtype=np.int64)
        keep = v > 0
        genes.append(np.asarray(data.token_ids[B.indices[sl]], dtype=np.int64)[keep])
        bins.append(v[keep])
    return genes, bins


@torch.no_grad()
def heldout_gep(model: ScGPT, genes: list[np.ndarray], bins: list[np.ndarray], gene_mean: np.ndarray, *,
                seed: int = 0, batch_size: int = 32, device: str = "cpu") -> GepScores:
    """GEP error of ``model`` and of the two trivial predictors on the same cells and masks."""
    keep = [i for i, g in enumerate(genes) if len(g) >= 4]  # a cell needs known and unknown genes
    sq = {"model": 0.0, "per_gene_mean": 0.0, "cell_mean": 0.0}
    n_tok = 0
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(keep), batch_size):
            rows = keep[s:s + batch_size]
            rng = np.random.default_rng([seed, s])
            batch = collate_generative([genes[i] for i in rows], [bins[i].astype(np.float32) for i in rows],
                                       max_seq_len=model.cfg.max_seq_len, seed=rng, unknown_ratios=UNKNOWN_RATIOS,
                                       backend="sdpa")
            out = model(batch.to(device), compute_loss=False)
            mask = batch.loss_mask.reshape(-1).numpy()
            tgt = batch.targets.reshape(-1).numpy().astype(np.float64)[mask]
            g = batch.genes.reshape(-1).numpy()
            cell = batch.token_cell().numpy()
            known = (batch.token_mask & ~batch.unknown).reshape(-1).numpy()
            known[batch.cls_index().numpy()] = False
            vals = batch.values.reshape(-1).numpy().astype(np.float64)
            k_sum = np.bincount(cell[known], weights=vals[known], minlength=batch.n_cells)
            k_n = np.bincount(cell[known], minlength=batch.n_cells)
            cell_mean = np.where(k_n > 0, k_sum / np.maximum(k_n, 1), float(gene_mean.mean()))
            pred = out.expr_pred.reshape(-1).float().cpu().numpy().astype(np.float64)[mask]
            sq["model"] += float(((pred - tgt) ** 2).sum())
            sq["per_gene_mean"] += float(((gene_mean[g[mask]] - tgt) ** 2).sum())
            sq["cell_mean"] += float(((cell_mean[cell[mask]] - tgt) ** 2).sum())
            n_tok += int(mask.sum())
    finally:
        model.train(was_training)
    n = max(n_tok, 1)
    return GepScores(sq["model"] / n, sq["per_gene_mean"] / n, sq["cell_mean"] / n, len(keep), n_tok)
