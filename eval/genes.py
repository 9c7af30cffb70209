"""Match a dataset's genes to a model vocabulary, with a report of what matched.

The project's vocabularies are keyed by Ensembl id by default (``feature_id``); the official
scGPT ones by symbol (``feature_name``). Datasets come either way: pbmc3k carries both
(symbols as ``var_names``, Ensembl in ``var.gene_ids``), the symphony PBMCs only symbols.
Symbols are mapped to Ensembl with the shipped hg19 table (``data/gene_symbols_hg19.tsv``:
pbmc3k's 10x gene list plus current-HGNC aliases such as CXCL8), so a symbol-only dataset
still reaches an Ensembl-keyed vocabulary. What an Ensembl id is and how it is keyed (GENCODE
version stripped) is ``shardset.genes``, the rule ``ingest build-census`` uses too.
Unmatched genes are dropped and counted, never silently.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from eval.errors import EvalError
from scgpt_model.vocab import GeneVocab
from shardset.genes import gene_key, looks_ensembl, symbol_table

__all__ = ["DATA_DIR", "GeneMatch", "ensembl_table", "looks_ensembl", "match_genes", "symbol_table"]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
# var columns that, by convention, hold Ensembl ids / symbols (CELLxGENE, 10x, scanpy)
_ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id", "ensembl")
_SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol")


@functools.lru_cache(maxsize=1)
def ensembl_table() -> dict[str, str]:
    """Ensembl id -> symbol (the inverse of ``symbol_table``)."""
    inv: dict[str, str] = {}
    for sym, ens in symbol_table().items():  # hg19 symbols come before the aliases
        inv.setdefault(ens, sym)
    return inv


@dataclass(slots=True)
class GeneMatch:
    """Which of a dataset's genes the vocabulary knows.

    ``var_index[i]`` is the dataset column of matched gene i, ``token_ids[i]`` its vocabulary id
    and ``symbols[i]`` its symbol (for pathway look-ups; '' when unknown).
    """

    var_index: np.ndarray  # (n_matched,) int64 positions in adata.var
    token_ids: np.ndarray  # (n_matched,) int64 vocabulary ids
    symbols: list[str]
    n_total: int
    via: str  # which dataset field matched the vocabulary key
    n_duplicates: int = 0
    examples_unmatched: list[str] = field(default_factory=list)

    @property
    def n_matched(self) -> int:
        return int(self.token_ids.size)

    def report(self) -> str:
        pct = 100.0 * self.n_matched / max(self.n_total, 1)
        s = (f"genes matched to the vocabulary: {self.n_matched:,} of {self.n_total:,} ({pct:.1f}%) "
             f"via {self.via}; {self.n_total - self.n_matched:,} dropped")
        if self.n_duplicates:
            s += f" ({self.n_duplicates} duplicates of an already matched id)"
        if self.examples_unmatched:
            s += f"; e.g. unmatched: {', '.join(self.examples_unmatched[:5])}"
        return s

    def as_dict(self) -> dict:
        return {"n_total": self.n_total, "n_matched": self.n_matched, "via": self.via,
                "n_duplicates": self.n_duplicates}


def _symbols_of(adata: ad.AnnData) -> tuple[list[str], str]:
    for col in _SYMBOL_COLUMNS:
        if col in adata.var.columns and not looks_ensembl(adata.var[col]):
            return adata.var[col].astype(str).tolist(), f"var['{col}']"
    if not looks_ensembl(adata.var_names):
        return adata.var_names.astype(str).tolist(), "var_names"
    inv = ensembl_table()
    return [inv.get(gene_key(g), "") for g in adata.var_names.astype(str)], "var_names (Ensembl -> symbol table)"


def _candidates(adata: ad.AnnData, key: str) -> list[tuple[str, list[str]]]:
    """Possible per-gene keys for this vocabulary kind, each with a description."""
    symbols, sym_src = _symbols_of(adata)
    out: list[tuple[str, list[str]]] = []
    if key == "feature_id":
        for col in _ID_COLUMNS:
            if col in adata.var.columns:
                out.append((f"var['{col}']", [gene_key(str(g)) for g in adata.var[col]]))
        if looks_ensembl(adata.var_names):
            out.append(("var_names", [gene_key(str(g)) for g in adata.var_names]))
        table = symbol_table()
        out.append((f"{sym_src} (symbol -> Ensembl table)", [table.get(s, "") for s in symbols]))
    else:
        out.append((sym_src, symbols))
    return out


def match_genes(adata: ad.AnnData, vocab: GeneVocab) -> GeneMatch:
    """Match ``adata.var`` to ``vocab`` by its key; raise ``EvalError`` when nothing matches."""
    symbols, _ = _symbols_of(adata)
    best: tuple[str, np.ndarray] | None = None
    for desc, keys in _candidates(adata, vocab.key):
        ids = vocab.encode(keys, missing=-1).astype(np.int64)
        if best is None or (ids >= 0).sum() > (best[1] >= 0).sum():
            best = (desc, ids)
    assert best is not None
    via, ids = best
    hit = np.flatnonzero(ids >= 0)
    # two columns with the same vocabulary id (e.g. symbol aliases) would double-count a gene
    _, first = np.unique(ids[hit], return_index=True)
    keep = np.sort(hit[first])
    n_dup = int(hit.size - keep.size)
    unmatched = [str(adata.var_names[i]) for i in np.flatnonzero(ids < 0)[:5]]
    if keep.size == 0:
        raise EvalError(
            f"none of the dataset's {adata.n_vars:,} genes is in the model's vocabulary "
            f"(keyed by {vocab.key}; tried {', '.join(d for d, _ in _candidates(adata, vocab.key))}; "
            f"dataset genes look like {', '.join(map(str, adata.var_names[:3]))}, vocabulary genes like "
            f"{', '.join(vocab.genes[:3])}). Use a dataset of the same organism, with Ensembl ids in "
            "var['feature_id'] or gene symbols in var_names.")
    return GeneMatch(var_index=keep, token_ids=ids[keep], symbols=[symbols[i] for i in keep],
                     n_total=int(adata.n_vars), via=via, n_duplicates=n_dup, examples_unmatched=unmatched)
