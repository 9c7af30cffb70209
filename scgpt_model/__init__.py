"""scGPT network and its token contract (vocabulary, binning, batching). Single-device PyTorch only."""

from scgpt_model.vocab import GeneVocab, VocabError

__all__ = ["GeneVocab", "VocabError"]
