"""`ingest build-census`: a Census-layout store from AnnData (.h5ad) files.

Genes are keyed by Ensembl id without a GENCODE version (``shardset.genes``, the rule eval uses
too). A dataset that only has symbols is mapped through the shipped table
``data/gene_symbols_hg19.tsv``; symbols without an id are dropped and counted. Several columns of
one dataset with the same id (a repeated symbol, two aliases, two versions of one gene) are
summed, kept once or refused (``--on-duplicate-genes``), and a warning names them. The store's
var is the union of all datasets' genes (first-seen order); each dataset's ``n_measured_obs``
counts only the genes it measured. Census obs columns the source lacks get defaults (or the
values given with ``--set column=value``). Files are read in backed mode and written in row
chunks, so memory is bounded by ``chunk_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ingest import census_schema as cs
from ingest.errors import IngestError
from ingest.store_writer import CensusStoreWriter, DatasetInfo
from shardset.genes import DATA_DIR, ensembl_keys, looks_ensembl, symbol_table

log = logging.getLogger(__name__)

__all__ = ["DATA_DIR", "DUPLICATE_POLICIES", "GeneMapping", "build_census", "resolve_genes"]

# obs column names commonly used for Census fields in community h5ad files
OBS_ALIASES = {"celltype": "cell_type", "cell_types": "cell_type", "donor": "donor_id", "sample": "donor_id"}
DuplicatePolicy = Literal["sum", "first", "error"]
DUPLICATE_POLICIES: tuple[str, ...] = ("sum", "first", "error")


@dataclass(slots=True)
class GeneMapping:
    """How one dataset's columns map to Ensembl ids (None = dropped)."""

    feature_id: list[str | None]
    feature_name: list[str]
    n_unmapped: int = 0
    unmapped_examples: list[str] = field(default_factory=list)


def resolve_genes(var: pd.DataFrame, table: dict[str, str] | None = None) -> GeneMapping:
    """Find each gene's Ensembl id: a feature_id / gene_ids column, an Ensembl index, or the symbol table."""
    names = [str(x) for x in (var["feature_name"] if "feature_name" in var else var.index)]
    for col in ("feature_id", "gene_ids", "gene_id", "ensembl_id"):
        if col in var and looks_ensembl(var[col]):
            ids = ensembl_keys(var[col])
            break
    else:
        idx = var.index.astype(str)
        if looks_ensembl(idx):
            ids = ensembl_keys(idx)
            names = ([str(x) for x in var["feature_name"]] if "feature_name" in var else
                     [str(x) for x in var.get("gene_symbols", pd.Series(list(idx)))])
        else:
            table = symbol_table() if table is None else table
            ids = [table.get(n) for n in names]
    missing = [n for n, i in zip(names, ids) if i is None]
    return GeneMapping(ids, names, len(missing), missing[:10])


def duplicate_columns(mapping: GeneMapping) -> dict[str, list[int]]:
    """Ensembl id -> the source columns (ascending) that map to it, for ids with more than one."""
    cols: dict[str, list[int]] = {}
    for k, fid in enumerate(mapping.feature_id):
        if fid is not None:
            cols.setdefault(fid, []).append(k)
    return {fid: ks for fid, ks in cols.items() if len(ks) > 1}


def apply_duplicate_policy(mapping: GeneMapping, cmap: np.ndarray, policy: DuplicatePolicy, where: str) -> np.ndarray:
    """``cmap`` with the policy for columns sharing an id applied: ``sum`` keeps them all (the
    store sums them), ``first`` drops all but the first, ``error`` refuses. Says what it did."""
    dups = duplicate_columns(mapping)
    if not dups:
        return cmap
    shown = "; ".join(f"{fid} ({' + '.join(mapping.feature_name[k] for k in ks)})"
                      for fid, ks in list(dups.items())[:5])
    more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
    what = f"{where}: {len(dups)} gene id(s) have more than one column: {shown}{more}"
    if policy == "error":
        raise IngestError(f"{what}. Pass --on-duplicate-genes sum (add their counts) or first (keep the first "
                          "column), or make var unique first")
    if policy == "first":
        cmap = cmap.copy()
        for ks in dups.values():
            cmap[ks[1:]] = -1
        log.warning("%s; kept the first column of each (--on-duplicate-genes first)", what)
    else:
        log.warning("%s; their counts are summed into one gene (--on-duplicate-genes sum; 'first' keeps the first "
                    "column, 'error' refuses)", what)
    return cmap


def _column_map(mapping: GeneMapping, index: dict[str, int]) -> np.ndarray:
    """(n_source_genes,) int64: union var index of each source column, -1 when dropped."""
    return np.array([index[i] if i is not None else -1 for i in mapping.feature_id], dtype=np.int64)


def remap_columns(X: sp.csr_matrix, col_map: np.ndarray, n_var: int) -> sp.csr_matrix:
    """Move columns to the store's var order; dropped genes (-1) go, columns mapped to one id are summed."""
    coo = sp.csr_matrix(X).tocoo()
    new_col = col_map[coo.col]
    keep = new_col >= 0
    out = sp.csr_matrix((coo.data[keep], (coo.row[keep], new_col[keep])), shape=(X.shape[0], n_var),
                        dtype=np.float32)
    out.sum_duplicates()
    return out


