"""End to end on the demo atlas: the store opens like the Census, the blood shards hold exactly the
filtered cells with the source counts and reference bins, a killed run resumes to the same shard set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cellxgene_census
import numpy as np
import pyarrow.parquet as pq
import pytest

from ingest.errors import IngestError
from ingest.validate import validate_shards
from scgpt_model.schema import BINS, COUNTS, GENES, OBS_COLUMNS, SOMA_JOINID, TOTAL_COUNTS
from scgpt_model.vocab import GeneVocab
from shardset import MANIFEST_FILE, Manifest, is_validation
from tests.fixtures.ingest import DEMO_SHARD_ARGS, REPO, ingest_env, run_ingest_cli
from tests.test_binning import reference_bins

BLOOD_PRIMARY = "tissue_general == 'blood' and is_primary_data == True"


# the demo atlas's primary blood cells: pbmc3k 2,700 + symphony 1,500 + Kang IFN-b 2,000 + CITE-seq RNA 400,
# in shards of 1,000 (DEMO_SHARD_ARGS)
N_BLOOD, N_SHARDS = 2700 + 1500 + 2000 + 400, 7

def _read_shards(path: Path):
    m = Manifest.load(path)
    tables = [pq.read_table(path / s.path) for s in m.shards]
    import pyarrow as pa

    return m, pa.concat_tables(tables)


def test_demo_store_opens_like_census(demo_census):
    with cellxgene_census.open_soma(uri=str(demo_census)) as census:
        assert set(census.keys()) >= {"census_info", "census_data"}
        assert {"summary", "datasets", "summary_cell_counts"} <= set(census["census_info"].keys())
        exp = census["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas()
        for col in ("soma_joinid", "dataset_id", "assay", "assay_ontology_term_id", "cell_type",
                    "cell_type_ontology_term_id", "tissue", "tissue_general", "disease", "donor_id",
                    "is_primary_data", "suspension_type", "sex", "development_stage",
                    "self_reported_ethnicity", "raw_sum", "nnz", "observation_joinid"):
            assert col in obs, col
        assert set(obs.tissue_general) == {"blood", "lung", "brain"}
        assert (~obs.is_primary_data).sum() == 300
        assert obs.soma_joinid.tolist() == list(range(len(obs)))
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        assert var.feature_id.str.startswith("ENSG").all() and var.feature_id.is_unique
        assert {"feature_name", "feature_length", "nnz", "n_measured_obs"} <= set(var.columns)
        ds = census["census_info"]["datasets"].read().concat().to_pandas()
        assert ds.dataset_total_cell_count.sum() == len(obs)
        assert ds.dataset_title.str.contains("SYNTHETIC").sum() == 2
        ad = cellxgene_census.get_anndata(census, "Homo sapiens", obs_value_filter=BLOOD_PRIMARY)
        assert ad.n_obs == N_BLOOD and ad.n_vars == len(var)
        # the QC columns agree with the matrix
        np.testing.assert_allclose(np.asarray(ad.X.sum(axis=1)).ravel(), ad.obs.raw_sum.to_numpy())
        np.testing.assert_array_equal(np.diff(ad.X.tocsr().indptr), ad.obs.nnz.to_numpy())


def test_blood_shards_equal_the_source(demo_census, demo_shards):
    m, table = _read_shards(demo_shards)
    vocab = GeneVocab.load(demo_shards / "vocab.json")
    with cellxgene_census.open_soma(uri=str(demo_census)) as census:
        ad = cellxgene_census.get_anndata(census, "Homo sapiens", obs_value_filter=BLOOD_PRIMARY)
    X = ad.X.tocsr()
    X.sort_indices()
    src_ids = ad.obs.soma_joinid.to_numpy()
    ids = table.column(SOMA_JOINID).to_numpy()
    # every filtered cell exactly once, no other cell
    assert len(ids) == len(set(ids)) == len(src_ids)
    assert set(ids.tolist()) == set(src_ids.tolist())
    assert m.totals.cells == N_BLOOD and len(m.shards) == N_SHARDS and m.complete
    assert "is_primary_data == True" in m.obs_filter and "tissue_general in ['blood']" in m.obs_filter
    # gene ids of the store's var in vocabulary id space
    var_vocab = vocab.encode(ad.var.feature_id.tolist())
    assert (var_vocab >= 0).all()
    row_of = {int(j): r for r, j in enumerate(src_ids)}
    genes, counts, bins = (table.column(c).to_pylist() for c in (GENES, COUNTS, BINS))
    totals = table.column(TOTAL_COUNTS).to_numpy()
    obs_cols = {c: table.column(c).to_pylist() for c in OBS_COLUMNS}
    for k, j in enumerate(ids):
        r = row_of[int(j)]
        lo, hi = X.indptr[r], X.indptr[r + 1]
        src_genes = var_vocab[X.indices[lo:hi]]
        order = np.argsort(src_genes)
        np.testing.assert_array_equal(np.asarray(genes[k]), src_genes[order])
        np.testing.assert_array_equal(np.asarray(counts[k], dtype=np.float32), X.data[lo:hi][order])
        np.testing.assert_array_equal(np.asarray(bins[k]), reference_bins(np.asarray(counts[k]), int(j),
                                                                          n_bins=m.n_bins, seed=m.seed))
        assert totals[k] == pytest.approx(X.data[lo:hi].sum())
        for c in OBS_COLUMNS:
            assert obs_cols[c][k] == str(ad.obs[c].iloc[r]), c
    # the split is the manifest's deterministic function of soma_joinid
    val = is_validation(ids, m.val_fraction, m.seed)
    assert val.sum() == m.totals.n_val and 0 < val.sum() < 0.1 * len(ids)
    assert validate_shards(demo_shards)["n_cells"] == N_BLOOD


def test_rerun_same_arguments_skips_everything(demo_census, demo_shards, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(demo_shards, out)
    before = (out / "manifest.json").read_bytes()
    vocab_mtime = (out / "vocab.json").stat().st_mtime_ns
    proc = run_ingest_cli("census", "--census-uri", str(demo_census), *DEMO_SHARD_ARGS, "--out", str(out))
    assert f"{N_SHARDS} already done" in proc.stderr
    assert (out / "vocab.json").stat().st_mtime_ns == vocab_mtime  # an unchanged vocabulary is not rewritten
    assert (out / "manifest.json").read_bytes() == before


def test_resume_after_sigkill_gives_identical_shards(demo_census, demo_shards, tmp_path):
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "ingest.cli", "census", "--census-uri", str(demo_census), *DEMO_SHARD_ARGS,
           "--out", str(out)]
    cmd[cmd.index("--num-cpus") + 1] = "1"  # one shard at a time, so the kill lands part-way
    proc = subprocess.Popen(cmd, cwd=REPO, env=ingest_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((out / "shards").glob("part-*.parquet")):
            assert proc.poll() is None, "ingest finished or failed before the kill"
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill of the driver, mid-run
        proc.wait()
    finally:
        try:  # the Ray processes this run started (same process group), so nothing leaks
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = Manifest.load(out)
    assert not killed.complete and len(killed.shards) < N_SHARDS
    with pytest.raises(IngestError, match="not complete"):
        validate_shards(out)
    for f in (out / "shards").glob("part-*.parquet"):  # what is visible is complete
        pq.read_table(f)

    run_ingest_cli("census", "--census-uri", str(demo_census), *DEMO_SHARD_ARGS, "--out", str(out))
    resumed, reference = Manifest.load(out), Manifest.load(demo_shards)
    assert resumed.hash() == reference.hash()
    assert [(s.path, s.sha256) for s in resumed.shards] == [(s.path, s.sha256) for s in reference.shards]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"part-{i:05d}.parquet" for i in range(N_SHARDS)]
    validate_shards(out)


def test_validate_catches_tampering(demo_shards, tmp_path):
    out = tmp_path / "tampered"
    shutil.copytree(demo_shards, out)
    shard = out / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IngestError, match="sha256"):
        validate_shards(out)
    m = json.loads((out / MANIFEST_FILE).read_text())
    m["n_bins"] = 21  # an edit by hand: the raw JSON on purpose
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(IngestError, match="manifest_hash"):
        validate_shards(out)
    proc = run_ingest_cli("validate", str(out), check=False)
    assert proc.returncode == 2 and "manifest_hash" in proc.stderr


def test_max_cells_sample_and_other_options(demo_census, tmp_path):
    """--max-cells, --include-non-primary, --assay, --gene-key feature_name, --n-bins in one real run."""
    out = tmp_path / "sample"
    run_ingest_cli("census", "--census-uri", str(demo_census), "--tissue", "blood", "--include-non-primary",
                   "--assay", "10x 3' v1", "--gene-key", "feature_name", "--n-bins", "21", "--max-cells", "700",
                   "--cells-per-shard", "400", "--val-fraction", "0.1", "--seed", "3", "--num-cpus", "2",
                   "--out", str(out))
    m, table = _read_shards(out)
    assert m.totals.cells_matched == 2700 + 362 + 300 + 2000 and m.totals.cells == 700
    assert len(m.shards) == 2 and m.gene_key == "feature_name"
    assert set(table.column("assay").to_pylist()) == {"10x 3' v1"}
    assert max(max(b) for b in table.column(BINS).to_pylist()) == 20
    vocab = GeneVocab.load(out / "vocab.json")
    assert vocab.key == "feature_name" and "CD74" in vocab
    validate_shards(out)
