"""Generative attention equals the dense-mask reference (forward and gradients, float32 <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgpt_model.attention import AttentionMeta, _math_attention, flash_available, generative_attention
from scgpt_model.batching import collate_generative
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from tests.fixtures.model import dense_mask_attention, random_cells

TOL = 1e-5


def _random_layout(rng: np.random.Generator, b: int, n_known: int, n_unknown: int) -> AttentionMeta:
    """Random known-block padding (<cls> column always valid) and random unknown-block padding."""
    valid = rng.random((b, n_known)) < rng.uniform(0.3, 1.0)
    valid[:, 0] = True
    unknown = np.zeros((b, n_known + n_unknown), dtype=bool)
    unknown[:, n_known:] = rng.random((b, n_unknown)) < rng.uniform(0.3, 1.0)
    bias = torch.zeros(b, 1, 1, n_known).masked_fill(~torch.from_numpy(valid)[:, None, None, :], float("-inf"))
    return AttentionMeta(backend="sdpa", self_mask=torch.from_numpy(unknown)[:, None, :], n_known=n_known,
                         key_bias=bias, any_unknown=bool(unknown.any()))


@pytest.mark.parametrize("seed", range(8))
def test_sdpa_matches_dense_mask_forward_and_gradients(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    b, h, d = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.choice([8, 16, 32]))
    total = int(rng.integers(4, 90))
    ratio = float(rng.choice([0.25, 0.5, 0.75]))
    n_unknown = int(round(ratio * total))
    n_known = total - n_unknown
    if n_known < 1:
        n_known, n_unknown = 1, total - 1
    meta = _random_layout(rng, b, n_known, n_unknown)
    q, k, v = (torch.randn(b, h, total, d, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(b, h, total, d)
    out = generative_attention(q, k, v, meta)
    ref = dense_mask_attention(q, k, v, meta)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    g = torch.autograd.grad(out, (q, k, v), grad_out)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, atol=TOL, rtol=0)


def test_all_known_layout_and_math_fallback_match():
    rng = np.random.default_rng(0)
    meta = _random_layout(rng, 3, 12, 0)
    meta.any_unknown = False
    q, k, v = (torch.randn(3, 2, 12, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = generative_attention(q, k, v, meta)
    ref = dense_mask_attention(q, k, v, meta)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=0)
    meta2 = _random_layout(rng, 2, 9, 7)
    q2, k2, v2 = (torch.randn(2, 2, 16, 8) for _ in range(3))
    torch.testing.assert_close(_math_attention(q2, k2, v2, meta2, 8 ** -0.5),
                               dense_mask_attention(q2, k2, v2, meta2), atol=TOL, rtol=0)


def test_whole_model_matches_dense_mask_model(dense_attention, monkeypatch):
    """Whole debug model, real collate layout: loss and every parameter gradient equal the dense model's."""
    import scgpt_model.layers as layers

    rng = np.random.default_rng(3)
    cfg = get_preset("debug", 300)
    genes, values = random_cells(rng, 5, 300, min_len=0, max_len=60)
    batch = collate_generative(genes, values, max_seq_len=cfg.max_seq_len, seed=1)
    torch.manual_seed(0)
    model = ScGPT(cfg)
    out_dense = model(batch)  # dense reference is patched in by the fixture
    g_dense = torch.autograd.grad(out_dense.loss.total, list(model.parameters()), allow_unused=True)
    monkeypatch.setattr(layers, "generative_attention", generative_attention)
    out = model(batch)
    g = torch.autograd.grad(out.loss.total, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.cell_emb, out_dense.cell_emb, atol=TOL, rtol=0)
    torch.testing.assert_close(out.loss.total, out_dense.loss.total, atol=1e-4, rtol=1e-6)
    for a, r in zip(g, g_dense):
        if r is None:
            assert a is None
            continue
        torch.testing.assert_close(a, r, atol=TOL * max(1.0, r.abs().max().item()), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(4))
