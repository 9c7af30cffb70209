"""Bad input to `train pretrain`: one clear message, exit code 2, no MLflow run, no model, no run folder.

(More workers than the cluster can place is checked on a real two-node cluster in
test_train_multinode.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fixtures.training import run_train, write_tiny_shards


def _nothing_written(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    if db.exists():
        from training.tracking import client

        c = client(f"sqlite:///{db}")
        assert not c.search_runs([e.experiment_id for e in c.search_experiments()])
        assert not c.search_registered_models()
    assert not (tmp_path / "runs").exists()


def _train(tmp_path: Path, *args: str) -> tuple[int, str]:
    base = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "runs")]
    code, out, err = run_train(["pretrain", *args, *base], tmp_path)
    return code, err


def test_missing_shards(tmp_path):
    code, err = _train(tmp_path, "--shards", str(tmp_path / "nowhere"))
    assert code == 2 and "no manifest.json" in err and "ingest census" in err
    code, err = _train(tmp_path)
    assert code == 2 and "--shards" in err
    _nothing_written(tmp_path)


def test_shards_failing_the_preflight_or_verification(tiny_shards, tmp_path):
    from shardset import Manifest

    bad = tmp_path / "bad_shards"
    shutil.copytree(tiny_shards, bad)
    parts = sorted((bad / "shards").glob("*.parquet"))
    parts[0].write_bytes(parts[0].read_bytes()[:-10] + b"0123456789")  # same size, different content
    code, err = _train(tmp_path, "--shards", str(bad), "--verify-shards")  # full verification on request
    assert code == 2 and "failed validation" in err and "sha256" in err
    parts[1].write_bytes(parts[1].read_bytes() + b"x")  # another size: the cheap pre-flight sees it
    code, err = _train(tmp_path, "--shards", str(bad))
    assert code == 2 and "differ from the manifest" in err and f"{parts[1].name}: " in err and "bytes" in err
    assert "ingest validate" in err
    parts[2].unlink()
    code, err = _train(tmp_path, "--shards", str(bad))
    assert code == 2 and f"{parts[2].name}: missing" in err
    m = Manifest.load(bad)
    m.replace(complete=False, shards=m.shards[:-1]).write(bad)
    code, err = _train(tmp_path, "--shards", str(bad))
    assert code == 2 and "incomplete" in err and "re-run the same `ingest census`" in err
    _nothing_written(tmp_path)


def test_the_preflight_reads_no_shard(tiny_shards, monkeypatch):
    """Issue 13.4: before step 1 the driver checks hashes, completeness and sizes; it decodes and
    hashes no shard (at Census scale that is reading the whole data set)."""
    import pyarrow.parquet as pq

    import shardset.manifest
    from training.launch import check_shards

    def no_read(*a, **k):
        raise AssertionError("the pre-flight read a shard")

    for mod, name in ((pq, "read_table"), (pq, "ParquetFile"), (shardset.manifest, "sha256_file")):
        monkeypatch.setattr(mod, name, no_read)
    manifest, vocab = check_shards(str(tiny_shards))
    assert manifest.vocab_hash == vocab.hash() and manifest.complete
    with pytest.raises(AssertionError, match="read a shard"):
        check_shards(str(tiny_shards), verify=True)


def test_unknown_preset_and_config_keys(tiny_shards, tmp_path):
    code, err = _train(tmp_path, "--config", "huge", "--shards", str(tiny_shards))
    assert code == 2 and "neither a preset" in err and "debug" in err
    y = tmp_path / "cfg.yaml"
    y.write_text("preset: debug\ndata:\n  batchsize: 4\n")
    code, err = _train(tmp_path, "--config", str(y), "--shards", str(tiny_shards))
    assert code == 2 and "unknown config key 'data.batchsize'" in err and "data.batch_size" in err
    y.write_text("preset: enormous\n")
    code, err = _train(tmp_path, "--config", str(y), "--shards", str(tiny_shards))
    assert code == 2 and "unknown preset 'enormous'" in err
    y.write_text("model:\n  preset: debug\n  overrides: {d_modle: 8}\n")
    code, err = _train(tmp_path, "--config", str(y), "--shards", str(tiny_shards))
    assert code == 2 and "d_modle" in err
    code, err = _train(tmp_path, "--shards", str(tiny_shards), "--zero-stage", "4")
    assert code == 2 and "zero_stage must be 1, 2 or 3" in err
    _nothing_written(tmp_path)


def test_yaml_config_loads_with_overrides(tmp_path):
    from training.config import load_config

    y = tmp_path / "cfg.yaml"
    y.write_text("preset: small\ndata:\n  batch_size: 8\noptim: {lr: 0.0002, betas: [0.9, 0.95]}\n"
                 "deepspeed: {zero_stage: 3}\nmodel: {overrides: {dropout: 0.0}}\n")
    cfg = load_config(str(y))
    assert cfg.model.preset == "small" and cfg.data.batch_size == 8 and cfg.optim.lr == 2e-4
    assert cfg.optim.betas == (0.9, 0.95) and cfg.deepspeed.zero_stage == 3
    assert cfg.model.overrides == {"dropout": 0.0} and cfg.tracking.model_name == "scgpt-small"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "sqlite:////nonexistent-dir/x/mlflow.db"])
def test_unreachable_tracking_uri(tiny_shards, tmp_path, uri):
    code, out, err = run_train(["pretrain", "--shards", str(tiny_shards), "--tracking-uri", uri,
                                "--storage-path", str(tmp_path / "runs")], tmp_path)
    assert code == 2 and "tracking" in err and ("cannot be reached" in err or "does not exist" in err)
    assert not (tmp_path / "runs").exists()


def test_vocabulary_differing_from_the_checkpoint_on_resume(pretrain_run, tmp_path):
    other = write_tiny_shards(tmp_path / "other_vocab", gene_prefix="ENSMUSG")
    code, err = _train(tmp_path, "--resume", str(pretrain_run.run_dir), "--shards", str(other))
    assert code == 2 and "vocabulary" in err and "original shard set" in err
    # same vocabulary, another shard set (issue 14.1: a resume used to train on it under the old run's tags)
    same_vocab = tmp_path / "other_cells"
    shutil.copytree(pretrain_run.shards, same_vocab)
    from shardset import Manifest

    m = Manifest.load(same_vocab)
    m.replace(obs_filter=m.obs_filter + " and tissue_general in ['lung']").write(same_vocab)
    code, err = _train(tmp_path, "--resume", str(pretrain_run.run_dir), "--shards", str(same_vocab))
    assert code == 2 and "another shard set" in err and str(same_vocab) in err and "original --shards" in err
    code, err = _train(tmp_path, "--resume", str(pretrain_run.run_dir), "--num-workers", "3")
    assert code == 2 and "--num-workers 2" in err
    code, err = _train(tmp_path, "--resume", str(tmp_path / "no-run"))
    assert code == 2 and "no complete checkpoint" in err
    _nothing_written(tmp_path)
