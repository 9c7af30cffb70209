"""Masking semantics of the generative attention, through the whole model."""

from __future__ import annotations

import numpy as np
import torch

from scgpt_model.batching import CellTokens, assemble, collate_generative
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from tests.fixtures.model import random_cells


def _cell(genes, values, n_unknown):
    n = len(genes)
    unk = np.arange(n) >= n - n_unknown
    return CellTokens(genes=np.asarray(genes), values=np.asarray(values, dtype=np.float32),
                      targets=np.asarray(values, dtype=np.float32), unknown=unk, masked=np.zeros(n, bool),
                      loss=unk.copy())


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return ScGPT(get_preset("debug", 400, **kw)).eval()


def test_unknown_gene_identity_changes_only_its_own_output():
    model = _model()
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(3, 400), size=30, replace=False)
    values = rng.integers(1, 51, size=30)
    a = assemble([_cell(genes, values, 12)])
    changed = genes.copy()
    changed[-5] = 399 if 399 not in genes else 398  # swap one unknown gene's identity
    b = assemble([_cell(changed, values, 12)])
    with torch.no_grad():
        ha = model(a).hidden.view(*a.genes.shape, -1)[0]
        hb = model(b).hidden.view(*b.genes.shape, -1)[0]
    real = a.token_mask[0].clone()
    pos_changed = int((a.genes[0] == int(genes[-5])).nonzero())
    diff = (ha - hb).abs().amax(-1)
    assert diff[pos_changed] > 1e-3  # the changed token's own output does change
    others = real.clone()
    others[pos_changed] = False
    assert diff[others].max() < 1e-6  # <cls>, every known token and every other unknown token: unchanged
    # and a known token's value change reaches everything
    values2 = values.copy()
    values2[3] = 1 if values[3] != 1 else 2
    c = assemble([_cell(genes, values2, 12)])
    with torch.no_grad():
        hc = model(c).hidden.view(*c.genes.shape, -1)[0]
    assert (ha - hc).abs().amax(-1)[real].min() > 1e-6


def test_known_tokens_never_see_unknown_ones():
    """Adding unknown genes to a cell leaves <cls> and the known tokens unchanged."""
    model = _model(1)
    rng = np.random.default_rng(1)
    genes = rng.choice(np.arange(3, 400), size=25, replace=False)
    values = rng.integers(1, 51, size=25)
    only_known = assemble([_cell(genes[:15], values[:15], 0)])
    with_unknown = assemble([_cell(genes, values, 10)])
    with torch.no_grad():
        h1 = model(only_known, compute_loss=False).hidden.view(*only_known.genes.shape, -1)[0, :16]
        h2 = model(with_unknown, compute_loss=False).hidden.view(*with_unknown.genes.shape, -1)[0, :16]
    torch.testing.assert_close(h1, h2, atol=1e-6, rtol=0)


def test_cell_alone_equals_cell_in_padded_batch():
    model = _model(2, objectives={"gep_loss": "ce"})
    rng = np.random.default_rng(2)
    genes, values = random_cells(rng, 6, 400, min_len=0, max_len=70)
    batch = collate_generative(genes, values, max_seq_len=64, seed=9)
    with torch.no_grad():
        full = model(batch, compute_loss=False)
    # rebuild each cell alone with exactly the same split (same rng stream: collate cell by cell)
    rng_split = np.random.default_rng(9)
    for i in range(len(genes)):
        alone = collate_generative([genes[i]], [values[i]], max_seq_len=64, seed=rng_split)
        with torch.no_grad():
            one = model(alone, compute_loss=False)
        torch.testing.assert_close(one.cell_emb[0], full.cell_emb[i], atol=1e-5, rtol=0)
        sel_full = batch.token_mask[i].reshape(-1)
        h_full = full.hidden.view(*batch.genes.shape, -1)[i][sel_full]
        h_one = one.hidden.view(*alone.genes.shape, -1)[0][alone.token_mask[0]]
        torch.testing.assert_close(h_one, h_full, atol=1e-5, rtol=0)
        g_full = batch.genes[i][sel_full]
        assert torch.equal(alone.genes[0][alone.token_mask[0]], g_full)


def test_embed_cells_ignores_the_split():
    """embed_cells sees every gene as known: two different splits of the same cells give one embedding."""
    model = _model(3)
    rng = np.random.default_rng(3)
    genes, values = random_cells(rng, 4, 400, min_len=1, max_len=50)
    e1 = model.embed_cells(collate_generative(genes, values, max_seq_len=256, seed=1))
    e2 = model.embed_cells(collate_generative(genes, values, max_seq_len=256, seed=2))
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=0)
    assert e1.shape == (4, model.cfg.d_model) and not e1.requires_grad
