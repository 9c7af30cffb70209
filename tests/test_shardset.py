"""The shard-set contract (``shardset``): golden values of the split and tie hashes, and the typed
manifest's round trip and refusals.

The golden values pin the data: a change to either hash moves every train/validation split or
every tied bin of every shard set already written, so it must show up here first.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from scgpt_model.binning import _splitmix64, bin_nonzero, tie_uniforms
from shardset import MANIFEST_FILE, Manifest, ManifestError, ShardEntry, Totals, is_validation, split_uniform
from shardset.manifest import splitmix64

IDS = np.array([0, 1, 2, 3, 1000, 123456789, 2**40 + 7], dtype=np.int64)


def test_splitmix64_golden_and_both_implementations_agree():
    # SplitMix64's published first outputs from state 0, 1, 2, ... (Steele et al.)
    golden = [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1, 0x975835DE1C9756CE, 0x1D0B14E4DB018FED, 0x6E73E372E2338ACA]
    assert [int(v) for v in splitmix64(np.arange(5, dtype=np.uint64))] == golden
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy scalar overflow in the pure-Python body
        assert [int(_splitmix64.py_func(np.uint64(v))) for v in range(5)] == golden


def test_split_hash_golden_values():
    np.testing.assert_array_equal(split_uniform(IDS, 0), [
        0.749375045774767, 0.47257021911427743, 0.9555099288879084, 0.1046365641107243, 0.7698662486445269,
        0.8702562934982784, 0.2159691091301409])
    np.testing.assert_array_equal(split_uniform(IDS, 3), [
        0.40077447160653246, 0.5280932281569843, 0.2631024369611834, 0.04924100134322962, 0.48933125102737196,
        0.4669776986419447, 0.734416779521144])
    big = np.arange(100_000, dtype=np.int64)
    assert int(is_validation(big, 0.03, 0).sum()) == 2964
    assert int(is_validation(big, 0.1, 3).sum()) == 9948


def test_binning_tie_generator_golden_values():
    np.testing.assert_array_equal(tie_uniforms(0, [0, 1, 5, 123456789], [0, 1, 2, 3]), [
        0.13870941014555432, 0.2747126569882074, 0.4352452132745797, 0.47326873753967263])
    np.testing.assert_array_equal(tie_uniforms(7, [42], [0]), [0.15185056017844506])
    # ties spread by the draws: cell 11 has three 1s and two 5s, cell 12 four 3s
    indptr = np.array([0, 6, 10])
    data = np.array([1, 1, 1, 2, 5, 5, 3, 3, 3, 3], np.float32)
    assert bin_nonzero(indptr, data, np.array([11, 12]), n_bins=5, seed=0).tolist() == [2, 1, 2, 2, 4, 4, 3, 2, 2, 3]


def _manifest(**changes) -> Manifest:
    entry = ShardEntry(index=0, path="shards/part-00000.parquet", n_rows=3, n_bytes=100, sha256="ab" * 32,
                       joinid_min=0, joinid_max=2, n_train=2, n_val=1, nnz=9, n_dropped_min_genes=0)
    m = Manifest(source={"kind": "uri", "uri": "/x"}, organism="Homo sapiens", obs_filter="", vocab_hash="v",
                 vocab_size=10, gene_key="feature_id", n_bins=51, seed=0, val_fraction=0.03, args={"min_genes": 2},
                 n_shards_planned=1, complete=True,
                 totals=Totals.of([entry], cells_matched=3, cells_planned=3, genes_in_vocab=7, genes_dropped=0,
                                  genes_dropped_examples=[]),
                 shards=[entry])
    return m.replace(**changes)


def test_manifest_round_trip_and_hash(tmp_path):
    m = _manifest()
    h = m.write(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert raw["manifest_hash"] == h == m.hash() and raw["totals"]["nonzeros"] == 9
    back = Manifest.load(tmp_path)
    assert back == m and back.min_genes == 2 and back.census_version == ""
    assert _manifest(source={"kind": "census", "census_version": "2025-01-30"}).census_version == "2025-01-30"
    np.testing.assert_array_equal(back.split_of(IDS), is_validation(IDS, 0.03, 0))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("vocab_hash"), "missing vocab_hash"),
    (lambda d: d.update(extra=1), "unknown extra"),
    (lambda d: d.update(n_bins="51"), r"n_bins: expected int, got str"),
    (lambda d: d["shards"][0].update(n_rows=True), r"shards\[0\].n_rows: expected int, got bool"),
    (lambda d: d.update(format="other/1"), "is not a scgpt-census-shards/1 manifest"),
])
def test_manifest_refuses_what_it_does_not_know(tmp_path, edit, message):
    data = _manifest().to_json()
    edit(data)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(tmp_path)


def test_manifest_refuses_an_edit_and_a_missing_file(tmp_path):
    data = _manifest().to_json()
    data["n_bins"] = 21
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="manifest_hash does not match"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="not a shard set"):
        Manifest.load(tmp_path / "nowhere")


def test_atomic_write_leaves_nothing_half_written_on_a_full_disk(tmp_path, monkeypatch):
    import errno
    import os

    from shardset import atomic_write_bytes

    target = tmp_path / "vocab.json"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]  # no temporary file left
