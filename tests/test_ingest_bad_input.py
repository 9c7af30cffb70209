"""Bad input (SPEC §7): one clear message naming the fix, exit code 2, nothing half-written."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from ingest.cli import main
from ingest.errors import IngestError
from ingest.store_writer import CensusStoreWriter, DatasetInfo
from ingest.worker import rows_from_tables


def _census(demo_census: Path, out: Path, *extra: str) -> list[str]:
    return ["census", "--census-uri", str(demo_census), "--out", str(out), *extra]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def test_unknown_tissue_names_close_matches(demo_census, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, _census(demo_census, out, "--tissue", "bloood"), "unknown tissue_general", "'blood'",
           "Known values")
    assert not out.exists()


def test_unknown_disease_and_assay(demo_census, tmp_path, capsys):
    _fails(capsys, _census(demo_census, tmp_path / "o", "--disease", "flu"), "--disease", "unknown disease")
    _fails(capsys, _census(demo_census, tmp_path / "o", "--assay", "10x 3' v9"), "--assay", "10x 3' v")
    assert not (tmp_path / "o").exists()


def test_empty_query(demo_census, tmp_path, capsys):
    _fails(capsys, _census(demo_census, tmp_path / "o", "--tissue", "lung", "--obs-filter", "nnz > 100000000"),
           "matched no cells", "--include-non-primary")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flt", ["cell_type === 'B cell'", "no_such_column == 1", "nnz >"])
def test_unparseable_filter(demo_census, tmp_path, capsys, flt):
    _fails(capsys, _census(demo_census, tmp_path / "o", "--obs-filter", flt), "--obs-filter", "does not parse",
           "value-filter syntax")
    assert not (tmp_path / "o").exists()


def test_not_a_census_store(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["census", "--census-uri", str(empty), "--out", str(tmp_path / "o")], "not a SOMA store")
    _fails(capsys, ["census", "--census-uri", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
           "no such path", "build-census")
    # a valid SOMA object that is not in Census layout
    soma.Collection.create(str(tmp_path / "coll")).close()
    _fails(capsys, ["census", "--census-uri", str(tmp_path / "coll"), "--out", str(tmp_path / "o")],
           "not in Census layout", "ingest build-census")
    _fails(capsys, ["census", "--census-uri", str(tmp_path / "coll"), "--organism", "Mus musculus",
                    "--out", str(tmp_path / "o")], "not in Census layout")
    assert not (tmp_path / "o").exists()


def test_wrong_organism(demo_census, tmp_path, capsys):
    _fails(capsys, _census(demo_census, tmp_path / "o", "--organism", "Mus musculus"), "no organism",
           "homo_sapiens")


def test_existing_out_from_other_arguments_is_refused(demo_census, demo_shards, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    err = _fails(capsys, _census(demo_census, out, "--tissue", "blood", "--cells-per-shard", "1000",
                                 "--n-bins", "21"), "other arguments", "n_bins", "new --out")
    assert "vocab" not in err.split("differs in:")[1].split(")")[0]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # a non-empty directory that is not a shard set
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _fails(capsys, _census(demo_census, other, "--tissue", "blood"), "not a shard set")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("content,needle", [("{not json", "not valid JSON"), ('{"x": [1, 2]}', "unknown layout"),
                                            ('{"tokens": ["a", "b"]}', "special tokens")])
def test_unparsable_vocab(demo_census, tmp_path, capsys, content, needle):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(content)
    _fails(capsys, _census(demo_census, tmp_path / "o", "--tissue", "blood", "--vocab", str(vocab)), "--vocab",
           needle)
    assert not (tmp_path / "o").exists()


def test_vocab_without_store_genes(demo_census, tmp_path, capsys):
    from scgpt_model.vocab import GeneVocab

    GeneVocab.from_genes(["NOT_A_GENE_1", "NOT_A_GENE_2"]).save(tmp_path / "vocab.json")
    _fails(capsys, _census(demo_census, tmp_path / "o", "--tissue", "blood", "--vocab", str(tmp_path / "vocab.json")),
           "no gene of the store is in the vocabulary")


@pytest.mark.parametrize("argv,needle", [(["--n-bins", "1000"], "--n-bins"), (["--cells-per-shard", "0"],
                                                                              "--cells-per-shard"),
                                         (["--val-fraction", "1.5"], "--val-fraction"), (["--max-cells", "0"],
                                                                                         "--max-cells")])
def test_bad_numbers(demo_census, tmp_path, capsys, argv, needle):
    _fails(capsys, _census(demo_census, tmp_path / "o", *argv), needle)


# ---- counts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value,needle", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-1.0, "negative"),
                                          (0.5, "non-integer")])
def test_chunk_count_check(value, needle):
    vals = np.array([1.0, 2.0, value, 3.0], dtype=np.float32)
    tbl = pa.table({"soma_dim_0": np.array([10, 10, 11, 11]), "soma_dim_1": np.array([0, 1, 0, 1]), "soma_data": vals})
    with pytest.raises(IngestError, match=needle) as e:
        rows_from_tables([tbl], np.array([10, 11]), np.arange(2, dtype=np.int32))
    assert "soma_joinid 11" in str(e.value) and "raw" in str(e.value)


@pytest.mark.parametrize("value,needle", [(np.nan, "non-finite"), (-3.0, "negative"), (1.25, "non-integer")])
def test_build_census_refuses_non_counts(tmp_path, capsys, value, needle):
    X = sp.random(20, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    X.data[3] = value
    a = ad.AnnData(X=X, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(30)]))
    a.write_h5ad(tmp_path / "bad.h5ad")
    out = tmp_path / "store"
    _fails(capsys, ["build-census", "--h5ad", str(tmp_path / "bad.h5ad"), "--out", str(out)], needle,
           "raw count")
    assert not out.exists()


def test_build_census_bad_inputs(tmp_path, capsys):
    _fails(capsys, ["build-census", "--h5ad", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "s")],
           "file not found")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    _fails(capsys, ["build-census", "--h5ad", str(tmp_path / "junk.h5ad"), "--out", str(tmp_path / "s")],
           "cannot be read as AnnData")
    _fails(capsys, ["build-census", "--h5ad", str(tmp_path / "junk.h5ad"), "--set", "colour=red",
                    "--out", str(tmp_path / "s")], "not a Census obs column")
    assert not (tmp_path / "s").exists()


def test_non_integer_counts_in_store_found_by_a_ray_worker(tmp_path, capsys):
    """The store itself holds normalised values: a Ray task finds them; exit 2, no --out left."""
    store = tmp_path / "store"
    var = pd.DataFrame({"feature_id": [f"ENSG{i:011d}" for i in range(50)], "feature_name": [f"G{i}" for i in
                                                                                               range(50)]})
    w = CensusStoreWriter(store, var, 60)
    X = sp.random(60, 50, density=0.4, format="csr", random_state=1, dtype=np.float32)
    X.data = np.ceil(X.data * 9)
    w.append(pd.DataFrame({"tissue_general": ["blood"] * 60}), X, DatasetInfo(dataset_id="d", title="t"))
    w.close()
    # overwrite one stored value of cell 45 with a normalised (non-integer) value
    r, c = 45, int(X[45].indices[0])
    with soma.open(str(store / "census_data" / "homo_sapiens" / "ms" / "RNA" / "X" / "raw"), "w") as arr:
        import pyarrow as pa

        arr.write(pa.table({"soma_dim_0": pa.array([r], pa.int64()), "soma_dim_1": pa.array([c], pa.int64()),
                            "soma_data": pa.array([0.731], pa.float32())}))
    out = tmp_path / "o"
    _fails(capsys, ["census", "--census-uri", str(store), "--tissue", "blood", "--cells-per-shard", "20",
                    "--num-cpus", "1", "--out", str(out)], "non-integer", "soma_joinid 45", "raw")
    assert not out.exists()
