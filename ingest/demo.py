"""`ingest build-demo`: the demo atlas, a small store in Census layout built from shipped data.

Contents (soma_joinid order):
  * pbmc3k (2,700 real PBMCs, 10x 3' v1, blood) with its 9 annotated cell types;
  * symphony PBMCs (1,500 real cells, blood), one dataset per batch (10x 3' v1, 3' v2, 5' v1);
  * the Kang et al. 2018 IFN-beta PBMCs (2,000 real cells, blood, 10x 3' v1; control and
    IFN-beta stimulated, no cell-type labels), one dataset per condition;
  * the RNA of the two 10x CITE-seq PBMC files (200 real cells each, 10x 3' v3, no labels);
  * 300 pbmc3k cells again as a second submission with ``is_primary_data == False`` (the
    duplicates Census carries across collections, which primary-only ingest must skip);
  * 400 lung and 400 brain cells, SYNTHETIC (labelled so in dataset title and collection), so
    that ``--tissue blood`` really filters something.

var is pbmc3k's 32,738 genes (Ensembl ids, hg19); the other sets' symbols are mapped through the
shipped symbol table (unmapped ones are dropped and counted in the log).

Every real PBMC set with a whole transcriptome is here, so that a pretraining corpus can be chosen
from the atlas with a query; ``HELD_OUT_FILTER`` is the query that keeps the symphony PBMCs (the
labelled set with a cross-chemistry query batch) out of pretraining, for evaluation.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import anndata as ad
import scipy.sparse as sp
import numpy as np
import pandas as pd

from ingest import census_schema as cs
from ingest.build_census import DATA_DIR, _column_map, remap_columns, resolve_genes
from ingest.store_writer import CensusStoreWriter, DatasetInfo
from ingest.synth import CellSampler

log = logging.getLogger(__name__)

PBMC3K = DATA_DIR / "pbmc3k_counts_celltype.h5ad"
SYMPHONY = DATA_DIR / "symphony_pbmc_3batch_counts.h5ad"
KANG = DATA_DIR / "kang_ifnb_ctrl_stim_counts.h5ad"
CITE = {"10k": DATA_DIR / "pbmc_10k_protein_v3.h5ad", "5k": DATA_DIR / "pbmc_5k_protein_v3.h5ad"}
N_KANG, N_CITE = 2000, 400
# the ingest query that keeps the symphony PBMCs out of pretraining (they are evaluated on)
HELD_OUT_DATASETS = tuple(f"symphony-pbmc-{b}" for b in ("3pv1", "3pv2", "5p"))
HELD_OUT_FILTER = "dataset_id not in [" + ", ".join(f"'{d}'" for d in HELD_OUT_DATASETS) + "]"

# source label -> (Census cell_type, Cell Ontology id)
PBMC3K_TYPES = {
    "Naive CD4 T": ("naive thymus-derived CD4-positive, alpha-beta T cell", "CL:0000895"),
    "Memory CD4 T": ("CD4-positive, alpha-beta memory T cell", "CL:0000897"),
    "CD14+ Mono": ("CD14-positive monocyte", "CL:0001054"),
    "B": ("B cell", "CL:0000236"),
    "CD8 T": ("CD8-positive, alpha-beta T cell", "CL:0000625"),
    "FCGR3A+ Mono": ("CD14-low, CD16-positive monocyte", "CL:0002396"),
    "NK": ("natural killer cell", "CL:0000623"),
    "DC": ("dendritic cell", "CL:0000451"),
    "Platelet": ("platelet", "CL:0000233"),
}
SYMPHONY_TYPES = {
    "T_CD4": ("CD4-positive, alpha-beta T cell", "CL:0000624"),
    "T_CD8": ("CD8-positive, alpha-beta T cell", "CL:0000625"),
    "Mono_CD14": ("CD14-positive monocyte", "CL:0001054"),
    "Mono_CD16": ("CD14-low, CD16-positive monocyte", "CL:0002396"),
    "B": ("B cell", "CL:0000236"),
    "NK": ("natural killer cell", "CL:0000623"),
    "DC": ("dendritic cell", "CL:0000451"),
    "MK": ("megakaryocyte", "CL:0000556"),
    "HSC": ("hematopoietic stem cell", "CL:0000037"),
}
SYMPHONY_ASSAYS = {"3pv1": "10x 3' v1", "3pv2": "10x 3' v2", "5p": "10x 5' v1"}
SYNTH_TISSUES = {
    "lung": ("type II pneumocyte", "alveolar macrophage", "ciliated cell"),
    "brain": ("astrocyte", "oligodendrocyte", "neuron"),
}
N_DUPLICATES = 300
N_SYNTH_PER_TISSUE = 400


def _blood_obs(labels: pd.Series, table: dict[str, tuple[str, str]], assay: str, donor: str,
               barcodes: pd.Index) -> pd.DataFrame:
    mapped = [table.get(str(x), ("unknown", "unknown")) if pd.notna(x) else ("unknown", "unknown") for x in labels]
    return pd.DataFrame({
        "cell_type": [m[0] for m in mapped], "cell_type_ontology_term_id": [m[1] for m in mapped],
        "assay": assay, "assay_ontology_term_id": cs.ONTOLOGY["assay"][assay],
        "tissue": "blood", "tissue_ontology_term_id": cs.ONTOLOGY["tissue"]["blood"],
        "tissue_general": "blood", "tissue_general_ontology_term_id": cs.ONTOLOGY["tissue"]["blood"],
        "disease": "normal", "disease_ontology_term_id": "PATO:0000461",
        "development_stage": "adult stage", "development_stage_ontology_term_id": "HsapDv:0000258",
        "donor_id": donor, "suspension_type": "cell", "observation_joinid": [str(b) for b in barcodes],
    })


def _append_by_symbol(writer: CensusStoreWriter, part: ad.AnnData, obs: pd.DataFrame, index: dict[str, int],
                      n_var: int, info: DatasetInfo) -> None:
    """Append a symbol-keyed dataset: genes mapped to the atlas var, unmapped ones dropped (logged)."""
    m = resolve_genes(part.var)
    log.info("%s: %d of %d genes mapped to Ensembl ids", info.dataset_id, part.n_vars - m.n_unmapped, part.n_vars)
    col_map = _column_map(m, index)
    measured = np.zeros(n_var, dtype=bool)
    measured[col_map[col_map >= 0]] = True
    writer.append(obs, remap_columns(sp.csr_matrix(part.X), col_map, n_var), info, measured)


def existing_demo(out: str | Path) -> bool:
    """True when ``out`` already holds a complete demo atlas (so re-running the demo is cheap)."""
    out = Path(out)
    if not (out / cs.CENSUS_INFO / cs.SUMMARY).exists():
        return False
    try:
        import tiledbsoma as soma

        with soma.open(str(out / cs.CENSUS_INFO / cs.SUMMARY)) as df:
            tbl = df.read().concat().to_pydict()
        summary = dict(zip(tbl["label"], tbl["value"]))
        with soma.open(str(out / cs.CENSUS_DATA / "homo_sapiens" / "obs")) as obs:
            n = sum(t.num_rows for t in obs.read(column_names=["soma_joinid"]))
    except Exception:  # noqa: BLE001 - anything unreadable is not a finished demo atlas
        return False
    expected = 2700 + 1500 + N_KANG + N_CITE + N_DUPLICATES + N_SYNTH_PER_TISSUE * len(SYNTH_TISSUES)
    return summary.get("build_note", "").startswith("demo atlas") and n == expected == int(summary["total_cell_count"])


def build_demo(out: str | Path, seed: int = 0, *, reuse: bool = False) -> Path:
    """Write the demo atlas to ``out``. With ``reuse``, an existing complete demo atlas is kept."""
    if reuse and existing_demo(out):
        log.info("build-demo: %s already holds the demo atlas; keeping it (delete it to rebuild)", out)
        return Path(out)
    pbmc = ad.read_h5ad(PBMC3K)
    sym = ad.read_h5ad(SYMPHONY)
    m_pbmc = resolve_genes(pbmc.var)
    var = pd.DataFrame({"feature_id": m_pbmc.feature_id, "feature_name": m_pbmc.feature_name})
    index = {f: i for i, f in enumerate(var["feature_id"])}
    n_var = len(var)
    m_sym = resolve_genes(sym.var)
    log.info("symphony: %d of %d genes mapped to Ensembl ids (%d dropped, e.g. %s)", sym.n_vars - m_sym.n_unmapped,
             sym.n_vars, m_sym.n_unmapped, ", ".join(m_sym.unmapped_examples[:5]))
    sym_map = _column_map(m_sym, index)
    sym_measured = np.zeros(n_var, dtype=bool)
    sym_measured[sym_map[sym_map >= 0]] = True

    rng = np.random.default_rng(seed)
    dup_idx = np.sort(rng.choice(pbmc.n_obs, N_DUPLICATES, replace=False))
    kang = ad.read_h5ad(KANG)
    cite = {k: ad.read_h5ad(f) for k, f in CITE.items()}
    n_total = (pbmc.n_obs + sym.n_obs + kang.n_obs + sum(c.n_obs for c in cite.values()) + N_DUPLICATES
               + N_SYNTH_PER_TISSUE * len(SYNTH_TISSUES))
    writer = CensusStoreWriter(out, var, n_total, build_note="demo atlas from `ingest build-demo`: real pbmc3k, "
                               "symphony, Kang IFN-b and CITE-seq PBMCs (blood) + SYNTHETIC lung/brain cells "
                               "+ non-primary duplicates")
    try:
        obs = _blood_obs(pbmc.obs["celltype"], PBMC3K_TYPES, "10x 3' v1", "pbmc3k-donor", pbmc.obs_names)
        writer.append(obs, pbmc.X, DatasetInfo(
            dataset_id="pbmc3k", title="3k PBMCs from a healthy donor (10x Genomics), Seurat tutorial labels",
            collection_name="10x Genomics public datasets", h5ad_path=PBMC3K.name))
        for batch, assay in SYMPHONY_ASSAYS.items():
            sel = np.flatnonzero(sym.obs["batch"].astype(str).to_numpy() == batch)
            part = sym[sel]
            obs = _blood_obs(part.obs["celltype"], SYMPHONY_TYPES, assay, f"symphony-donor-{batch}", part.obs_names)
            writer.append(obs, remap_columns(part.X, sym_map, n_var), DatasetInfo(
                dataset_id=f"symphony-pbmc-{batch}", title=f"Symphony PBMC reference, batch {batch}",
                collection_name="immunogenomics/symphony PBMCs", h5ad_path=SYMPHONY.name), sym_measured)
        for cond in ("ctrl", "stim"):
            part = kang[kang.obs["condition"].astype(str).to_numpy() == cond]
            obs = _blood_obs(pd.Series([None] * part.n_obs), {}, "10x 3' v1", f"kang-{cond}", part.obs_names)
            _append_by_symbol(writer, part, obs, index, n_var, DatasetInfo(
                dataset_id=f"kang-ifnb-{cond}", title=f"Kang et al. 2018 PBMCs, {cond} (IFN-beta stimulation study)",
                collection_name="immunogenomics/harmony pbmc_stim", h5ad_path=KANG.name))
        for tag, part in cite.items():
            obs = _blood_obs(pd.Series([None] * part.n_obs), {}, "10x 3' v3", f"cite-{tag}-donor", part.obs_names)
            _append_by_symbol(writer, part, obs, index, n_var, DatasetInfo(
                dataset_id=f"pbmc-cite-{tag}", title=f"10x CITE-seq PBMC {tag} (RNA only), 200 cells",
                collection_name="10x Genomics CITE-seq PBMCs (scvi-tools test data)", h5ad_path=CITE[tag].name))
        dup = pbmc[dup_idx]
        obs = _blood_obs(dup.obs["celltype"], PBMC3K_TYPES, "10x 3' v1", "pbmc3k-donor", dup.obs_names)
        obs["is_primary_data"] = False
        writer.append(obs, dup.X, DatasetInfo(
            dataset_id="pbmc3k-resubmission", title="pbmc3k cells submitted again (non-primary duplicates)",
            collection_name="duplicate submission (demo)", h5ad_path=PBMC3K.name))
        programs = [f"{t}|{c}" for t, cts in SYNTH_TISSUES.items() for c in cts]
        sampler = CellSampler(n_var, programs, rng, mean_genes=900.0)
        for tissue, cts in SYNTH_TISSUES.items():
            labels = np.sort(rng.integers(0, len(cts), N_SYNTH_PER_TISSUE))

            X = sp.vstack([sampler.sample(f"{tissue}|{cts[k]}", int((labels == k).sum())) for k in range(len(cts))],
                          format="csr")
            obs = pd.DataFrame({
                "cell_type": np.asarray(cts, dtype=object)[labels], "tissue": tissue, "tissue_general": tissue,
                "tissue_ontology_term_id": cs.ONTOLOGY["tissue"][tissue],
                "tissue_general_ontology_term_id": cs.ONTOLOGY["tissue"][tissue],
                "assay": "10x 3' v3", "assay_ontology_term_id": cs.ONTOLOGY["assay"]["10x 3' v3"],
                "donor_id": f"synthetic-{tissue}-donor",
            })
            writer.append(obs, X, DatasetInfo(
                dataset_id=f"synthetic-{tissue}", title=f"SYNTHETIC {tissue} cells (not real data)",
                collection_name="SYNTHETIC (demo atlas)"))
        writer.close()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return Path(out)
