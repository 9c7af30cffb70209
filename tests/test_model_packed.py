"""The packed (flash) code path, run on CPU against an emulation of flash-attn's varlen API.

flash-attn is CUDA-only, so the real kernels are tested under ``-m gpu``. Everything around
them -- packing, ``cu_seqlens``, the key gather, the (H, T) log-sum-exp layout, the exact self-key
merge and the scatter of key gradients -- is ours, and runs here: a small module with the same
``_flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward`` signatures computes each cell
with torch's fused CPU kernel, and the model's packed outputs and gradients must equal the
padded sdpa ones.
"""

from __future__ import annotations

import types

import numpy as np
import torch

import scgpt_model.attention as attention
from scgpt_model.batching import collate_generative
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from tests.fixtures.model import random_cells


def _cells(cu: torch.Tensor):
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                    causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                    return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None):
    assert dropout_p == 0.0 and not causal and q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == cu_seqlens_k[-1]
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert max_seqlen_k == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)  # (H, total_q), as flash-attn 2
    for (qa, qb), (ka, kb) in zip(_cells(cu_seqlens_q), _cells(cu_seqlens_k)):
        o, cell_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[qa:qb].transpose(0, 1)[None], k[ka:kb].transpose(0, 1)[None], v[ka:kb].transpose(0, 1)[None],
            0.0, False, scale=softmax_scale)
        out[qa:qb] = o[0].transpose(0, 1)
        lse[:, qa:qb] = cell_lse[0]
    return out, lse, torch.empty(0), torch.empty(2, dtype=torch.int64)


def _varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, deterministic, rng_state=None):
    assert softmax_lse.shape == (q.shape[1], q.shape[0]) and softmax_lse.is_contiguous()
    for (qa, qb), (ka, kb) in zip(_cells(cu_seqlens_q), _cells(cu_seqlens_k)):
        t = lambda x, a, b: x[a:b].transpose(0, 1)[None].contiguous()  # noqa: E731
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(dout, qa, qb), t(q, qa, qb), t(k, ka, kb), t(v, ka, kb), t(out, qa, qb),
            softmax_lse[:, qa:qb][None].contiguous(), 0.0, False, scale=softmax_scale)
        dq[qa:qb], dk[ka:kb], dv[ka:kb] = gq[0].transpose(0, 1), gk[0].transpose(0, 1), gv[0].transpose(0, 1)
    return torch.empty(0)


def test_packed_path_equals_padded_path(monkeypatch):
    fake = types.SimpleNamespace(_flash_attn_varlen_forward=_varlen_forward,
                                 _flash_attn_varlen_backward=_varlen_backward)
    monkeypatch.setattr(attention, "_fa", fake)
    monkeypatch.setattr(attention, "packed_supported", lambda device: True)
    rng = np.random.default_rng(0)
    genes, values = random_cells(rng, 6, 400, min_len=0, max_len=90)
    cfg = get_preset("debug", 400, objectives={"gep_loss": "ce"})
    torch.manual_seed(0)
    model = ScGPT(cfg)
    padded = collate_generative(genes, values, max_seq_len=64, seed=4, backend="sdpa")
    packed = collate_generative(genes, values, max_seq_len=64, seed=4, backend="flash")
    a, b = model(padded), model(packed)
    torch.testing.assert_close(b.cell_emb, a.cell_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.hidden, a.hidden[padded.token_mask.reshape(-1)], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.loss.total, a.loss.total, atol=1e-4, rtol=1e-6)
    ga = torch.autograd.grad(a.loss.total, list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b.loss.total, list(model.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, atol=1e-5 * max(1.0, x.abs().max().item()), rtol=1e-5)
    # embeddings through the packed all-known layout
    torch.testing.assert_close(model.embed_cells(packed), model.embed_cells(padded), atol=1e-5, rtol=0)
