"""Building blocks: input encoders, the transformer layer, domain-specific batch norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scgpt_model.attention import AttentionMeta, generative_attention


class GeneEncoder(nn.Module):
    """Gene token embedding, optionally followed by LayerNorm (the released model has it)."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, norm: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.norm = nn.LayerNorm(d_model) if norm else nn.Identity()

    def forward(self, ids: Tensor) -> Tensor:  # (...,) -> (..., D)
        return self.norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Bin value -> vector: clamp(x, max) -> Linear(1, D) -> ReLU -> Linear(D, D) -> LayerNorm."""

    def __init__(self, d_model: int, max_value: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: Tensor) -> Tensor:  # (N,) float -> (N, D)
        x = torch.clamp(x.unsqueeze(-1).to(self.linear1.weight.dtype), max=self.max_value)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class CategoryValueEncoder(nn.Module):
    """Bin value -> embedding over n_bins + 2 categories (extra: <mask> value, <pad>/<cls> value)."""

    def __init__(self, d_model: int, n_bins: int, mask_value: float) -> None:
        super().__init__()
        self.n_bins, self.mask_value = n_bins, mask_value
        self.embedding = nn.Embedding(n_bins + 2, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        idx = x.round().long().clamp(0, self.n_bins - 1)
        idx = torch.where(x == self.mask_value, self.n_bins, idx)
        idx = torch.where((x < 0) & (x != self.mask_value), self.n_bins + 1, idx)
        return self.norm(self.embedding(idx))


class LabelEncoder(nn.Module):
    """Embedding + LayerNorm for a per-cell or per-token label (batch, modality)."""

    def __init__(self, n: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm(self.embedding(ids))


class DomainSpecificBatchNorm(nn.Module):
    """One BatchNorm1d per batch label over the token embeddings (DSBN, Chang et al. 2019).

    Unlike the reference (which normalises the whole mini-batch with the FIRST cell's domain),
    each token is normalised by its own cell's domain. Loops over domains: fine-tuning only.
    """

    def __init__(self, d_model: int, n_domains: int, affine: bool) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm1d(d_model, eps=6.1e-5, affine=affine) for _ in range(n_domains))

    def forward(self, x: Tensor, domain: Tensor, valid: Tensor) -> Tensor:
        """x (N, D) tokens; domain (N,) long per token; valid (N,) bool (pads excluded from stats)."""
        out = x.clone()
        for d, bn in enumerate(self.bns):
            sel = (domain == d) & valid
            idx = sel.nonzero(as_tuple=True)[0]  # host sync; DSBN is a fine-tuning feature
            if idx.numel() > 1 or (idx.numel() == 1 and not self.training):
                out = out.index_copy(0, idx, bn(x.index_select(0, idx)))
        return out


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return -ctx.lambd * g, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward, gradient multiplied by -lambd backward (Ganin & Lempitsky 2015)."""
    return _GradReverse.apply(x, lambd)


class SelfAttention(nn.Module):
    """Fused qkv projection (in_proj layout: q, k, v stacked) + generative attention + out proj."""

    def __init__(self, d_model: int, n_heads: int, unknown_skip_out_proj: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        # the released generative layer returns unknown tokens' attention without out_proj (a quirk
        # kept only to reproduce imported official checkpoints on generative batches)
        self.unknown_skip_out_proj = unknown_skip_out_proj

    def forward(self, x: Tensor, meta: AttentionMeta) -> Tensor:
        """sdpa: x (B, L, D); flash: x (T, D)."""
        h = self.n_heads
        qkv = self.qkv(x)
        if meta.backend == "flash":
            t = x.shape[0]
            q, k, v = qkv.view(t, 3, h, -1).unbind(1)  # each (T, H, Dh)
            o = generative_attention(q, k, v, meta).reshape(t, -1)
        else:
            b, n = x.shape[:2]
            q, k, v = qkv.view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
            o = generative_attention(q, k, v, meta).transpose(1, 2).reshape(b, n, -1)
        out = self.out(o)
        if self.unknown_skip_out_proj and meta.any_unknown:
            unk = meta.self_mask.reshape(*o.shape[:-1], 1)  # (B, L, 1) or (T, 1)
            out = torch.where(unk, o, out)
        return out


class TransformerLayer(nn.Module):
    """Post-norm (released) or pre-norm transformer block with the generative attention."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float, norm_scheme: str,
                 activation: str, eps: float, unknown_skip_out_proj: bool = False) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads, unknown_skip_out_proj)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = norm_scheme == "pre"
        self.act = F.relu if activation == "relu" else F.gelu

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(self.act(self.linear1(x)))))

    def forward(self, x: Tensor, meta: AttentionMeta) -> Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.norm1(x), meta))
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self.dropout(self.attn(x, meta)))
        return self.norm2(x + self._ffn(x))
