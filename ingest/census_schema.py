"""The Census layout, written down once: object names, obs/var columns and their Arrow types.

Mirrors the public CELLxGENE Census (schema 5.x): a root Collection with ``census_info``
(``summary``, ``datasets``, ``summary_cell_counts``) and ``census_data/<organism>`` Experiments,
each with ``obs``, measurement ``RNA`` holding ``var`` and the ``X`` layer ``raw``. Categorical
obs columns are dictionary-encoded (TileDB enumerations), as in the real Census.
"""

from __future__ import annotations

import pyarrow as pa

CENSUS_INFO = "census_info"
CENSUS_DATA = "census_data"
SUMMARY = "summary"
DATASETS = "datasets"
SUMMARY_CELL_COUNTS = "summary_cell_counts"
MEASUREMENT = "RNA"
X_LAYER = "raw"
CENSUS_SCHEMA_VERSION = "5.2.0"  # the Census schema this layout follows
DATASET_SCHEMA_VERSION = "5.2.0"

_DICT = pa.dictionary(pa.int32(), pa.large_string())

# Categorical obs columns (dictionary-encoded), with the value used where a source lacks one.
OBS_CATEGORICAL_DEFAULTS: dict[str, str] = {
    "dataset_id": "unknown",
    "assay": "unknown",
    "assay_ontology_term_id": "unknown",
    "cell_type": "unknown",
    "cell_type_ontology_term_id": "unknown",
    "development_stage": "unknown",
    "development_stage_ontology_term_id": "unknown",
    "disease": "normal",
    "disease_ontology_term_id": "PATO:0000461",
    "donor_id": "unknown",
    "self_reported_ethnicity": "unknown",
    "self_reported_ethnicity_ontology_term_id": "unknown",
    "sex": "unknown",
    "sex_ontology_term_id": "unknown",
    "suspension_type": "cell",
    "tissue": "unknown",
    "tissue_ontology_term_id": "unknown",
    "tissue_type": "tissue",
    "tissue_general": "unknown",
    "tissue_general_ontology_term_id": "unknown",
}

OBS_SCHEMA = pa.schema(
    [
        pa.field("soma_joinid", pa.int64(), nullable=False),
        *[pa.field(c, _DICT) for c in OBS_CATEGORICAL_DEFAULTS],
        pa.field("is_primary_data", pa.bool_()),
        pa.field("observation_joinid", pa.large_string()),
        pa.field("raw_sum", pa.float64()),
        pa.field("nnz", pa.int64()),
        pa.field("raw_mean_nnz", pa.float64()),
        pa.field("raw_variance_nnz", pa.float64()),
        pa.field("n_measured_vars", pa.int64()),
    ]
)

VAR_SCHEMA = pa.schema(
    [
        pa.field("soma_joinid", pa.int64(), nullable=False),
        pa.field("feature_id", pa.large_string()),
        pa.field("feature_name", pa.large_string()),
        pa.field("feature_type", pa.large_string()),
        pa.field("feature_length", pa.int64()),
        pa.field("nnz", pa.int64()),
        pa.field("n_measured_obs", pa.int64()),
    ]
)

DATASETS_SCHEMA = pa.schema(
    [
        pa.field("soma_joinid", pa.int64(), nullable=False),
        pa.field("citation", pa.large_string()),
        pa.field("collection_id", pa.large_string()),
        pa.field("collection_name", pa.large_string()),
        pa.field("collection_doi", pa.large_string()),
        pa.field("collection_doi_label", pa.large_string()),
        pa.field("dataset_id", pa.large_string()),
        pa.field("dataset_version_id", pa.large_string()),
        pa.field("dataset_title", pa.large_string()),
        pa.field("dataset_h5ad_path", pa.large_string()),
        pa.field("dataset_total_cell_count", pa.int64()),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("soma_joinid", pa.int64(), nullable=False),
        pa.field("label", pa.large_string()),
        pa.field("value", pa.large_string()),
    ]
)

SUMMARY_CELL_COUNTS_SCHEMA = pa.schema(
    [
        pa.field("soma_joinid", pa.int64(), nullable=False),
        pa.field("organism", pa.large_string()),
        pa.field("category", pa.large_string()),
        pa.field("ontology_term_id", pa.large_string()),
        pa.field("unique_cell_count", pa.int64()),
        pa.field("total_cell_count", pa.int64()),
        pa.field("label", pa.large_string()),
    ]
)

# What `ingest census` needs from a store: obs and var joinids and a gene id in var. Other obs
# columns are needed only by the option that filters on them (FILTER_OBS_COLUMNS); shard metadata
# columns a store lacks are written as "unknown". A store written by tiledbsoma.io.from_anndata
# (a CELLxGENE h5ad download) has no derived columns such as nnz, nor tissue_general / dataset_id,
# and names the var index `var_id`: it is accepted (VAR_ID_ALIASES).
REQUIRED_OBS_COLUMNS: tuple[str, ...] = ("soma_joinid",)
REQUIRED_VAR_COLUMNS: tuple[str, ...] = ("soma_joinid",)
VAR_ID_ALIASES: tuple[str, ...] = ("feature_id", "var_id")  # the first present is the gene id
FILTER_OBS_COLUMNS: dict[str, str] = {
    "tissue_general": "--tissue", "disease": "--disease", "assay": "--assay",
    "is_primary_data": "the primary-cells filter (drop it with --include-non-primary)"}

# Ontology ids for the values the demo and build-census fill in (a small, checked table).
ONTOLOGY: dict[str, dict[str, str]] = {
    "assay": {
        "10x 3' v1": "EFO:0009901",
        "10x 3' v2": "EFO:0009899",
        "10x 3' v3": "EFO:0009922",
        "10x 5' v1": "EFO:0011025",
        "unknown": "unknown",
    },
    "tissue": {
        "blood": "UBERON:0000178",
        "lung": "UBERON:0002048",
        "brain": "UBERON:0000955",
        "liver": "UBERON:0002107",
        "kidney": "UBERON:0002113",
        "heart": "UBERON:0000948",
        "unknown": "unknown",
    },
    "disease": {"normal": "PATO:0000461"},
    "sex": {"female": "PATO:0000383", "male": "PATO:0000384", "unknown": "unknown"},
}


def organism_experiment_name(organism: str) -> str:
    """'Homo sapiens' -> 'homo_sapiens', the Census experiment naming."""
    return organism.strip().lower().replace(" ", "_")
