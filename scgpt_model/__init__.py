"""scGPT network and its token contract (vocabulary, binning, batching). Single-device PyTorch only.

Modules (import them directly; this package init stays light so ``ingest`` workers don't load torch):

* ``config`` / ``presets``: typed ``ModelConfig`` + ``ObjectiveConfig``;
  ``get_preset("debug"|"small"|"base", vocab_size, **overrides)``
* ``batching``: ``collate_generative`` (pretraining), ``collate_all_genes`` (fine-tuning on a gene set),
  ``collate_perturbation``; ``ModelBatch`` (padded for ``sdpa``, packed for ``flash``)
* ``model``: ``ScGPT`` -> ``ModelOutput`` with a ``LossOutput`` (``.total``, ``.terms``); ``embed_cells``,
  ``gene_embeddings``
* ``attention``: exact generative attention without a (P+G)^2 mask (fused kernel + log-sum-exp merge)
* ``generation``: K-step generation from a gene or cell prompt
* ``checkpoint``: ``save_pretrained`` / ``load_pretrained`` (ours and the official scGPT layout); ``transfer``
* ``flops``: FLOPs per cell / token for MFU
"""

from scgpt_model.vocab import GeneVocab, VocabError

__all__ = ["GeneVocab", "VocabError"]
