"""Generative attention (§4.3.2), exact, without a (P+G)x(P+G) mask.

Token layout per cell: ``[<cls>, known genes..., unknown genes...]``. Known tokens attend to
``<cls>`` and the known tokens; unknown tokens attend to ``<cls>``, the known tokens and
themselves. So every query (known or unknown) attends over the same key set, the cell's known
block, and unknown queries add exactly one more key: their own. We compute

    o1, lse1 = fused_attention(q_all, k_known, v_known)         # O((P+G) * P), returns the lse
    s_self   = <q_u, k_u> * scale        (unknown tokens only; -inf for known ones)
    lse      = logaddexp(lse1, s_self)
    o        = exp(lse1 - lse) * o1 + exp(s_self - lse) * v_u     # the softmax over the union

which is the exact softmax over {known keys} U {self}. Backward (the ring-attention trick): call
the fused kernel's backward with the MERGED output and MERGED lse -- its probabilities
exp(s - lse) are then the union-softmax probabilities and its ``D = rowsum(dO * O)`` is the
union's -- and add the elementwise gradient of the self key/value.

Backends: ``sdpa`` (padded (B, H, L, Dh); CPU: ``_scaled_dot_product_flash_attention_for_cpu``
with an additive key-padding bias; CUDA: the memory-efficient kernel with an attention bias) and
``flash`` (flash-attn varlen over packed cells with ``cu_seqlens``; CUDA only). A math fallback
(explicit scores, still O(L * P) not O(L^2)) serves other devices and dtypes.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:  # optional GPU dependency
    from flash_attn import flash_attn_interface as _fa  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - absent on CPU machines
    _fa = None

NEG_INF = float("-inf")


def flash_available() -> bool:
    return _fa is not None and torch.cuda.is_available()


def packed_supported(device: torch.device) -> bool:
    """Whether a packed (flash) batch can run on ``device``: flash-attn kernels are CUDA-only."""
    return _fa is not None and device.type == "cuda"


@dataclass
class AttentionMeta:
    """Per-forward attention layout, built once per batch (no host sync per layer).

    sdpa: ``n_known`` = width Lk of the known block (columns [0, Lk) of the padded sequence);
    ``key_bias`` (B, 1, 1, Lk) additive 0 / -inf for padded keys; ``self_mask`` (B, 1, L) True
    where a token is an unknown gene (its own key joins the softmax).
    flash: ``known_index`` (Tk,) rows of the packed tokens that are keys; ``cu_q``/``cu_k``
    (B+1,) int32 offsets; ``max_q``/``max_k`` python ints (computed in the collate);
    ``self_mask`` (T,) bool.
    """

    backend: str
    self_mask: Tensor
    n_known: int = 0
    key_bias: Tensor | None = None
    known_index: Tensor | None = None
    cu_q: Tensor | None = None
    cu_k: Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    any_unknown: bool = True  # False: skip the self merge entirely (all-known layouts)


# ----------------------------------------------------------------------------------------------
# fused kernels that return the log-sum-exp, per device
# ----------------------------------------------------------------------------------------------
def _fused_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor, Any]:
    """(B,H,Lq,D) x (B,H,Lk,D) -> out (B,H,Lq,D), lse (B,H,Lq) float32-or-dtype, ctx for backward."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse, None
    if q.device.type == "cuda":
        # the mem-efficient kernel wants the bias rows 8-aligned: pad the keys with -inf columns
        pad = (-k.shape[2]) % 8
        if pad:
            k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
            bias = torch.nn.functional.pad(bias, (0, pad), value=NEG_INF)
        b = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, b, True, 0.0, False, scale=scale)
        # the efficient kernel pads lse's query dim up to a multiple of 32
        return out, lse[..., : q.shape[2]], (seed, offset, lse.shape[-1], pad)
    raise NotImplementedError  # math fallback handles other devices


