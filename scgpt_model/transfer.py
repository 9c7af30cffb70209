"""Re-using pretrained weights in a changed model: new heads, a vocabulary extended with new
features (multi-omic, §4.5: ATAC peaks / proteins next to RNA genes), gene embeddings by token."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch

from scgpt_model.checkpoint import load_compatible
from scgpt_model.model import ScGPT
from scgpt_model.vocab import GeneVocab

logger = logging.getLogger(__name__)

GENE_EMB = "gene_encoder.embedding.weight"


def transfer_gene_embeddings(src: ScGPT, src_vocab: GeneVocab, dst: ScGPT, dst_vocab: GeneVocab) -> int:
    """Copy gene-embedding rows (and the gene LayerNorm) for every token both vocabularies hold,
    matched by token, not id. Returns the number of rows copied."""
    if src.cfg.d_model != dst.cfg.d_model:
        raise ValueError(f"cannot transfer embeddings between widths {src.cfg.d_model} and {dst.cfg.d_model}")
    shared = [t for t in dst_vocab.tokens if t in src_vocab]
    dst_ids = torch.tensor([dst_vocab[t] for t in shared], dtype=torch.long)
    src_ids = torch.tensor([src_vocab[t] for t in shared], dtype=torch.long)
    with torch.no_grad():
        w_dst = dst.gene_encoder.embedding.weight
        w_dst[dst_ids.to(w_dst.device)] = src.gene_encoder.embedding.weight[src_ids.to(w_dst.device)].to(w_dst)
        if src.cfg.gene_norm and dst.cfg.gene_norm:
            dst.gene_encoder.norm.load_state_dict(src.gene_encoder.norm.state_dict())
    logger.info("transferred %d of %d gene embeddings", len(shared), len(dst_vocab))
    return len(shared)


def extend_vocabulary(model: ScGPT, vocab: GeneVocab, new_tokens: Sequence[str], *,
                      inherit: Literal["all", "embeddings"] = "all", **overrides: Any) -> tuple[ScGPT, GeneVocab]:
    """A model whose vocabulary is ``vocab`` + ``new_tokens`` (appended: old ids keep their rows).

    ``inherit="all"`` keeps every compatible pretrained weight; ``"embeddings"`` keeps only the
    gene embeddings (the paper's multi-omic setting trains the rest from scratch). ``overrides``
    edit the config (e.g. ``n_modalities=3``, ``n_layers=4``).
    """
    fresh = [t for t in dict.fromkeys(str(t) for t in new_tokens) if t not in vocab]
    new_vocab = GeneVocab([*vocab.tokens, *fresh], key=vocab.key)
    cfg = model.cfg.replace(vocab_size=len(new_vocab), **overrides)
    out = ScGPT(cfg)
    if inherit == "all":
        state = {k: v for k, v in model.state_dict().items() if k != GENE_EMB}
        load_compatible(out, state, strict=False)
    elif inherit != "embeddings":
        raise ValueError(f"inherit must be 'all' or 'embeddings', got {inherit!r}")
    transfer_gene_embeddings(model, vocab, out, new_vocab)
    return out, new_vocab
