"""The shared 2-worker ZeRO-2 `train pretrain` run on the demo shards (fixture ``pretrain_run``).

One real run (local Ray on loopback, DeepSpeed on CPU with gloo, MLflow sqlite + registry),
checked for: loss going down, one stdout line per step, MLflow params/artifacts/metrics/lineage
tags, exactly-once per epoch by soma_joinid, and the registered version reproducing the trained
weights' outputs on a fixed batch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures.training import read_seen

N_STEPS = 12  # 192 cells / (2 workers x 16) = 6 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def mlflow_run(pretrain_run):
    from training.tracking import client

    c = client(pretrain_run.tracking_uri)
    return c, c.get_run(pretrain_run.run_id)


def _history(c, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_run_finishes_registers_and_prints_one_line_per_step(pretrain_run):
    assert pretrain_run.exit_code == 0
    assert pretrain_run.model_uri.startswith("models:/scgpt-debug-fixture/")
    st = json.loads((pretrain_run.checkpoint / "train_state.json").read_text())
    assert st["step"] == N_STEPS and st["world_size"] == 2 and st["epoch"] == 2
    lines = [ln for ln in pretrain_run.stdout.splitlines() if f"/{N_STEPS} epoch" in ln and "step " in ln]
    steps = sorted(int(ln.split("step ")[1].split("/")[0]) for ln in lines)
    assert steps == list(range(1, N_STEPS + 1)), "exactly one stdout line per optimizer step"


def test_loss_goes_down(mlflow_run, pretrain_run):
    c, run = mlflow_run
    loss = _history(c, run.info.run_id, "loss")
    assert len(loss) == N_STEPS
    assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3]), loss
    val = _history(c, run.info.run_id, "val_total")
    assert len(val) == 3 and val[-1] < val[0], val  # validated at steps 4, 8, 12


def test_mlflow_run_holds_config_metrics_and_lineage(mlflow_run, pretrain_run):
    from shardset import Manifest

    c, run = mlflow_run
    assert run.info.status == "FINISHED"
    p, tags = run.data.params, run.data.tags
    assert p["deepspeed.zero_stage"] == "2" and p["data.batch_size"] == "16" and p["cluster.num_workers"] == "2"
    assert p["model.preset"] == "debug" and p["model_config.d_model"] == "32"
    manifest = Manifest.load(pretrain_run.shards)
    assert tags["manifest_hash"] == manifest.hash()
    assert json.loads(tags["census_source"]) == manifest.source
    assert len(tags["git_commit"].split("+")[0]) == 40
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.json", "manifest.json", "deepspeed_config.json", "pretrained"} <= arts
    cfg = json.loads(open(c.download_artifacts(run.info.run_id, "config.json")).read())
    assert cfg["deepspeed"]["zero_stage"] == 2 and cfg["schedule"]["epochs"] == 2
    for key in ("loss", "loss_gep", "loss_gepc", "lr", "grad_norm", "cells_per_s", "tokens_per_s", "padding_fraction"):
        hist = c.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, N_STEPS + 1)), key
    lr = _history(c, run.info.run_id, "lr")
    assert lr[0] < lr[1] and lr[-1] < max(lr)  # warmup (2 steps), then decay
    assert all(0 <= x < 0.5 for x in _history(c, run.info.run_id, "padding_fraction"))


def test_exactly_once_per_epoch_across_workers(pretrain_run):
    from training import data as train_data
    from training.config import TrainConfig

    seen = read_seen(pretrain_run.run_dir)
    assert set(seen) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    train, _ = train_data.build_index(pretrain_run.shards)
    cfg = TrainConfig.from_dict(json.loads((pretrain_run.checkpoint / "train_state.json").read_text())["train"])
    expected = np.sort(train_data.subsample(train, cfg.data.max_train_cells, cfg.schedule.seed).joinid)
    for epoch in (0, 1):
        r0, r1 = seen[(epoch, 0)], seen[(epoch, 1)]
        assert not set(r0) & set(r1), "the workers' shares are disjoint"
        assert np.array_equal(np.sort(r0 + r1), expected), "every training cell exactly once"
    assert seen[(0, 0)] != seen[(1, 0)], "a new order every epoch"


def test_registered_version_reproduces_the_trained_model(pretrain_run):
    import mlflow

    from scgpt_model.batching import collate_generative
    from scgpt_model.model import ScGPT
    from training import data as train_data
    from training.registry import consolidated_state_dict, load_registered_model

    model, vocab, mcfg, info = load_registered_model(pretrain_run.model_uri, pretrain_run.tracking_uri)
    assert info["run_id"] == pretrain_run.run_id and info["manifest_hash"]
    assert info["version"] == int(pretrain_run.model_uri.rsplit("/", 1)[1])
    assert vocab.hash() == json.loads((pretrain_run.checkpoint / "train_state.json").read_text())["vocab_hash"]
    # the trained weights, straight from the final DeepSpeed checkpoint
    trained = ScGPT(mcfg)
    trained.load_state_dict(consolidated_state_dict(pretrain_run.checkpoint), strict=False)
    trained.eval()
    train, _ = train_data.build_index(pretrain_run.shards)
    genes, bins, _ = train_data.ShardStore(train).cells(np.arange(8))
    batch = collate_generative(genes, bins, max_seq_len=mcfg.max_seq_len, seed=0, unknown_ratios=(0.5,))
    with torch.no_grad():
        a, b = model(batch), trained(batch)
    torch.testing.assert_close(a.loss.total, b.loss.total)
    torch.testing.assert_close(a.cell_emb, b.cell_emb)
    torch.testing.assert_close(model.embed_cells(batch), trained.embed_cells(batch))
    # other URI forms resolve to the same version
    from training.tracking import client

    name = info["model_name"]
    client(pretrain_run.tracking_uri).set_registered_model_alias(name, "champion", str(info["version"]))
    for uri in (f"models:/{name}/latest", f"models:/{name}@champion", info["path"]):
        m2, _, _, i2 = load_registered_model(uri, pretrain_run.tracking_uri)
        torch.testing.assert_close(m2.embed_cells(batch), trained.embed_cells(batch))
    # the logged MLflow model serves the same embeddings through pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(pretrain_run.tracking_uri)
    pyf = mlflow.pyfunc.load_model(pretrain_run.model_uri)
    emb = pyf.predict(pd.DataFrame({"genes": [g.tolist() for g in genes], "bins": [b.tolist() for b in bins]}))
    ref = trained.embed_cells(collate_generative(genes, bins, max_seq_len=mcfg.max_seq_len, seed=0,
                                                 unknown_ratios=(0.0,)))
    np.testing.assert_allclose(np.asarray(emb), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_model_uris_raise_model_uri_error(pretrain_run, tmp_path):
    from training.errors import ModelURIError
    from training.registry import load_registered_model

    for uri in ("models:/no-such-model/1", "models:/scgpt-debug-fixture/999", "models:/scgpt-debug-fixture@nope",
                "models:/x/y/z", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ModelURIError):
            load_registered_model(uri, pretrain_run.tracking_uri)


def test_exactly_once_per_epoch_with_three_workers(tmp_path, demo_shards):
    """A real 3-worker run (half a CPU each on this 2-core machine): soma_joinid accounting."""
    from tests.fixtures.training import run_train
    from training import data as train_data

    args = ["pretrain", "--config", "debug", "--num-workers", "3", "--cpus-per-worker", "0.5",
            "--zero-stage", "2", "--batch-size", "16", "--max-train-cells", "150", "--epochs", "2",
            "--seed", "11", "--record-seen", "--no-register", "--val-every", "100", "--checkpoint-every", "100",
            "--shards", str(demo_shards), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage-path", str(tmp_path / "runs"), "--run-name", "three"]
    code, out, err = run_train(args, tmp_path)
    assert code == 0, f"train pretrain failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    seen = read_seen(tmp_path / "runs" / "three")
    assert set(seen) == {(e, r) for e in (0, 1) for r in (0, 1, 2)}
    train, _ = train_data.build_index(demo_shards)
    expected = np.sort(train_data.subsample(train, 150, 11).joinid)
    for epoch in (0, 1):
        shares = [seen[(epoch, r)] for r in range(3)]
        assert all(shares), "every worker trains"
        for a in range(3):
            for b in range(a + 1, 3):
                assert not set(shares[a]) & set(shares[b]), "the workers' shares are disjoint"
        assert np.array_equal(np.sort(np.concatenate(shares)), expected), "every training cell exactly once"
    assert seen[(0, 0)] != seen[(1, 0)], "a new order every epoch"