def _fused_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor, lse: Tensor,
               scale: float, ctx: Any) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    seed, offset, lse_len, pad = ctx
    n = k.shape[2]
    if pad:
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
        bias = torch.nn.functional.pad(bias, (0, pad), value=NEG_INF)
    b = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    lse_p = lse.new_zeros(*lse.shape[:-1], lse_len)
    lse_p[..., : lse.shape[-1]] = lse
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, b, out, lse_p, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
    return dq, dk[:, :, :n], dv[:, :, :n]


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype of the merge: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum(x * y, -1) as a batched matmul: no full-size temporary. (..., L, D) -> (..., L)."""
    return torch.matmul(x.unsqueeze(-2), y.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _merge_self(o1: Tensor, lse1: Tensor, q: Tensor, k: Tensor, v: Tensor, self_mask: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Merge each query's own key/value into (o1, lse1). Shapes: o1/q/k/v (..., L, D), lse1 (..., L).

    Returns the merged output (q's dtype), the merged lse and the self-key probability ws
    (accumulation dtype). ``o1`` is consumed (scaled in place)."""
    acc = _acc(q)
    s_self = _rowdot(q.to(acc), k.to(acc)) * scale  # (..., L)
    s_self = s_self.masked_fill(~self_mask, NEG_INF)
    lse1 = lse1.to(acc)
    lse = torch.logaddexp(lse1, s_self)
    w1 = torch.exp(lse1 - lse)  # weight of the known-key part
    ws = torch.exp(s_self - lse)  # probability of the self key (0 for known tokens)
    out = o1.to(acc).mul_(w1.unsqueeze(-1)).addcmul_(ws.unsqueeze(-1), v.to(acc))
    return out.to(q.dtype), lse, ws


