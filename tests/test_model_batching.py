"""Batching: seeded known/unknown split, sub-sampling (never truncation), padding and packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgpt_model.batching import collate_all_genes, collate_generative
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from scgpt_model.schema import CLS_ID, PAD_ID
from tests.fixtures.model import random_cells


def test_split_ratios_seeded_and_layout():
    rng = np.random.default_rng(0)
    genes, values = random_cells(rng, 40, 500, min_len=8, max_len=60)
    a = collate_generative(genes, values, max_seq_len=100, seed=7)
    b = collate_generative(genes, values, max_seq_len=100, seed=7)
    c = collate_generative(genes, values, max_seq_len=100, seed=8)
    assert torch.equal(a.genes, b.genes) and torch.equal(a.unknown, b.unknown)
    assert not torch.equal(a.unknown, c.unknown)
    ratios = set()
    for i, g in enumerate(genes):
        n_unk = int(a.unknown[i].sum())
        ratio = n_unk / len(g)
        ratios.add(min((0.25, 0.5, 0.75), key=lambda r: abs(r - ratio)))
        assert any(n_unk == int(round(r * len(g))) for r in (0.25, 0.5, 0.75))
        # row layout: [<cls>, known..., unknown..., <pad>...]; keys = the cell's <cls> + known genes
        n = len(g) + 1
        n_kn = n - n_unk
        row = a.genes[i]
        assert row[0] == CLS_ID and a.token_mask[i, :n].all() and not a.token_mask[i, n:].any()
        assert sorted(row[1:n].tolist()) == sorted(g.tolist())
        assert not a.unknown[i, :n_kn].any() and a.unknown[i, n_kn:n].all() and not a.unknown[i, n:].any()
        assert a.known_valid[i].sum() == n_kn and a.known_valid[i, :n_kn].all()
        assert torch.equal(a.loss_mask[i], a.unknown[i])
        assert (a.genes[i][~a.token_mask[i]] == PAD_ID).all()
    assert ratios == {0.25, 0.5, 0.75}
    assert a.n_known % 8 == 0 and a.genes.shape[1] == max(max(len(g) for g in genes) + 1, a.n_known)
    assert a.n_tokens == sum(len(g) + 1 for g in genes) == int(a.token_mask.sum())
    assert 0 <= a.padding_fraction < 1


def test_long_cells_are_subsampled_not_truncated():
    genes = [np.arange(3, 1003)]  # 1,000 genes in ascending id order
    values = [np.arange(1000, dtype=np.float32) % 50 + 1]
    kept = []
    for seed in range(3):
        b = collate_generative(genes, values, max_seq_len=100, seed=seed)
        g = b.genes[0][b.token_mask[0]][1:]
        assert len(g) == 100
        kept.append(set(g.tolist()))
        assert max(g.tolist()) > 200  # a positional cut would keep ids 3..102 only
        # values stay aligned with their genes
        v = b.targets[0][b.token_mask[0]][1:]
        assert torch.equal(v, (g - 3).float() % 50 + 1)
    assert kept[0] != kept[1]
    again = collate_generative(genes, values, max_seq_len=100, seed=0)
    assert set(again.genes[0][again.token_mask[0]][1:].tolist()) == kept[0]


def test_cells_without_genes_or_known_genes_do_not_crash():
    """Reference bug #200: a cell with no known genes crashed. Here it trains and embeds."""
    model = ScGPT(get_preset("debug", 100))
    genes = [np.zeros(0, dtype=np.int64), np.array([5]), np.array([7, 9])]
    values = [np.zeros(0, dtype=np.float32), np.array([3.0]), np.array([4.0, 8.0])]
    b = collate_generative(genes, values, max_seq_len=10, seed=0, unknown_ratios=(1.0,))
    assert b.unknown.sum() == 3  # every gene unknown: only <cls> is known
    out = model(b)
    assert torch.isfinite(out.loss.total)
    out.loss.total.backward()
    assert torch.isfinite(model.embed_cells(b)).all()
    only_empty = collate_generative([genes[0]], [values[0]], max_seq_len=10, seed=0)
    out = model(only_empty)
    assert torch.isfinite(out.loss.total) and out.loss.terms["gep"] == 0


