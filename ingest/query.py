"""Opening a Census (public or local), and the obs query.

Everything here runs in the driver before any Ray task starts, so bad input (a store that is
not in Census layout, an unknown tissue, a filter that does not parse, an empty query) is
refused in seconds with nothing written.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tiledbsoma as soma

from ingest import census_schema as cs
from ingest.config import IngestConfig  # re-exported: callers import it from here too
from ingest.errors import IngestError
from shardset.genes import gene_key

log = logging.getLogger(__name__)


# ---- the store ---------------------------------------------------------------------------
def source_of(cfg: IngestConfig) -> dict:
    """What the manifest records as the data source (a URI or a public release)."""
    if cfg.census_uri:
        uri = cfg.census_uri if "://" in cfg.census_uri else str(Path(cfg.census_uri).resolve())
        return {"kind": "uri", "uri": uri}
    return {"kind": "census", "census_version": cfg.census_version}


def open_census(source: dict, tiledb_config: dict | None = None) -> soma.Collection:
    """Open the store ``source`` names; ``tiledb_config`` adds to cellxgene_census's defaults."""
    import cellxgene_census  # heavy import, only where needed

    if source["kind"] == "uri":
        uri = source["uri"]
        if "://" not in uri and not Path(uri).exists():
            raise IngestError(f"--census-uri {uri}: no such path. Build a local store with `ingest build-census` "
                              "or `ingest build-demo`, or use --census-version for the public Census")
        try:
            return cellxgene_census.open_soma(uri=uri, tiledb_config=tiledb_config)
        except Exception as e:  # noqa: BLE001 - anything that does not open is not a Census store
            raise IngestError(f"--census-uri {uri}: not a SOMA store ({type(e).__name__}: {e}). Point it at the "
                              "root of a Census copy (the folder holding census_data/ and census_info/)") from e
    try:
        if source.get("uri"):  # pinned by ``pin_release``: workers open the exact release the plan resolved
            config = {**({"vfs.s3.region": source["s3_region"]} if source.get("s3_region") else {}),
                      **(tiledb_config or {})}
            return cellxgene_census.open_soma(uri=source["uri"], tiledb_config=config)
        return cellxgene_census.open_soma(census_version=source["census_version"], tiledb_config=tiledb_config)
    except Exception as e:  # noqa: BLE001
        raise IngestError(f"--census-version {source['census_version']}: cannot open the public Census "
                          f"({type(e).__name__}: {e}). Offline? Use --census-uri with a local copy") from e


def experiment_of(census: soma.Collection, organism: str, where: str) -> soma.Experiment:
    """The organism's Experiment, checked for the Census layout the worker relies on."""
    name = cs.organism_experiment_name(organism)
    hint = ("it is not in Census layout (census_data/<organism> Experiment with measurement RNA, X layer raw). "
            "Write one with `ingest build-census --h5ad FILE --out PATH`")
    if cs.CENSUS_DATA not in census:
        raise IngestError(f"{where}: no '{cs.CENSUS_DATA}' collection; {hint}")
    data = census[cs.CENSUS_DATA]
    if name not in data:
        raise IngestError(f"{where}: no organism {organism!r} ({name}); it has {sorted(data.keys())}. "
                          "Pass one of those with --organism")
    exp = data[name]
    if not isinstance(exp, soma.Experiment) or "RNA" not in exp.ms or "raw" not in exp.ms["RNA"].X:
        raise IngestError(f"{where}: {cs.CENSUS_DATA}/{name} lacks ms/RNA/X/raw; {hint}")
    obs_cols = set(exp.obs.schema.names)
    var_cols = set(exp.ms["RNA"].var.schema.names)
    missing = [c for c in cs.REQUIRED_OBS_COLUMNS if c not in obs_cols]
    missing += [f"var.{c}" for c in cs.REQUIRED_VAR_COLUMNS if c not in var_cols]
    if not var_cols & set(cs.VAR_ID_ALIASES):
        missing.append(f"var.{' or var.'.join(cs.VAR_ID_ALIASES)}")
    if missing:
        raise IngestError(f"{where}: missing Census columns {missing}; {hint}")
    return exp


