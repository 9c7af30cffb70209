"""Each objective: finite, gradients reach the right parameters; DAR sign; ECS by hand; over-fitting."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from scgpt_model.batching import collate_all_genes, collate_generative, collate_perturbation
from scgpt_model.losses import LossOutput, ecs_loss
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from tests.fixtures.model import random_cells

V = 300


def _batch(n_cells=6, seed=0, **kw):
    rng = np.random.default_rng(seed)
    genes, values = random_cells(rng, n_cells, V, min_len=2, max_len=40)
    return collate_generative(genes, values, max_seq_len=64, seed=seed, **kw)


def _grads(model, loss):
    names = [n for n, p in model.named_parameters()]
    gs = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return {n: g for n, g in zip(names, gs) if g is not None and g.abs().sum() > 0}


@pytest.mark.parametrize("term,reach,not_reach", [
    ("gep", ["expr_head.fc.0.weight", "layers.0.attn.qkv.weight", "gene_encoder.embedding.weight"], ["gepc_head.W.weight"]),
    ("gepc", ["gepc_head.W.weight", "gepc_head.gene2query.weight", "layers.1.linear2.weight"], ["expr_head.fc.0.weight"]),
    ("ecs", ["layers.0.attn.qkv.weight", "value_encoder.linear1.weight"], ["expr_head.fc.0.weight", "gepc_head.W.weight"]),
    ("cls", ["cls_head.out.weight", "layers.1.attn.out.weight"], ["expr_head.fc.0.weight", "dar_head.out.weight"]),
    ("dar", ["dar_head.out.weight", "layers.0.linear1.weight"], ["cls_head.out.weight", "expr_head.fc.0.weight"]),
])
def test_each_objective_is_finite_and_reaches_its_parameters(term, reach, not_reach):
    cfg = get_preset("debug", V, n_batches=3, n_cell_types=4,
                     objectives={"ecs": True, "dar": True, "cls": True})
    torch.manual_seed(0)
    model = ScGPT(cfg)
    batch = _batch(batch_labels=[0, 1, 2, 0, 1, 2], celltype_labels=[0, 1, 2, 3, 0, 1])
    out = model(batch)
    assert set(out.loss.terms) == {"gep", "gepc", "ecs", "dar", "cls"}
    for v in out.loss.terms.values():
        assert torch.isfinite(v)
    # recompute the single term differentiably: total with only this term's weight set
    only = cfg.replace(objectives={f"{t}_weight": (1.0 if t == term else 0.0)
                                   for t in ("gep", "gepc", "ecs", "dar", "cls")})
    model.cfg = only
    out = model(batch)
    assert torch.isfinite(out.loss.total)
    g = _grads(model, out.loss.total)
    for name in reach:
        assert name in g, f"{term} should reach {name}"
    for name in not_reach:
        assert name not in g, f"{term} should not reach {name}"


def test_dar_gradient_into_encoder_is_reversed():
    cfg = get_preset("debug", V, n_batches=2, objectives={"dar": True, "gep": False, "gepc": False, "dar_lambda": 1.0})
    torch.manual_seed(1)
    model = ScGPT(cfg)
    batch = _batch(n_cells=4, batch_labels=[0, 1, 0, 1])
    enc = [p for n, p in model.named_parameters() if n.startswith("layers.")]
    disc = [p for n, p in model.named_parameters() if n.startswith("dar_head.")]
    out = model(batch)
    g_rev = torch.autograd.grad(out.loss.total, enc + disc)
    model.dar_head.reverse_grad = False
    out = model(batch)
    g_plain = torch.autograd.grad(out.loss.total, enc + disc)
    for a, b in zip(g_rev[: len(enc)], g_plain[: len(enc)]):  # encoder: opposite sign
        torch.testing.assert_close(a, -b, atol=1e-7, rtol=1e-5)
    assert sum(a.abs().sum() for a in g_rev[: len(enc)]) > 0
    for a, b in zip(g_rev[len(enc):], g_plain[len(enc):]):  # discriminator: same sign (it learns batches)
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    # the discriminator descends on the classification loss while the encoder ascends on it
    x = out.cell_emb.detach().requires_grad_()
    model.dar_head.reverse_grad = True
    loss = torch.nn.functional.cross_entropy(model.dar_head(x), batch.batch_labels)
    (gx,) = torch.autograd.grad(loss, x)
    model.dar_head.reverse_grad = False
    loss = torch.nn.functional.cross_entropy(model.dar_head(x), batch.batch_labels)
    (gx_plain,) = torch.autograd.grad(loss, x)
    assert torch.all(torch.sign(gx[gx_plain != 0]) == -torch.sign(gx_plain[gx_plain != 0]))


def test_ecs_matches_eq12_on_three_cells():
    # h1 = (1, 0), h2 = (0, 1), h3 = (1, 1): cos12 = 0, cos13 = cos23 = 1/sqrt(2)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    beta = 0.6
    c = 1 / math.sqrt(2)
    pairs = [0.0, c, 0.0, c, c, c]  # ordered pairs (1,2),(1,3),(2,1),(2,3),(3,1),(3,2)
    expected = sum(-((s - beta) ** 2) for s in pairs) / 6  # = -(2*0.36 + 4*(0.1071)^2) / 6
    assert abs(expected - (-(2 * 0.36 + 4 * (c - 0.6) ** 2) / 6)) < 1e-12
    assert ecs_loss(h, beta, "paper").item() == pytest.approx(expected, abs=1e-6)
    # the reference form: mean over the 3x3 matrix (diagonal zeroed) of 1 - (relu(cos) - beta)^2
    mat = [0.0, 0.0, c, 0.0, 0.0, c, c, c, 0.0]
    ref = sum(1 - (s - beta) ** 2 for s in mat) / 9
    assert ecs_loss(h, beta, "reference").item() == pytest.approx(ref, abs=1e-6)


def test_cross_entropy_head_zero_prob_dsbn_batch_and_modality_tokens():
    cfg = get_preset("debug", V, n_batches=2, use_batch_labels=True, dsbn=True, dsbn_affine=True,
                     n_modalities=2, explicit_zero_prob=True, objectives={"gep_loss": "ce"})
    torch.manual_seed(2)
    model = ScGPT(cfg)
    rng = np.random.default_rng(2)
    gene_ids = np.arange(3, 43)
    bins = rng.integers(0, 51, size=(5, 40))
    bins[:, :10] = 0  # zeros included (HVG fine-tuning)
    modality = (np.arange(40) >= 30).astype(np.int64)  # last 10 features: a second modality
    batch = collate_all_genes(gene_ids, bins, seed=0, mask_ratio=0.4, batch_labels=[0, 1, 1, 0, 1],
                              modality=modality)
    out = model(batch)
    assert set(out.loss.terms) == {"gep", "gep_zero", "gepc", "gepc_zero"}
    assert out.expr_logits.shape == (batch.genes.numel(), cfg.n_bins)
    g = _grads(model, out.loss.total)
    for name in ("batch_encoder.embedding.weight", "modality_encoder.embedding.weight", "dsbn.bns.0.weight",
                 "dsbn.bns.1.weight", "expr_head.zero_logit.0.weight", "gepc_head.W_zero_logit.weight"):
        assert name in g, name
    assert all(torch.isfinite(v) for v in out.loss.terms.values())


def test_perturbation_condition_tokens_and_loss_on_all_genes():
    cfg = get_preset("debug", V, n_conditions=2)
    torch.manual_seed(3)
    model = ScGPT(cfg)
    rng = np.random.default_rng(3)
    genes = np.arange(3, 33)
    ctrl = rng.integers(0, 51, size=(3, 30))
    pert = ctrl.copy()
    pert[:, 5] = 0  # the knocked-down gene goes to zero
    flags = np.zeros((3, 30), dtype=np.int64)
    flags[:, 5] = 1
    batch = collate_perturbation(genes, ctrl, pert, flags)
    assert batch.loss_mask.sum() == 3 * 30 and not batch.unknown.any()
    out = model(batch)
    assert torch.isfinite(out.loss.total)
    g = _grads(model, out.loss.total)
    assert "condition_encoder.weight" in g
    flags2 = flags.copy()
    flags2[:, 5], flags2[:, 6] = 0, 1
    with torch.no_grad():
        a = model.eval()(batch, compute_loss=False).hidden
        b = model(collate_perturbation(genes, ctrl, pert, flags2), compute_loss=False).hidden
    assert (a - b).abs().max() > 1e-2  # the condition changes the token states


def test_loss_output_checks_itself():
    with pytest.raises(ValueError, match="scalar"):
        LossOutput(total=torch.ones(2))
    with pytest.raises(ValueError, match="detached"):
        LossOutput(total=torch.tensor(1.0), terms={"a": torch.tensor(1.0, requires_grad=True)})
    lo = LossOutput.from_terms({"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(3.0)},
                               {"a": 0.5, "b": 2.0})
    assert lo.to_floats() == {"total": 7.0, "a": 2.0, "b": 3.0}


def test_missing_labels_give_a_clear_error():
    model = ScGPT(get_preset("debug", V, n_cell_types=3, objectives={"cls": True}))
    with pytest.raises(ValueError, match="celltype_labels"):
        model(_batch())


def test_overfit_tiny_real_batch(pbmc_cells):
    """GEP loss on a fixed batch of 8 real PBMC cells drops >= 10x within a few hundred CPU steps."""
    genes, values = pbmc_cells["genes"][:8], pbmc_cells["values"][:8]
    present = np.unique(np.concatenate(genes))  # compact vocabulary: the genes these cells express
    genes = [np.searchsorted(present, g) + 3 for g in genes]
    cfg = get_preset("debug", len(present) + 3, max_seq_len=48, objectives={"gepc": False})
    torch.manual_seed(0)
    model = ScGPT(cfg)
    batch = collate_generative(genes, values, max_seq_len=48, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threading only adds synchronisation
    try:
        for _ in range(200):
            out = model(batch)
            loss = out.loss.terms["gep"].item()
            first = loss if first is None else first
            opt.zero_grad()
            out.loss.total.backward()
            opt.step()
        final = model(batch).loss.terms["gep"].item()
    finally:
        torch.set_num_threads(threads)
    assert final * 10 <= first, (first, final)


def test_avg_pool_cell_embedding_is_the_mean_real_gene_state():
    """cell_emb_style "avg-pool": the mean final state of each cell's genes, <cls> and padding left out;
    it feeds the CLS head, and embed_cells(style=...) switches between the two on one model."""
    torch.manual_seed(0)
    cfg = get_preset("debug", vocab_size=64).replace(cell_emb_style="avg-pool", n_cell_types=3,
                                                     objectives=dict(gep=False, gepc=False, cls=True), dropout=0.0)
    model = ScGPT(cfg).eval()
    genes = [np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12, 13])]  # lengths differ: the first cell is padded
    vals = [np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])]
    batch = collate_all_genes(genes, vals, seed=0, mask_ratio=0.0, backend="sdpa",
                              celltype_labels=np.array([0, 2]))
    h, cell, _ = model.encode(batch)
    states = h.view(2, batch.genes.shape[1], -1)
    assert torch.allclose(cell[0], states[0, 1:4].mean(0), atol=1e-6)
    assert torch.allclose(cell[1], states[1, 1:7].mean(0), atol=1e-6)
    assert not torch.allclose(cell, states[:, 0])
    out = model(batch)
    assert torch.allclose(out.cls_logits, model.cls_head(cell)) and torch.isfinite(out.loss.total)
    assert torch.allclose(model.embed_cells(batch, style="cls"), states[:, 0], atol=1e-6)
    assert torch.allclose(model.embed_cells(batch), cell, atol=1e-6)
    with pytest.raises(ValueError, match="cell_emb_style"):
        cfg.replace(cell_emb_style="max")


def test_depth_input_and_depth_discriminator():
    """depth_input feeds log expressed genes (counted before sub-sampling) to the GEP / GEPC decoders;
    depth_adv adds a discriminator of each cell's depth quartile behind gradient reversal, on <cls> and on
    the mean gene state, that the fine-tunes switch off."""
    from scgpt_model.model import _depth_quartile

    assert _depth_quartile(torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0])).tolist() == \
        [2, 0, 3, 1, 2, 0, 3, 1]
    rng = np.random.default_rng(0)
    genes, values = random_cells(rng, 6, V, min_len=30, max_len=40)
    b = collate_generative(genes, values, max_seq_len=16, seed=0)
    assert b.n_expressed.tolist() == [float((v > 0).sum()) for v in values]  # the whole cell, not the 16 kept
    cfg = get_preset("debug", V, depth_input=True, objectives={"depth_adv": True, "depth_adv_weight": 2.0})
    torch.manual_seed(0)
    model = ScGPT(cfg)
    out = model(b)
    assert set(out.loss.terms) == {"gep", "gepc", "depth_adv"} and out.depth_logits.shape == (12, 4)
    assert out.loss.weights["depth_adv"] == 2.0
    shallow = dataclasses.replace(b, n_expressed=b.n_expressed / 8)
    model.eval()
    assert not torch.allclose(model(b).expr_pred, model(shallow).expr_pred)  # the decoders read the depth
    assert not torch.allclose(model(b).gepc_pred, model(shallow).gepc_pred)
    torch.testing.assert_close(model(b).cell_emb, model(shallow).cell_emb)  # the trunk does not
    # gradient reversal: the discriminator descends on its loss, the trunk ascends on it
    model.train()
    only = cfg.replace(objectives={"gep_weight": 0.0, "gepc_weight": 0.0})
    model.cfg = only
    trunk = [p for n, p in model.named_parameters() if n.startswith("layers.")]
    g_rev = torch.autograd.grad(model(b).loss.total, trunk)
    model.depth_head.reverse_grad = False
    g_plain = torch.autograd.grad(model(b).loss.total, trunk)
    assert sum(a.abs().sum() for a in g_rev) > 0
    for a, p in zip(g_rev, g_plain):  # debug preset: dropout 0, so the two passes are the same function
        torch.testing.assert_close(a, -p, atol=1e-7, rtol=1e-5)
    from eval.finetune import task_config
    from eval.perturbation import task_config as perturbation_config
    for ft in (task_config(cfg, "annotation", n_classes=3), task_config(cfg, "integration", n_batches=2)):
        assert not ft.objectives.depth_adv and ft.depth_input
    pert = perturbation_config(cfg)  # predicts another cell than its input: no depth input there
    assert not pert.objectives.depth_adv and not pert.depth_input
    # a batch built without a count sees only its known, unmasked values: never a target
    b2 = collate_perturbation(np.arange(10, 16), np.array([[0, 3, 0, 7, 1, 0]], dtype=np.float32),
                              np.array([[9, 9, 9, 9, 9, 9]], dtype=np.float32), np.array([[0, 1, 0, 0, 0, 0]]))
    assert b2.n_expressed.tolist() == [3.0]
