"""Model FLOPs per token / per cell, for model-FLOPs utilisation (MFU).

Counts multiply-adds as 2 FLOPs, matmuls only (norms, activations, softmax are noise). The
attention term counts the work the generative attention actually does: every query over the
cell's known keys (plus one self key), not the dense (P+G)^2. Training = 3 x forward
(backward ~ 2 x forward).
"""

from __future__ import annotations

from scgpt_model.config import ModelConfig


def _dense_flops_per_token(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.d_ffn
    per_layer = 2 * (3 * d * d) + 2 * (d * d) + 2 * (2 * d * f)  # qkv, out proj, FFN
    embed = 2 * (d + d * d)  # continuous value encoder (Linear(1,d) + Linear(d,d))
    d_in = cfg.head_input_dim
    n_out = cfg.n_bins if cfg.objectives.gep_loss == "ce" else 1
    heads = 2 * (d_in * d + d * d + d * n_out)  # expression head
    if cfg.objectives.gepc:
        heads += 2 * (d * d + d * (2 * d if cfg.use_batch_labels else d))
    return cfg.n_layers * per_layer + embed + heads


def estimate_flops(cfg: ModelConfig, n_tokens: int, n_keys: int | None = None, training: bool = True) -> int:
    """FLOPs for one cell of ``n_tokens`` tokens whose queries each see ``n_keys`` keys (default all)."""
    keys = n_tokens if n_keys is None else n_keys + 1  # + the self key of unknown tokens
    attn = cfg.n_layers * 2 * 2 * n_tokens * keys * cfg.d_model  # QK^T and PV
    fwd = n_tokens * _dense_flops_per_token(cfg) + attn
    return 3 * fwd if training else fwd


def model_flops_per_cell(cfg: ModelConfig, n_genes: int | None = None, unknown_ratio: float | None = 0.5,
                         training: bool = True) -> int:
    """FLOPs per cell of ``n_genes`` genes (default max_seq_len) + <cls>, at an unknown ratio
    (default 0.5, the mean of {0.25, 0.5, 0.75}); ``unknown_ratio=None`` = dense attention."""
    n = (cfg.max_seq_len if n_genes is None else n_genes) + 1
    keys = None if unknown_ratio is None else int(round((n - 1) * (1 - unknown_ratio))) + 1
    return estimate_flops(cfg, n, keys, training)


def batch_flops(cfg: ModelConfig, n_cells: int, n_tokens: int, n_unknown: int = 0, training: bool = True) -> float:
    """FLOPs of one batch of ``n_cells`` cells holding ``n_tokens`` real tokens, ``n_unknown`` of
    them unknown (queries only), counted per cell at the batch's mean shape."""
    per_cell_tokens = max(1, round(n_tokens / n_cells))
    per_cell_keys = max(1, round((n_tokens - n_unknown) / n_cells))
    return float(n_cells * estimate_flops(cfg, per_cell_tokens, per_cell_keys, training=training))


def mfu(flops_done: float, seconds: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation = achieved FLOP/s over the peak of the devices that did the work
    (e.g. world size x 989e12 for bf16 dense on H100/H200)."""
    return flops_done / max(seconds, 1e-12) / peak_flops