def _self_grads(dout: Tensor, out: Tensor, q: Tensor, k: Tensor, v: Tensor, ws: Tensor, scale: float,
                dq_kernel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Add the self term's gradients: dS = P_s * (dO.v - dO.O); dq += dS k, dk = dS q, dv = P_s dO.

    Returns full-length (dq, dk, dv) in the accumulation dtype; the caller adds the known-key
    gradients of the fused kernel into dk/dv. ``dq_kernel`` is updated in place."""
    acc = _acc(q)
    dof = dout.to(acc)
    d_row = _rowdot(dof, out.to(acc))  # D = rowsum(dO * O) of the union softmax
    ds = (ws * (_rowdot(dof, v.to(acc)) - d_row) * scale).unsqueeze(-1)  # (..., L, 1)
    dq = dq_kernel.to(acc).addcmul_(ds, k.to(acc))
    dk = ds * q.to(acc)
    dv = ws.unsqueeze(-1) * dof
    return dq, dk, dv


class _PaddedGenerativeAttention(torch.autograd.Function):
    """sdpa backend. q, k, v: (B, H, L, D); keys/values are columns [0, n_known)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, self_mask: Tensor, n_known: int,
                scale: float, any_unknown: bool) -> Tensor:
        kk, vk = k[:, :, :n_known], v[:, :, :n_known]
        o1, lse1, kctx = _fused_fwd(q, kk, vk, bias, scale)
        if any_unknown:
            out, lse, ws = _merge_self(o1, lse1, q, k, v, self_mask, scale)
        else:
            out, lse, ws = o1, lse1, None
        ctx.save_for_backward(q, k, v, bias, out, lse, *([] if ws is None else [ws]))
        ctx.n_known, ctx.scale, ctx.kctx, ctx.any_unknown = n_known, scale, kctx, any_unknown
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, bias, out, lse, *rest = ctx.saved_tensors
        n = ctx.n_known
        if q.device.type != "cpu":
            dout = dout.contiguous()  # the CPU kernel takes strided (B, L, H, D)-ordered tensors as they are
        # the kernels take the lse in the dtype they returned it (float32, or float64 for float64 inputs)
        lse_k = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        dq, dkk, dvk = _fused_bwd(dout, q, k[:, :, :n], v[:, :, :n], bias, out, lse_k, ctx.scale, ctx.kctx)
        if not ctx.any_unknown:
            dk = torch.zeros_like(k)
            dv = torch.zeros_like(v)
            dk[:, :, :n] = dkk
            dv[:, :, :n] = dvk
            return dq, dk, dv, None, None, None, None, None
        (ws,) = rest
        dq, dk, dv = _self_grads(dout, out, q, k, v, ws, ctx.scale, dq)
        dk[:, :, :n] += dkk.to(dk.dtype)
        dv[:, :, :n] += dvk.to(dv.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _math_attention(q: Tensor, k: Tensor, v: Tensor, meta: AttentionMeta, scale: float) -> Tensor:
    """Fallback with autograd: scores over the known block only (B,H,L,Lk) + the self score."""
    n = meta.n_known
    s = torch.matmul(q.float(), k[:, :, :n].float().transpose(-1, -2)) * scale + meta.key_bias.float()
    s_self = ((q.float() * k.float()).sum(-1) * scale).masked_fill(~meta.self_mask, NEG_INF)
    s_all = torch.cat([s, s_self.unsqueeze(-1)], dim=-1)  # (B, H, L, Lk + 1)
    p = torch.softmax(s_all, dim=-1)
    out = torch.matmul(p[..., :n], v[:, :, :n].float()) + p[..., n:] * v.float()
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# flash-attn varlen backend (CUDA, packed cells)
# ----------------------------------------------------------------------------------------------
def _call_with_supported(fn, **kwargs):
    """flash-attn's private signatures change between releases: pass what this version takes."""
    params = inspect.signature(fn).parameters
    if "window_size" in params and "window_size_left" in kwargs:
        kwargs["window_size"] = (kwargs.pop("window_size_left"), kwargs.pop("window_size_right"))
    return fn(**{k: v for k, v in kwargs.items() if k in params})


class _PackedGenerativeAttention(torch.autograd.Function):
    """flash backend. q, k, v: (T, H, D) packed tokens; keys are rows ``known_index``."""

    @staticmethod
    def forward(ctx, q, k, v, known_index, self_mask, cu_q, cu_k, max_q, max_k, scale, any_unknown):
        kk = k.index_select(0, known_index)
        vk = v.index_select(0, known_index)
        res = _call_with_supported(
            _fa._flash_attn_varlen_forward, q=q, k=kk, v=vk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale, causal=False,
            window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
            return_softmax=False, block_table=None)
        o1, lse1 = res[0], res[1]  # lse1: (H, T) in flash-attn >= 2.x varlen
        lse1 = lse1.transpose(0, 1)  # (T, H)
        if any_unknown:
            out, lse, ws = _merge_self(o1, lse1, q, k, v, self_mask.unsqueeze(-1), scale)
        else:
            out, lse, ws = o1, lse1.float(), None
        ctx.save_for_backward(q, k, v, kk, vk, known_index, cu_q, cu_k, out, lse,
                              *([] if ws is None else [ws]))
        ctx.max_q, ctx.max_k, ctx.scale, ctx.any_unknown = max_q, max_k, scale, any_unknown
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kk, vk, known_index, cu_q, cu_k, out, lse, *rest = ctx.saved_tensors
        dout = dout.contiguous()
        dq = torch.empty_like(q)
        dkk = torch.empty_like(kk)
        dvk = torch.empty_like(vk)
        _call_with_supported(
            _fa._flash_attn_varlen_backward, dout=dout, q=q, k=kk, v=vk, out=out,
            softmax_lse=lse.transpose(0, 1).contiguous(), dq=dq, dk=dkk, dv=dvk, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, max_seqlen_q=ctx.max_q, max_seqlen_k=ctx.max_k, dropout_p=0.0,
            softmax_scale=ctx.scale, causal=False, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
        if ctx.any_unknown:
            (ws,) = rest
            dq, dk, dv = _self_grads(dout, out, q, k, v, ws, ctx.scale, dq)
            dq = dq.to(q.dtype)
        else:
            dk = torch.zeros_like(k, dtype=torch.float32)
            dv = torch.zeros_like(v, dtype=torch.float32)
        dk.index_add_(0, known_index, dkk.float())
        dv.index_add_(0, known_index, dvk.float())
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
def generative_attention(q: Tensor, k: Tensor, v: Tensor, meta: AttentionMeta) -> Tensor:
    """Exact generative attention. sdpa: q/k/v (B, H, L, D); flash: (T, H, D). Same shape out."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if meta.backend == "flash":
        return _PackedGenerativeAttention.apply(
            q, k, v, meta.known_index, meta.self_mask, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
            scale, meta.any_unknown)
    fused_ok = (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16)) or (
        q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16, torch.float32))
    if not fused_ok:
        return _math_attention(q, k, v, meta, scale)
    bias = meta.key_bias.to(q.dtype)
    # no .contiguous(): the fused kernels read the (B, L, H, D)-strided views of the qkv projection directly
    return _PaddedGenerativeAttention.apply(q, k, v, bias,
                                            meta.self_mask, meta.n_known, scale, meta.any_unknown)
