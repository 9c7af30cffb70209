"""Multi-omic models (§4.2.3 eq. 8, §4.5): a vocabulary extended with modality-qualified features
and the table of modality tokens, saved beside the checkpoint.

Keys: RNA genes keep their vocabulary key unchanged (same token, same id); every other feature
is stored as ``"<modality>:<name>"`` (``prot:CD4``, ``atac:chr1:9999-10500``), so the CD4 protein
is a different token from the CD4 gene and no lookup of a gene key can ever return a protein id.

The modality table (``modalities.json`` next to ``vocab.json``) lists the modality names in
modality-token order (``rna`` is always id 0, which the <cls> position also carries, see
``batching.assemble``) and the number of RNA tokens the extension started from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from scgpt_model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from scgpt_model.model import ScGPT
from scgpt_model.transfer import extend_vocabulary
from scgpt_model.vocab import GeneVocab, VocabError

MODALITY_FILE = "modalities.json"
FORMAT = "scgpt-census-modalities/1"
RNA = "rna"
SEP = ":"
MODALITY_NAMES = ("rna", "prot", "atac")  # canonical names; other names are allowed too
Trunk = Literal["scratch", "inherit"]
PAPER_TRUNK_LAYERS = 4  # Methods: "4 stacked transformer blocks" for the multi-omic model


def qualify(modality: str, name: str) -> str:
    """The vocabulary key of a feature: the gene key for RNA, ``modality:name`` otherwise."""
    return str(name) if modality == RNA else f"{modality}{SEP}{name}"


@dataclass(frozen=True)
class ModalityTable:
    """Modality names in token order (``names[0] == 'rna'``) and the size of the RNA vocabulary."""

    names: tuple[str, ...]
    n_rna_tokens: int  # ids < n_rna_tokens are the pretrained vocabulary (specials + genes)

    def __post_init__(self) -> None:
        if not self.names or self.names[0] != RNA or len(set(self.names)) != len(self.names):
            raise ValueError(f"modality names must start with {RNA!r} and be unique, got {self.names}")

    def id(self, modality: str) -> int:
        if modality not in self.names:
            raise KeyError(f"modality {modality!r} is not in this model's table {list(self.names)}")
        return self.names.index(modality)

    def of_token(self, token: str, token_id: int) -> str:
        if token_id < self.n_rna_tokens:
            return RNA
        head = token.split(SEP, 1)[0]
        return head if head in self.names else RNA

    def token_modalities(self, vocab: GeneVocab) -> np.ndarray:
        """(len(vocab),) modality id of every token."""
        return np.asarray([self.id(self.of_token(t, i)) for i, t in enumerate(vocab.tokens)], dtype=np.int64)

    def to_json(self) -> dict:
        return {"format": FORMAT, "modalities": list(self.names), "n_rna_tokens": self.n_rna_tokens}

    def save(self, dirpath: str | Path) -> Path:
        p = Path(dirpath) / MODALITY_FILE
        p.write_text(json.dumps(self.to_json(), indent=2))
        return p

    @classmethod
    def load(cls, dirpath: str | Path) -> ModalityTable | None:
        p = Path(dirpath) / MODALITY_FILE
        if not p.exists():
            return None
        raw = json.loads(p.read_text())
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"{p} is not a {FORMAT} file")
        return cls(tuple(raw["modalities"]), int(raw["n_rna_tokens"]))


def extend_for_modalities(model: ScGPT, vocab: GeneVocab, features: Mapping[str, Sequence[str]], *,
                          trunk: Trunk = "scratch", n_layers: int = PAPER_TRUNK_LAYERS,
                          table: ModalityTable | None = None, seed: int = 0,
                          **overrides) -> tuple[ScGPT, GeneVocab, ModalityTable]:
    """A multi-omic model: ``vocab`` + the new modality-qualified features, modality tokens on.

    ``features``: modality -> feature names (RNA excluded: genes are already tokens). The RNA ids
    and their embedding rows are copied unchanged; new features start from the embedding init.
    ``trunk="scratch"`` (the paper): only the gene embeddings are inherited and the trunk has
    ``n_layers`` layers of the pretrained width; ``"inherit"``: every pretrained weight is kept.
    ``table``: an existing table to extend (a model that is already multi-omic).
    """
    if trunk not in ("scratch", "inherit"):
        raise ValueError(f"trunk must be 'scratch' or 'inherit', got {trunk!r}")
    names = list(table.names) if table is not None else [RNA]
    n_rna = table.n_rna_tokens if table is not None else len(vocab)
    if table is None:
        clash = [t for t in vocab.genes if SEP in t and t.split(SEP, 1)[0] in (*MODALITY_NAMES, *features)]
        if clash:
            raise VocabError(f"the RNA vocabulary already holds modality-qualified keys {clash[:3]}; "
                             "pass the model's modality table (ModalityTable.load) to extend it again")
    new: list[str] = []
    for mod, feats in features.items():
        if mod == RNA:
            continue
        if SEP in mod:
            raise VocabError(f"modality name {mod!r} must not contain {SEP!r}")
        if mod not in names:
            names.append(mod)
        new += [qualify(mod, f) for f in feats]
    tab = ModalityTable(tuple(names), n_rna)
    torch.manual_seed(seed)  # the fresh rows and (scratch) trunk are drawn reproducibly
    kw = dict(n_modalities=len(tab.names), **overrides)
    if trunk == "scratch":
        kw["n_layers"] = n_layers
    out, new_vocab = extend_vocabulary(model, vocab, new, inherit="all" if trunk == "inherit" else "embeddings", **kw)
    return out, new_vocab, tab


def save_multiomic(model: ScGPT, vocab: GeneVocab, table: ModalityTable, dirpath: str | Path) -> Path:
    """``save_pretrained`` (model.pt, config.json, vocab.json) plus ``modalities.json``."""
    if model.cfg.n_modalities != len(table.names):
        raise CheckpointError(f"the model has {model.cfg.n_modalities} modality tokens but the table lists "
                              f"{len(table.names)} ({list(table.names)})")
    d = save_pretrained(model, vocab, dirpath)
    table.save(d)
    return d


def load_multiomic(dirpath: str | Path, map_location: str = "cpu") -> tuple[ScGPT, GeneVocab, ModalityTable]:
    """Load a folder written by :func:`save_multiomic`; its modality table must be there."""
    model, vocab, cfg = load_pretrained(dirpath, map_location=map_location)
    table = ModalityTable.load(dirpath)
    if table is None:
        raise CheckpointError(f"{dirpath} has no {MODALITY_FILE}: it is not a multi-omic checkpoint")
    if cfg.n_modalities != len(table.names):
        raise CheckpointError(f"{dirpath}: config has {cfg.n_modalities} modalities, {MODALITY_FILE} lists "
                              f"{len(table.names)}")
    return model, vocab, table
