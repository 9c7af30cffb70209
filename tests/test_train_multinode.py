"""Simulated multi-node: a two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``).

Each node has one CPU, so the two workers land one per node; the run trains, checkpoints,
and registers through ``--ray-address``. The same cluster checks the "more workers than the
cluster can place" refusal (exit 2, nothing logged or registered).
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.training import run_train


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_more_workers_than_the_cluster_places_is_refused(two_node_cluster, tiny_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_train(["pretrain", "--shards", str(tiny_shards), "--ray-address", two_node_cluster.address,
                                "--num-workers", "3", "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs")],
                               tmp_path)
    assert code == 2, out + err
    assert "3 workers" in err and "the Ray cluster has 2" in err and "--num-workers 2" in err
    from training.tracking import client

    c = client(uri)
    assert not c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert not c.search_registered_models()
    assert not (tmp_path / "runs").exists()


def test_two_nodes_one_worker_each_train_checkpoint_register(two_node_cluster, tiny_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_train(
        ["pretrain", "--config", "debug", "--shards", str(tiny_shards), "--ray-address", two_node_cluster.address,
         "--num-workers", "2", "--max-steps", "3", "--checkpoint-every", "2", "--val-every", "3",
         "--batch-size", "8", "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs"),
         "--run-name", "twonode", "--model-name", "scgpt-twonode"], tmp_path)
    assert code == 0, out[-3000:] + err[-3000:]
    from training.launch import find_checkpoint
    from training.registry import load_registered_model

    ckpts = sorted(d for d in (tmp_path / "runs" / "twonode").glob("checkpoint_*") if d.is_dir())
    steps = sorted(json.loads((c / "train_state.json").read_text())["step"] for c in ckpts)
    assert steps == [2, 3]  # every 2 steps and at the end
    st = json.loads((find_checkpoint(tmp_path / "runs", "twonode") / "train_state.json").read_text())
    assert len(set(st["nodes"])) == 2, "one worker on each node"
    model, vocab, cfg, info = load_registered_model("models:/scgpt-twonode/1", uri)
    assert info["model_name"] == "scgpt-twonode" and cfg.vocab_size == len(vocab)