def census_obs(obs: pd.DataFrame, set_values: dict[str, str]) -> pd.DataFrame:
    """Census obs columns from a source obs: same-named columns, known aliases, then --set values."""
    out = pd.DataFrame(index=range(len(obs)))
    src = obs.reset_index(drop=True)
    for col in src.columns:
        target = col if col in cs.OBS_CATEGORICAL_DEFAULTS or col in ("is_primary_data",
                                                                        "observation_joinid") else OBS_ALIASES.get(col)
        if target and target not in out:
            out[target] = src[col].astype(object).where(src[col].notna(), None)
    for col, value in set_values.items():
        if col not in out or out[col].isna().all():
            out[col] = value
    if "observation_joinid" not in out:
        out["observation_joinid"] = [str(x) for x in obs.index]
    # fill ontology ids we know for filled-in labels
    for label_col, table in (("assay", "assay"), ("tissue", "tissue"), ("tissue_general", "tissue"),
                             ("sex", "sex"), ("disease", "disease")):
        id_col = f"{label_col}_ontology_term_id"
        if label_col in out and id_col not in out:
            out[id_col] = [cs.ONTOLOGY[table].get(str(v), "unknown") for v in out[label_col]]
    return out


def parse_set_values(items: Iterable[str]) -> dict[str, str]:
    allowed = set(cs.OBS_CATEGORICAL_DEFAULTS) | {"is_primary_data"}
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise IngestError(f"--set {item!r}: expected COLUMN=VALUE, e.g. --set tissue_general=blood")
        k, v = item.split("=", 1)
        if k not in allowed:
            raise IngestError(f"--set {k}: not a Census obs column; use one of {sorted(allowed)}")
        out[k] = v
    return out


def _open_h5ad(path: Path) -> ad.AnnData:
    if not path.exists():
        raise IngestError(f"--h5ad {path}: file not found")
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad input file
        raise IngestError(f"--h5ad {path}: cannot be read as AnnData ({type(e).__name__}: {e})") from e


def _iter_rows(adata: ad.AnnData, layer: str | None, chunk_rows: int,
               where: str) -> Iterator[tuple[int, sp.csr_matrix]]:
    if layer is not None and layer not in adata.layers:
        raise IngestError(f"{where}: no layer {layer!r}; it has {list(adata.layers.keys())}. Drop --layer to use X.")
    for start in range(0, adata.n_obs, chunk_rows):
        stop = min(start + chunk_rows, adata.n_obs)
        M = adata.layers[layer][start:stop] if layer else adata.X[start:stop]
        yield start, sp.csr_matrix(M, dtype=np.float32)


def build_census(h5ads: list[str | Path], out: str | Path, *, set_values: dict[str, str] | None = None,
                 layer: str | None = None, organism: str = "Homo sapiens", chunk_rows: int = 5000,
                 on_duplicate_genes: DuplicatePolicy = "sum") -> Path:
    """Write the Census-layout store ``out`` from the given h5ad files; returns its path."""
    if not h5ads:
        raise IngestError("give at least one --h5ad FILE")
    if on_duplicate_genes not in DUPLICATE_POLICIES:
        raise IngestError(f"--on-duplicate-genes {on_duplicate_genes}: use one of {', '.join(DUPLICATE_POLICIES)}")
    set_values = set_values or {}
    table = symbol_table()
    files = [Path(p) for p in h5ads]
    adatas = [_open_h5ad(p) for p in files]
    mappings = [resolve_genes(a.var, table) for a in adatas]
    var_rows: dict[str, str] = {}
    for m in mappings:
        for fid, name in zip(m.feature_id, m.feature_name):
            if fid is not None:
                var_rows.setdefault(fid, name)
    if not var_rows:
        raise IngestError("no gene of any input could be mapped to an Ensembl id; give var a 'feature_id' "
                          "(or 'gene_ids') column with Ensembl ids")
    var = pd.DataFrame({"feature_id": list(var_rows), "feature_name": list(var_rows.values())})
    index = {f: i for i, f in enumerate(var_rows)}
    cmaps = []
    for p, m in zip(files, mappings):
        if m.n_unmapped:
            log.warning("%s: %d genes have no Ensembl id and are dropped (e.g. %s)", p.name, m.n_unmapped,
                        ", ".join(m.unmapped_examples[:5]))
        cmaps.append(apply_duplicate_policy(m, _column_map(m, index), on_duplicate_genes, f"--h5ad {p}"))
    writer = CensusStoreWriter(out, var, sum(a.n_obs for a in adatas), organism=organism,
                               build_note=f"built by `ingest build-census` from {len(files)} h5ad file(s)")
    try:
        for p, a, cmap in zip(files, adatas, cmaps):
            measured = np.zeros(len(var), dtype=bool)
            measured[cmap[cmap >= 0]] = True
            info = DatasetInfo(dataset_id=p.stem, title=p.stem, h5ad_path=str(p.resolve()))
            obs = census_obs(a.obs, set_values)
            for start, M in _iter_rows(a, layer, chunk_rows, f"--h5ad {p}"):
                writer.append(obs.iloc[start:start + M.shape[0]], remap_columns(M, cmap, len(var)), info, measured)
        writer.close()
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # nothing half-written left behind
        raise
    finally:
        for a in adatas:
            if a.isbacked:
                a.file.close()
    return Path(out)