def column_values(exp: soma.Experiment, column: str) -> list[str]:
    """Distinct values of a categorical obs column (enumeration values; no full scan on Census)."""
    try:
        vals = exp.obs.get_enumeration_values([column])[column]
        return sorted(str(v) for v in vals.to_pylist())
    except Exception:  # noqa: BLE001 - a plain string column: scan it (local stores only)
        tbl = exp.obs.read(column_names=[column]).concat()
        return sorted(str(v) for v in pc.unique(tbl.column(column)).to_pylist())


def _quote(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_values(exp: soma.Experiment, column: str, wanted: tuple[str, ...], flag: str) -> None:
    known = column_values(exp, column)
    bad = [w for w in wanted if w not in known]
    if bad:
        hints = {b: difflib.get_close_matches(b, known, n=3) for b in bad}
        hint = "; ".join(f"{b!r}: did you mean {h}?" if h else f"{b!r}: no close match" for b, h in hints.items())
        shown = known if len(known) <= 30 else known[:30] + ["..."]
        raise IngestError(f"{flag}: unknown {column} value(s) {bad} ({hint}). Known values: {shown}")


def _need_obs_column(exp: soma.Experiment, column: str) -> None:
    if column not in exp.obs.schema.names:
        raise IngestError(f"{cs.FILTER_OBS_COLUMNS[column]} needs obs column {column!r}, which this store lacks "
                          f"(it has {sorted(exp.obs.schema.names)}); filter with --obs-filter on a column it has, "
                          "e.g. --obs-filter \"tissue == 'blood'\"")


def build_filter(cfg: IngestConfig, exp: soma.Experiment) -> str:
    """The exact obs value filter (recorded in the manifest). Each user filter is test-parsed.

    ``--min-genes`` is applied to each cell's in-vocabulary genes in X by the workers either way;
    the obs ``nnz`` clause only saves reading cells that cannot pass, so a store without ``nnz``
    (tiledbsoma.io.from_anndata) gets the same cells without it."""
    parts: list[str] = []
    if not cfg.include_non_primary:
        _need_obs_column(exp, "is_primary_data")
        parts.append("is_primary_data == True")
    for column, values, flag in (("tissue_general", cfg.tissues, "--tissue"), ("disease", cfg.diseases, "--disease"),
                                 ("assay", cfg.assays, "--assay")):
        if values:
            _need_obs_column(exp, column)
            _check_values(exp, column, values, flag)
            parts.append(f"{column} in [{', '.join(_quote(v) for v in values)}]")
    for f in cfg.obs_filters:
        _try_filter(exp, f, f"--obs-filter {f!r}")
        parts.append(f"({f})")
    if cfg.min_genes > 0:
        if "nnz" in exp.obs.schema.names:
            parts.append(f"nnz >= {int(cfg.min_genes)}")
        else:
            log.info("obs has no nnz column (a store written by tiledbsoma.io.from_anndata?): --min-genes %d is "
                     "applied from X by the workers", cfg.min_genes)
    full = " and ".join(parts)
    if full:
        _try_filter(exp, full, "the combined filter")
    return full


def _try_filter(exp: soma.Experiment, value_filter: str, what: str) -> None:
    try:
        exp.obs.read(coords=(slice(0, 0),), column_names=["soma_joinid"], value_filter=value_filter).concat()
    except Exception as e:  # noqa: BLE001 - tiledbsoma raises SOMAError / ValueError / TypeError on bad filters
        msg = str(e).split("\n")[0]
        raise IngestError(f"{what} does not parse or names an unknown column ({msg}). Use SOMA value-filter "
                          "syntax, e.g. \"cell_type == 'B cell' and nnz > 500\"") from e


def query_joinids(exp: soma.Experiment, value_filter: str) -> np.ndarray:
    """(n,) int64 sorted soma_joinids of the cells passing ``value_filter``."""
    it = exp.obs.read(column_names=["soma_joinid"], value_filter=value_filter or None)
    parts = [t.column("soma_joinid").to_numpy() for t in it]
    ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    ids.sort()
    return ids


def dataset_refs(census: soma.Collection, exp: soma.Experiment, joinids: np.ndarray) -> list[dict]:
    """Per source dataset of ``joinids``: id, title, collection, h5ad path (``census_info/datasets``)
    and the number of cells, largest first. A store without a datasets table gives ids only."""
    if "dataset_id" not in exp.obs.schema.names:  # one dataset, e.g. a from_anndata store of one h5ad
        name = Path(str(census.uri).rstrip("/")).name
        return [{"dataset_id": name, "title": name, "collection_name": "", "h5ad_path": "",
                 "n_cells": int(joinids.size)}]
    ids: list[np.ndarray] = []
    for t in exp.obs.read(coords=(joinids,), column_names=["dataset_id"]):
        ids.append(np.asarray(t.column("dataset_id").to_pylist(), dtype=object))
    found, counts = np.unique(np.concatenate(ids) if ids else np.zeros(0, object), return_counts=True)
    meta: dict[str, dict] = {}
    try:
        tbl = census[cs.CENSUS_INFO][cs.DATASETS].read(
            column_names=["dataset_id", "dataset_title", "collection_name", "dataset_h5ad_path"]).concat().to_pylist()
        meta = {r["dataset_id"]: r for r in tbl}
    except Exception:  # noqa: BLE001 - census_info is informative only
        pass
    out = [{"dataset_id": str(d), "title": str(meta.get(d, {}).get("dataset_title") or ""),
            "collection_name": str(meta.get(d, {}).get("collection_name") or ""),
            "h5ad_path": str(meta.get(d, {}).get("dataset_h5ad_path") or ""), "n_cells": int(n)}
           for d, n in zip(found, counts)]
    return sorted(out, key=lambda r: (-r["n_cells"], r["dataset_id"]))


def var_table(exp: soma.Experiment) -> pa.Table:
    """(soma_joinid, feature_id, feature_name) of the store's genes. feature_id is the first of
    ``VAR_ID_ALIASES`` present (GENCODE version stripped: ``shardset.genes``); feature_name falls
    back to the id where the store has no symbols."""
    names = exp.ms["RNA"].var.schema.names
    id_col = next(c for c in cs.VAR_ID_ALIASES if c in names)
    cols = ["soma_joinid", id_col, *(["feature_name"] if "feature_name" in names else [])]
    tbl = exp.ms["RNA"].var.read(column_names=cols).concat()
    ids = [gene_key(str(g)) for g in tbl.column(id_col).to_pylist()]
    syms = tbl.column("feature_name") if "feature_name" in names else pa.array(ids, pa.large_string())
    return pa.table({"soma_joinid": tbl.column("soma_joinid"), "feature_id": pa.array(ids, pa.large_string()),
                     "feature_name": syms})


def pin_release(source: dict, census: soma.Collection) -> dict:
    """For a public release, record what ``--census-version`` resolved to (the release build, the
    store URI and its S3 region) so that every worker, and a resumed run, reads that exact release
    even when an alias such as ``stable`` moves on, and no worker queries the release directory."""
    if source["kind"] != "census" or source.get("uri"):
        return source
    import cellxgene_census

    description = cellxgene_census.get_census_version_description(source["census_version"])
    region = census.context.tiledb_config.get("vfs.s3.region") if census.context else None
    return {**source, "release_build": description.get("release_build"), "uri": census.uri,
            "s3_region": region if str(census.uri).startswith("s3://") else None}


def store_identity(census: soma.Collection) -> dict:
    """A few summary values that change when the store is rebuilt with other data."""
    out: dict = {}
    try:
        tbl = census[cs.CENSUS_INFO][cs.SUMMARY].read().concat().to_pydict()
        for label, value in zip(tbl["label"], tbl["value"]):
            if label in ("census_build_date", "census_schema_version", "total_cell_count"):
                out[label] = value
    except Exception:  # noqa: BLE001 - census_info is informative only
        pass
    return out
