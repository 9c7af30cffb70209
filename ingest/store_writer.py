"""Write a SOMA store in Census layout, chunk by chunk (used by build-census, synth-census, build-demo).

    writer = CensusStoreWriter(uri, var, n_obs)     # creates every object; X shape (n_obs, n_var)
    writer.append(obs_df, X_csr, dataset, measured) # rows get the next soma_joinids
    writer.close()                                  # var nnz / n_measured_obs, census_info

Memory stays bounded by the chunk the caller passes in: per-gene statistics are accumulated
in (n_var,) arrays and the category counts for ``summary_cell_counts`` in small dicts.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from ingest import census_schema as cs
from ingest.errors import IngestError
from shardset.counts import NEGATIVE, NONFINITE, first_bad_count

log = logging.getLogger(__name__)

_COUNT_CATEGORIES = ("assay", "cell_type", "disease", "self_reported_ethnicity", "sex", "suspension_type",
                     "tissue", "tissue_general")


@dataclass(kw_only=True, slots=True)
class DatasetInfo:
    """One source dataset (one row of census_info/datasets)."""

    dataset_id: str
    title: str
    collection_name: str = "local collection"
    collection_id: str = "local"
    h5ad_path: str = ""
    citation: str = ""
    doi: str = ""


def check_counts(data: np.ndarray, where: str) -> None:
    """Raw counts only (``shardset.counts``: finite, non-negative integers; binning and training
    assume UMI counts). Names the first bad value and the fix."""
    bad = first_bad_count(data)
    if bad is None:
        return
    if bad.kind == NONFINITE:
        fix = "Pass raw counts; drop or repair those cells first."
    elif bad.kind == NEGATIVE:
        fix = "Pass the raw count matrix (e.g. --layer counts), not scaled or centred data."
    else:
        fix = "Pass the raw count matrix (e.g. --layer counts or adata.raw), not normalised data."
    raise IngestError(f"{where}: the matrix has {bad.kind} values (e.g. {bad.value!r}); expected raw counts. {fix}")


def _dict_array(values: pd.Series | np.ndarray) -> pa.DictionaryArray:
    return pa.array(np.asarray(values, dtype=object).astype(str)).dictionary_encode().cast(
        pa.dictionary(pa.int32(), pa.large_string()))


class CensusStoreWriter:
    """Creates the Census layout at ``uri`` and appends cells in chunks."""

    def __init__(self, uri: str | Path, var: pd.DataFrame, n_obs: int, *, organism: str = "Homo sapiens",
                 build_note: str = "") -> None:
        self.uri = str(uri)
        path = Path(self.uri)
        if path.exists() and any(path.iterdir()):
            raise IngestError(f"--out {path} already exists and is not empty; choose a new path or delete it first")
        if n_obs <= 0:
            raise IngestError("no cells to write: the inputs are empty")
        for col in ("feature_id", "feature_name"):
            if col not in var:
                raise IngestError(f"var needs a {col!r} column")
        if not var["feature_id"].is_unique:
            raise IngestError("feature_id values must be unique in var")
        self.organism = organism
        self.n_obs, self.n_var = int(n_obs), len(var)
        self.build_note = build_note
        self._var = var.reset_index(drop=True)
        self._next = 0
        self._gene_nnz = np.zeros(self.n_var, dtype=np.int64)
        self._gene_measured = np.zeros(self.n_var, dtype=np.int64)
        self._datasets: dict[str, tuple[DatasetInfo, int]] = {}
        self._counts: dict[str, Counter] = {c: Counter() for c in _COUNT_CATEGORIES}
        self._unique: dict[str, Counter] = {c: Counter() for c in _COUNT_CATEGORIES}
        self._donors: set[str] = set()
        self._n_primary = 0
        self._closed = False
        try:
            self._create()
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
            raise

    # layout -------------------------------------------------------------------------------
    def _create(self) -> None:
        root = soma.Collection.create(self.uri)
        info = root.add_new_collection(cs.CENSUS_INFO)
        data = root.add_new_collection(cs.CENSUS_DATA)
        exp = data.add_new_collection(cs.organism_experiment_name(self.organism), soma.Experiment)
        exp.add_new_dataframe("obs", schema=cs.OBS_SCHEMA, index_column_names=["soma_joinid"],
                              domain=[(0, self.n_obs - 1)]).close()
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(cs.MEASUREMENT, soma.Measurement)
        rna.add_new_dataframe("var", schema=cs.VAR_SCHEMA, index_column_names=["soma_joinid"],
                              domain=[(0, self.n_var - 1)]).close()
        X = rna.add_new_collection("X")
        X.add_new_sparse_ndarray(cs.X_LAYER, type=pa.float32(), shape=(self.n_obs, self.n_var)).close()
        for obj in (X, rna, ms, exp, data, info, root):
            obj.close()

    # appending ----------------------------------------------------------------------------
    def append(self, obs: pd.DataFrame, X: sp.csr_matrix, dataset: DatasetInfo,
               measured: np.ndarray | None = None) -> np.ndarray:
        """Append ``len(obs)`` cells; ``X`` is (cells, n_var) raw counts in this store's var order.

        obs may hold any of the Census categorical columns (others get their defaults) plus
        ``is_primary_data`` and ``observation_joinid``. ``measured`` (n_var,) bool marks the
        genes this dataset measured (default: all). Returns the soma_joinids assigned.
        """
        X = sp.csr_matrix(X, dtype=np.float32)
        n = X.shape[0]
        if X.shape[1] != self.n_var or len(obs) != n:
            raise IngestError(f"chunk shape mismatch: X {X.shape}, obs {len(obs)}, var {self.n_var}")
        if self._next + n > self.n_obs:
            raise IngestError(f"more cells than declared: {self._next + n} > {self.n_obs}")
        X.eliminate_zeros()
        X.sort_indices()
        check_counts(X.data, f"dataset {dataset.dataset_id!r}")
        measured = np.ones(self.n_var, dtype=bool) if measured is None else np.asarray(measured, dtype=bool)
        joinids = np.arange(self._next, self._next + n, dtype=np.int64)

        # obs: Census columns, defaults where the source lacks one, per-cell QC stats
        nnz = np.diff(X.indptr).astype(np.int64)
        raw_sum = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
        sq = np.asarray(X.multiply(X).sum(axis=1)).ravel().astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_nnz = np.where(nnz > 0, raw_sum / np.maximum(nnz, 1), 0.0)
            var_nnz = np.where(nnz > 1, (sq - nnz * mean_nnz**2) / np.maximum(nnz - 1, 1), 0.0)
        cols: dict[str, pa.Array] = {"soma_joinid": pa.array(joinids)}
        obs = obs.reset_index(drop=True)
        for c, default in cs.OBS_CATEGORICAL_DEFAULTS.items():
            vals = obs[c].astype(object).where(obs[c].notna(), default) if c in obs else np.full(n, default, object)
            cols[c] = _dict_array(vals)
        cols["dataset_id"] = _dict_array(np.full(n, dataset.dataset_id, object))
        primary = obs["is_primary_data"].astype(bool).to_numpy() if "is_primary_data" in obs else np.ones(n, bool)
        cols["is_primary_data"] = pa.array(primary)
        obs_ids = (obs["observation_joinid"].astype(str).to_numpy() if "observation_joinid" in obs
                   else np.array([f"{dataset.dataset_id[:8]}-{i}" for i in range(n)], dtype=object))
        cols["observation_joinid"] = pa.array(obs_ids, pa.large_string())
        cols["raw_sum"] = pa.array(raw_sum)
        cols["nnz"] = pa.array(nnz)
        cols["raw_mean_nnz"] = pa.array(mean_nnz)
        cols["raw_variance_nnz"] = pa.array(var_nnz)
        cols["n_measured_vars"] = pa.array(np.full(n, int(measured.sum()), dtype=np.int64))
        obs_tbl = pa.table(cols, schema=cs.OBS_SCHEMA)

        coo = X.tocoo()
        x_tbl = pa.table({"soma_dim_0": pa.array(coo.row.astype(np.int64) + self._next),
                          "soma_dim_1": pa.array(coo.col.astype(np.int64)),
                          "soma_data": pa.array(coo.data.astype(np.float32))})
        with soma.open(self._exp_uri("obs"), "w") as df:
            df.write(obs_tbl)
        if x_tbl.num_rows:
            with soma.open(self._exp_uri("ms", cs.MEASUREMENT, "X", cs.X_LAYER), "w") as arr:
                arr.write(x_tbl)

        # running statistics for var and census_info
        self._gene_nnz += np.bincount(X.indices, minlength=self.n_var)
        self._gene_measured += measured.astype(np.int64) * n
        info, count = self._datasets.get(dataset.dataset_id, (dataset, 0))
        self._datasets[dataset.dataset_id] = (info, count + n)
        tbl = obs_tbl.select(list(_COUNT_CATEGORIES) + ["donor_id"]).to_pandas()
        for c in _COUNT_CATEGORIES:
            self._counts[c].update(tbl[c].astype(str).tolist())
            self._unique[c].update(tbl[c][primary].astype(str).tolist())
        self._donors.update(tbl["donor_id"].astype(str).unique().tolist())
        self._n_primary += int(primary.sum())
        self._next += n
        return joinids

    def _exp_uri(self, *parts: str) -> str:
        return str(Path(self.uri, cs.CENSUS_DATA, cs.organism_experiment_name(self.organism), *parts))

    # closing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        if self._next != self.n_obs:
            raise IngestError(f"declared {self.n_obs} cells but wrote {self._next}")
        v = self._var
        var_tbl = pa.table({
            "soma_joinid": pa.array(np.arange(self.n_var, dtype=np.int64)),
            "feature_id": pa.array(v["feature_id"].astype(str).tolist(), pa.large_string()),
            "feature_name": pa.array(v["feature_name"].astype(str).tolist(), pa.large_string()),
            "feature_type": pa.array(v.get("feature_type", pd.Series(["gene"] * self.n_var)).astype(str).tolist(),
                                     pa.large_string()),
            "feature_length": pa.array(v.get("feature_length", pd.Series(np.zeros(self.n_var, np.int64)))
                                       .to_numpy().astype(np.int64)),
            "nnz": pa.array(self._gene_nnz),
            "n_measured_obs": pa.array(self._gene_measured),
        }, schema=cs.VAR_SCHEMA)
        with soma.open(self._exp_uri("ms", cs.MEASUREMENT, "var"), "w") as df:
            df.write(var_tbl)
        self._write_census_info()
        self._closed = True
        log.info("wrote %s: %d cells (%d primary) x %d genes, %d datasets", self.uri, self.n_obs,
                 self._n_primary, self.n_var, len(self._datasets))

    def _write_census_info(self) -> None:
        info_uri = str(Path(self.uri, cs.CENSUS_INFO))
        org = cs.organism_experiment_name(self.organism)
        summary = [
            ("census_schema_version", cs.CENSUS_SCHEMA_VERSION),
            ("census_build_date", _dt.date.today().isoformat()),
            ("dataset_schema_version", cs.DATASET_SCHEMA_VERSION),
            ("total_cell_count", str(self.n_obs)),
            ("unique_cell_count", str(self._n_primary)),
            (f"number_donors_{org}", str(len(self._donors))),
            ("build_note", self.build_note or "local store in Census layout written by `ingest`"),
        ]
        ds = [d for d, _ in self._datasets.values()]
        counts = [c for _, c in self._datasets.values()]
        ds_tbl = pa.table({
            "soma_joinid": pa.array(np.arange(len(ds), dtype=np.int64)),
            "citation": pa.array([d.citation for d in ds], pa.large_string()),
            "collection_id": pa.array([d.collection_id for d in ds], pa.large_string()),
            "collection_name": pa.array([d.collection_name for d in ds], pa.large_string()),
            "collection_doi": pa.array([d.doi for d in ds], pa.large_string()),
            "collection_doi_label": pa.array([d.doi for d in ds], pa.large_string()),
            "dataset_id": pa.array([d.dataset_id for d in ds], pa.large_string()),
            "dataset_version_id": pa.array([d.dataset_id for d in ds], pa.large_string()),
            "dataset_title": pa.array([d.title for d in ds], pa.large_string()),
            "dataset_h5ad_path": pa.array([d.h5ad_path for d in ds], pa.large_string()),
            "dataset_total_cell_count": pa.array(np.asarray(counts, dtype=np.int64)),
        }, schema=cs.DATASETS_SCHEMA)
        rows = [(self.organism, "all", "na", self._n_primary, self.n_obs, "na")]
        for c in _COUNT_CATEGORIES:
            for label, total in sorted(self._counts[c].items()):
                term = _ontology(c, label)
                rows.append((self.organism, c, term, self._unique[c].get(label, 0), total, label))
        scc = pa.table({
            "soma_joinid": pa.array(np.arange(len(rows), dtype=np.int64)),
            "organism": pa.array([r[0] for r in rows], pa.large_string()),
            "category": pa.array([r[1] for r in rows], pa.large_string()),
            "ontology_term_id": pa.array([r[2] for r in rows], pa.large_string()),
            "unique_cell_count": pa.array([r[3] for r in rows], pa.int64()),
            "total_cell_count": pa.array([r[4] for r in rows], pa.int64()),
            "label": pa.array([r[5] for r in rows], pa.large_string()),
        }, schema=cs.SUMMARY_CELL_COUNTS_SCHEMA)
        sm = pa.table({
            "soma_joinid": pa.array(np.arange(len(summary), dtype=np.int64)),
            "label": pa.array([s[0] for s in summary], pa.large_string()),
            "value": pa.array([s[1] for s in summary], pa.large_string()),
        }, schema=cs.SUMMARY_SCHEMA)
        with soma.Collection.open(info_uri, "w") as info:
            for name, schema, tbl in ((cs.SUMMARY, cs.SUMMARY_SCHEMA, sm), (cs.DATASETS, cs.DATASETS_SCHEMA, ds_tbl),
                                      (cs.SUMMARY_CELL_COUNTS, cs.SUMMARY_CELL_COUNTS_SCHEMA, scc)):
                df = info.add_new_dataframe(name, schema=schema, index_column_names=["soma_joinid"],
                                            domain=[(0, max(tbl.num_rows - 1, 0))])
                df.write(tbl)
                df.close()


def _ontology(category: str, label: str) -> str:
    table = cs.ONTOLOGY.get("tissue" if category == "tissue_general" else category, {})
    return table.get(label, "na")
