"""Iterative K-step generation (§4.3.2, Fig. S1B) from a gene prompt or a cell prompt.

Each step runs the generative attention with the prompt + already generated genes as known
tokens and the remaining requested genes as unknown tokens, predicts every unknown gene, and
moves the most confident share (1/K of the requested genes, split as evenly as integers allow)
into the known set with its predicted value. After exactly K steps every requested gene has a
value. The reference never released this (scGPT #230).

Confidence: with the cross-entropy head, the probability of the chosen bin (max probability, or
the sampled bin's probability when sampling). With the MSE head there is no distribution, so we
use the agreement of the two independent predictors when GEPC is on, ``-|x_GEP - x_GEPC|``, and
otherwise the distance to the nearest bin, ``-|x - round(x)|`` (a value that sits on a bin is a
decided one). Ties keep the requested order (stable sort), so runs are deterministic; sampling
(CE head) draws from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from scgpt_model.batching import CellTokens, assemble
from scgpt_model.model import ScGPT

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    genes: list[np.ndarray]  # per cell, the requested genes (as given)
    values: list[np.ndarray]  # per cell, generated bins aligned with ``genes``
    step: list[np.ndarray]  # per cell, the step (0..K-1) at which each gene was fixed
    n_steps: int  # forward passes run (= K)


def _step_sizes(n: int, k: int) -> np.ndarray:
    """How many genes step s fixes: n split into k nearly equal integers (larger first)."""
    return np.array([len(a) for a in np.array_split(np.arange(n), k)], dtype=int)


@torch.no_grad()
def generate(model: ScGPT, genes: Sequence[np.ndarray], *, n_steps: int,
             prompt_genes: Sequence[np.ndarray] | None = None, prompt_values: Sequence[np.ndarray] | None = None,
             cell_prompt: Tensor | None = None, seed: int = 0, sample: bool = False,
             temperature: float = 1.0, batch_labels: Sequence[int] | None = None) -> GenerationResult:
    """Generate values for ``genes[i]`` of each cell i in exactly ``n_steps`` steps.

    Gene prompt: ``prompt_genes``/``prompt_values`` (bins) per cell. Cell prompt: ``cell_prompt``
    (B, d_model), fed as the input embedding at ``<cls>``. Both may be given together.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    b = len(genes)
    if prompt_genes is None:
        prompt_genes = [np.zeros(0, dtype=np.int64)] * b
        prompt_values = [np.zeros(0, dtype=np.float32)] * b
    if prompt_values is None or len(prompt_genes) != b or len(prompt_values) != b:
        raise ValueError("prompt_genes and prompt_values must be given together, one array per cell")
    if cell_prompt is not None and tuple(cell_prompt.shape) != (b, model.cfg.d_model):
        raise ValueError(f"cell_prompt must be (n_cells, d_model) = ({b}, {model.cfg.d_model})")
    if sample and model.cfg.objectives.gep_loss != "ce":
        raise ValueError("sampling needs the cross-entropy head (objectives.gep_loss='ce')")
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    genes = [np.asarray(g, dtype=np.int64) for g in genes]
    sizes = [_step_sizes(len(g), n_steps) for g in genes]
    values = [np.zeros(len(g), dtype=np.float32) for g in genes]
    step_of = [np.full(len(g), -1, dtype=np.int64) for g in genes]
    was_training = model.training
    model.eval()
    try:
        for s in range(n_steps):
            pending = [np.flatnonzero(st < 0) for st in step_of]  # requested-order indices still unknown
            cells = []
            for i in range(b):
                done = np.flatnonzero(step_of[i] >= 0)
                kg = np.concatenate([np.asarray(prompt_genes[i], dtype=np.int64), genes[i][done]])
                kv = np.concatenate([np.asarray(prompt_values[i], dtype=np.float32), values[i][done]])
                ug = genes[i][pending[i]]
                g = np.concatenate([kg, ug])
                v = np.concatenate([kv, np.zeros(len(ug), dtype=np.float32)])
                unk = np.arange(len(g)) >= len(kg)
                cells.append(CellTokens(genes=g, values=v, targets=v, unknown=unk,
                                        masked=np.zeros(len(g), dtype=bool), loss=np.zeros(len(g), dtype=bool)))
            batch = assemble(cells, backend=model.collate_backend(), batch_labels=batch_labels).to(dev)
            out = model(batch, cell_prompt=cell_prompt, compute_loss=False)
            sel = batch.unknown.reshape(-1)  # flat order = cell-major, requested order within a cell
            value, conf = _predict(model, out, sel, gen, sample, temperature)
            value, conf = value.cpu().numpy(), conf.cpu().numpy()
            offset = 0
            for i in range(b):
                n = len(pending[i])
                vi, ci = value[offset:offset + n], conf[offset:offset + n]
                offset += n
                take = np.argsort(-ci, kind="stable")[: sizes[i][s]]
                values[i][pending[i][take]] = vi[take]
                step_of[i][pending[i][take]] = s
            logger.debug("generation step %d/%d done", s + 1, n_steps)
    finally:
        model.train(was_training)
    assert all((st >= 0).all() for st in step_of)
    return GenerationResult(genes=genes, values=values, step=step_of, n_steps=n_steps)


def _predict(model: ScGPT, out, sel: Tensor, gen: torch.Generator, sample: bool,
             temperature: float) -> tuple[Tensor, Tensor]:
    """Predicted bin and confidence for the selected (unknown) tokens."""
    n_bins = model.cfg.n_bins
    if out.expr_logits is not None:
        probs = torch.softmax(out.expr_logits[sel].float() / temperature, dim=-1)
        if sample and probs.shape[0]:
            idx = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        else:
            idx = probs.argmax(-1)
        return idx.float(), probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    x = out.expr_pred[sel].float()
    if out.gepc_pred is not None:
        conf = -(x - out.gepc_pred[sel].float()).abs()
    else:
        conf = -(x - x.round()).abs()
    return x.round().clamp(0, n_bins - 1), conf
