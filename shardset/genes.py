"""Gene identifiers: one rule for what counts as an Ensembl id and how it is keyed.

``ingest build-census`` keys a store's genes with it and ``eval`` matches a dataset to a model
vocabulary with it, so a GENCODE-versioned h5ad (``ENSG00000123456.7``) builds a store whose ids
match a Census vocabulary (``ENSG00000123456``) and evaluates against the same model.
Symbols reach Ensembl ids through the shipped hg19 table ``data/gene_symbols_hg19.tsv`` (pbmc3k's
10x gene list plus current-HGNC aliases such as CXCL8).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SYMBOL_TABLE = DATA_DIR / "gene_symbols_hg19.tsv"

ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
# A column holds Ensembl ids when more than this share of its values are ids: CELLxGENE and 10x
# columns are all ids; the slack admits spike-ins (ERCC-...) and custom features in a 10x list.
ENSEMBL_SHARE = 0.8


def is_ensembl(value: str) -> bool:
    return bool(ENSEMBL.match(value))


def gene_key(value: str) -> str:
    """The key of one gene id: an Ensembl id without its GENCODE version (ENSG00000123456.7 ->
    ENSG00000123456; the version is not part of the gene, Census var has none); else unchanged."""
    return value.split(".", 1)[0] if ENSEMBL.match(value) else value


def looks_ensembl(values: Iterable) -> bool:
    """True when more than ``ENSEMBL_SHARE`` of ``values`` are Ensembl ids."""
    vals = [str(v) for v in values]
    return bool(vals) and sum(bool(ENSEMBL.match(v)) for v in vals) > ENSEMBL_SHARE * len(vals)


def ensembl_keys(values: Iterable) -> list[str | None]:
    """Each value's key when it is an Ensembl id, else None."""
    return [gene_key(s) if ENSEMBL.match(s) else None for s in map(str, values)]


@functools.lru_cache(maxsize=2)
def symbol_table(path: Path = SYMBOL_TABLE) -> dict[str, str]:
    """symbol -> Ensembl id from the shipped table (first entry wins: hg19 symbols come before
    the aliases). Cached; treat the result as read-only."""
    import pandas as pd

    tbl = pd.read_csv(path, sep="\t", comment="#", dtype=str, keep_default_na=False)
    out: dict[str, str] = {}
    for name, fid in zip(tbl["feature_name"], tbl["feature_id"]):
        out.setdefault(name, fid)
    return out