def test_packed_layout_metadata():
    rng = np.random.default_rng(1)
    genes, values = random_cells(rng, 5, 300, min_len=0, max_len=30)
    p = collate_generative(genes, values, max_seq_len=64, seed=3, backend="flash")
    s = collate_generative(genes, values, max_seq_len=64, seed=3, backend="sdpa")
    assert p.layout == "packed" and p.padding_fraction == 0.0
    lens = [len(g) + 1 for g in genes]
    assert p.cu_q.tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist() and p.cu_q.dtype == torch.int32
    assert p.max_q == max(lens) and p.n_tokens == sum(lens) == p.genes.numel()
    n_kn = [int(s.known_valid[i].sum()) for i in range(5)]
    assert p.cu_k.tolist() == np.concatenate([[0], np.cumsum(n_kn)]).tolist() and p.max_k == max(n_kn)
    assert (p.genes[p.cu_q[:-1].long()] == CLS_ID).all()
    # same tokens in the same order as the padded layout
    assert torch.equal(p.genes, s.genes[s.token_mask]) and torch.equal(p.unknown, s.unknown[s.token_mask])
    assert torch.equal(p.genes[p.known_index], s.genes[:, :s.n_known][s.known_valid])
    tc = p.token_cell()
    assert tc.tolist() == np.repeat(np.arange(5), lens).tolist()
    with pytest.raises(ValueError, match="flash"):
        ScGPT(get_preset("debug", 300))(p)  # no CUDA here: a clear message


def test_all_genes_mode_with_zeros():
    rng = np.random.default_rng(2)
    gene_ids = np.arange(3, 103)
    bins = rng.integers(0, 51, size=(4, 100))
    bins[:, ::3] = 0
    mlm = collate_all_genes(gene_ids, bins, seed=0, mask_ratio=0.4)
    assert mlm.n_tokens == 4 * 101 and not mlm.unknown.any()
    assert (mlm.masked.sum(1) == 40).all() and torch.equal(mlm.loss_mask, mlm.masked)
    gen = collate_all_genes(gene_ids, bins, seed=0, mask_ratio=0.4, mode="generative")
    assert (gen.unknown.sum(1) == 40).all()
    sub = collate_all_genes(gene_ids, bins, seed=0, mask_ratio=0.0, max_seq_len=50)
    assert (sub.token_mask.sum(1) == 51).all() and not sub.loss_mask.any()
    with pytest.raises(ValueError, match="mask_ratio"):
        collate_all_genes(gene_ids, bins, seed=0, mask_ratio=1.5)
    model = ScGPT(get_preset("debug", 103))
    assert torch.isfinite(model(mlm).loss.total)
    # masked values really are hidden: changing a masked gene's true value changes no output
    bins2 = bins.copy()
    i = int(np.flatnonzero(mlm.masked[0, 1:].numpy())[0])
    bins2[0, i] = (bins[0, i] + 7) % 51
    mlm2 = collate_all_genes(gene_ids, bins2, seed=0, mask_ratio=0.4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(mlm, compute_loss=False).hidden, model(mlm2, compute_loss=False).hidden)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="same cells"):
        collate_generative([np.array([3])], [], max_seq_len=5, seed=0)
    with pytest.raises(ValueError, match="unknown_ratios"):
        collate_generative([np.array([3])], [np.array([1.0])], max_seq_len=5, seed=0, unknown_ratios=(2.0,))
    with pytest.raises(ValueError, match="one label per cell"):
        collate_generative([np.array([3])], [np.array([1.0])], max_seq_len=5, seed=0, batch_labels=[0, 1])
    with pytest.raises(ValueError, match="backend"):
        collate_generative([np.array([3])], [np.array([1.0])], max_seq_len=5, seed=0, backend="xformers")


def test_non_finite_or_negative_values_are_refused():
    with pytest.raises(ValueError, match="bin the data first"):
        collate_generative([np.array([3, 4])], [np.array([1.0, np.nan])], max_seq_len=5, seed=0)
    with pytest.raises(ValueError, match="bin the data first"):
        collate_all_genes(np.arange(3, 5), np.array([[1.0, -3.0]]), seed=0)