def test_cuda_sdpa_matches_dense_mask(seed):
    rng = np.random.default_rng(seed)
    meta = _random_layout(rng, 3, 40, 33)
    q, k, v = (torch.randn(3, 4, 73, 64, requires_grad=True) for _ in range(3))
    ref = dense_mask_attention(q, k, v, meta)
    g_ref = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    meta.key_bias, meta.self_mask = meta.key_bias.cuda(), meta.self_mask.cuda()
    out = generative_attention(qc, kc, vc, meta)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=0)
    g = torch.autograd.grad(out, (qc, kc, vc), torch.ones_like(out))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.cpu(), r, atol=5e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs flash-attn and CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_packed_matches_sdpa_padded(dtype):
    """Same cells through the packed flash layout and the padded sdpa layout: same model outputs."""
    rng = np.random.default_rng(0)
    cfg = get_preset("debug", 500, d_model=64, n_heads=2)
    genes, values = random_cells(rng, 6, 500, min_len=0, max_len=200)
    torch.manual_seed(0)
    model = ScGPT(cfg).cuda().to(dtype)
    padded = collate_generative(genes, values, max_seq_len=256, seed=5, backend="sdpa").to("cuda")
    packed = collate_generative(genes, values, max_seq_len=256, seed=5, backend="flash").to("cuda")
    a, b = model(padded), model(packed)
    torch.testing.assert_close(a.cell_emb.float(), b.cell_emb.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(a.loss.total.float(), b.loss.total.float(), atol=0.5, rtol=2e-2)
    ga = torch.autograd.grad(a.loss.total, list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b.loss.total, list(model.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):
        if x is not None:
            torch.testing.assert_close(x.float(), y.float(), atol=5e-2 * (1 + x.abs().max().item()), rtol=5e-2)


def test_bfloat16_on_cpu_within_dtype_tolerance():
    rng = np.random.default_rng(11)
    meta = _random_layout(rng, 3, 20, 17)
    q, k, v = (torch.randn(3, 2, 37, 16, requires_grad=True) for _ in range(3))
    ref = dense_mask_attention(q, k, v, meta)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = generative_attention(qb, kb, vb, meta)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)
    g = torch.autograd.grad(out.float().sum(), (qb, kb, vb))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.float(), r, atol=8e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs flash-attn and CUDA")
@pytest.mark.parametrize("seed", range(4))
def test_flash_varlen_matches_dense_mask(seed):
    """Packed cells (cu_seqlens, no padding) through flash-attn equal the dense-mask reference."""
    rng = np.random.default_rng(seed)
    b, h, d = 4, 4, 64
    n_kn = rng.integers(1, 60, size=b)  # incl. <cls>
    n_un = rng.integers(0, 60, size=b)
    lk, length = int(n_kn.max()), int((n_kn + n_un).max())
    valid = np.zeros((b, lk), dtype=bool)
    unknown = np.zeros((b, length), dtype=bool)
    real = np.zeros((b, length), dtype=bool)
    for i in range(b):
        valid[i, : n_kn[i]] = True
        unknown[i, n_kn[i]: n_kn[i] + n_un[i]] = True
        real[i, : n_kn[i] + n_un[i]] = True
    bias = torch.zeros(b, 1, 1, lk).masked_fill(~torch.from_numpy(valid)[:, None, None, :], float("-inf"))
    meta = AttentionMeta(backend="sdpa", self_mask=torch.from_numpy(unknown)[:, None, :], n_known=lk, key_bias=bias)
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    ref = dense_mask_attention(q, k, v, meta)
    g_ref = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    sel = torch.from_numpy(real)
    pack = lambda t: t.transpose(1, 2)[sel].detach().cuda().bfloat16().requires_grad_()  # noqa: E731  (T, H, D)
    qp, kp, vp = pack(q), pack(k), pack(v)
    lens = n_kn + n_un
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(n_kn)]), dtype=torch.int32, device="cuda")
    known_index = torch.tensor(np.concatenate([np.arange(s, s + n) for s, n in zip(cu_q[:-1].tolist(), n_kn)]),
                               device="cuda")
    pmeta = AttentionMeta(backend="flash", self_mask=torch.from_numpy(unknown[real]).cuda(), known_index=known_index,
                          cu_q=cu_q, cu_k=cu_k, max_q=int(lens.max()), max_k=int(n_kn.max()),
                          any_unknown=bool(n_un.sum()))
    out = generative_attention(qp, kp, vp, pmeta)
    torch.testing.assert_close(out.float().cpu(), ref.transpose(1, 2)[sel], atol=3e-2, rtol=0)
    g = torch.autograd.grad(out, (qp, kp, vp), torch.ones_like(out))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.float().cpu(), r.transpose(1, 2)[sel], atol=6e-2, rtol=0)
