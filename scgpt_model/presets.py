"""Model presets as functions returning configs (a variant copies and edits a base)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scgpt_model.config import ModelConfig, ObjectiveConfig


def debug(vocab_size: int) -> ModelConfig:
    """Tiny network for CPU tests: 2 layers of width 32, runs a forward in milliseconds."""
    return ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, d_ffn=64,
                       dropout=0.0,  # deterministic tests (over-fitting, equality checks)
                       max_seq_len=256)  # tiny data: short cells


def cpu(vocab_size: int) -> ModelConfig:
    """Pretrains in about 10 minutes on 2 CPU cores: width 128, 4 layers, 4 heads of 32, 256 genes.

    Head dim 32 rather than the paper's 64/8 heads on a narrow model: fused CPU attention is about
    4x slower per FLOP at head dim 8 than at 32, and it is most of a CPU step (cost grows with
    genes per cell squared, hence 256).

    Depth-aware, which the paper's model is not: the decoders are told each cell's log expressed-gene
    count and a discriminator behind gradient reversal keeps it out of the cell embeddings. Without
    that, at this scale the first principal component of the pretrained embedding was sequencing depth
    (84-93% of its variance); with it, that component is the myeloid / lymphoid axis (BENCHMARKS.md,
    issue 10)."""
    return ModelConfig(vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, d_ffn=256,
                       dropout=0.1, max_seq_len=256, depth_input=True,
                       objectives=ObjectiveConfig(depth_adv=True, depth_adv_weight=10.0))


def small(vocab_size: int) -> ModelConfig:
    """A laptop-sized model (~1/8 of base compute): width 256, 4 layers, 512 genes per cell."""
    return ModelConfig(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=4, d_ffn=512,
                       dropout=0.1, max_seq_len=512)


def base(vocab_size: int) -> ModelConfig:
    """The paper's whole-human model (§4.8): 512 wide, 12 layers, 8 heads, FFN 512, dropout 0.2."""
    return ModelConfig(vocab_size=vocab_size)  # the ModelConfig defaults are the paper's


PRESETS: dict[str, Callable[[int], ModelConfig]] = {"debug": debug, "cpu": cpu, "small": small, "base": base}


def get_preset(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """``get_preset("debug"|"cpu"|"small"|"base", vocab_size, **overrides)``; ``objectives`` may be a dict."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name](vocab_size)
    return cfg.replace(**overrides) if overrides else cfg
