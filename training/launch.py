"""The driver side of ``train pretrain``: check inputs, start Ray, run the TorchTrainer, register.

Order matters for "nothing half-written": every check that can fail on user input (config,
shards, vocabulary, tracking store, cluster size, resume state) runs before the MLflow run is
created; the model is registered only after training and the consolidated export succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardset import MANIFEST_FILE, VOCAB_FILE, Manifest, ManifestError
from training import data as D
from training import tracking
from training.config import TrainConfig, validate
from training.errors import TrainUsageError
from training.worker import DS_TAG, STATE_FILE, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    model_uri: str | None  # models:/<name>/<version>, None when registration is off
    checkpoint_path: str
    run_dir: str
    final_metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def check_shards(path: str) -> tuple[Manifest, Any]:
    """(manifest, vocab) of a validated shard set, or TrainUsageError naming the fix."""
    from ingest.errors import IngestError
    from scgpt_model.vocab import GeneVocab, VocabError

    if not path:
        raise TrainUsageError("no shard set given: pass --shards <folder written by `ingest census`>")
    p = Path(path)
    if not (p / MANIFEST_FILE).exists():
        raise TrainUsageError(f"--shards {path}: no manifest.json there; point it at the --out folder of "
                              "`ingest census` (it holds manifest.json, vocab.json and shards/)")
    try:
        from ingest.validate import validate_shards

        validate_shards(p)
        manifest = Manifest.load(p)
        vocab = GeneVocab.load(p / VOCAB_FILE)
    except (IngestError, ManifestError, VocabError) as e:
        raise TrainUsageError(f"--shards {path} failed validation: {e}. Re-run `ingest census` into a fresh "
                              "--out folder (or `ingest validate` to see every problem)") from e
    if manifest.vocab_hash != vocab.hash():
        raise TrainUsageError(f"--shards {path}: vocab.json does not match the manifest's vocab_hash; "
                              "the shard set was modified after ingest — re-ingest it")
    return manifest, vocab


def model_config(cfg: TrainConfig, vocab_size: int):
    from scgpt_model.presets import get_preset

    try:
        return get_preset(cfg.model.preset, vocab_size, **cfg.model.overrides)
    except (ValueError, TypeError) as e:
        raise TrainUsageError(f"model config: {e}") from e


def _complete(ckpt: Path, world: int) -> bool:
    """A checkpoint folder every rank finished writing (rank 0's state + each rank's optimizer shard)."""
    ds = ckpt / DS_TAG
    if not (ckpt / STATE_FILE).exists() or not ds.is_dir():
        return False
    shards = list(ds.glob("*optim_states.pt"))
    return len(shards) >= world


def find_checkpoint(storage: Path, resume: str) -> Path:
    """The newest complete checkpoint of a run: ``resume`` is '' (newest run), a run name or a path."""
    cand = Path(resume) if resume else None
    if cand is not None and (cand / STATE_FILE).exists():
        return cand
    if cand is not None and cand.is_dir():
        run_dir = cand
    elif resume:
        run_dir = storage / resume
    else:
        runs = [d for d in storage.glob("*") if d.is_dir() and any(d.glob(f"checkpoint_*/{STATE_FILE}"))]
        if not runs:
            raise TrainUsageError(f"--resume: no run with checkpoints under {storage}; pass --storage-path or a run name")
        run_dir = max(runs, key=lambda d: d.stat().st_mtime)
    states = []
    for c in run_dir.glob("checkpoint_*"):
        try:
            st = json.loads((c / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _complete(c, int(st.get("world_size", 1))):
            states.append((int(st["step"]), c))
    if not states:
        raise TrainUsageError(f"--resume: no complete checkpoint in {run_dir}; start a new run without --resume")
    return max(states)[1]


def check_resources(cfg: TrainConfig) -> None:
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    have_cpu = res.get("CPU", 0.0)
    if need_cpu > have_cpu + 1e-9:
        raise TrainUsageError(
            f"{cfg.cluster.num_workers} workers x {cfg.cluster.cpus_per_worker} CPU need {need_cpu:g} CPUs but the "
            f"Ray cluster has {have_cpu:g}; pass --num-workers {max(1, int(have_cpu // cfg.cluster.cpus_per_worker))} "
            "or a smaller --cpus-per-worker, or add nodes")
    if cfg.cluster.use_gpu and res.get("GPU", 0.0) < cfg.cluster.num_workers:
        raise TrainUsageError(f"--use-gpu with {cfg.cluster.num_workers} workers needs as many GPUs; the Ray cluster "
                              f"has {res.get('GPU', 0.0):g}. Lower --num-workers or drop --use-gpu")


def _start_ray(cfg: TrainConfig) -> bool:
    """Connect to --ray-address, or start a local Ray bound to loopback. True when we started it."""
    from localray import connect, prepare, start_local

    prepare(cfg.cluster.ray_address)  # a no-op after `train`'s own call; first for Python callers
    import ray

    if ray.is_initialized():
        return False
    if cfg.cluster.ray_address:
        try:
            connect(cfg.cluster.ray_address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise TrainUsageError(f"cannot connect to the Ray cluster at {cfg.cluster.ray_address} ({e}); "
                                  "check --ray-address or drop it to start a local Ray") from e
        return True
    start_local(num_cpus=max(os.cpu_count() or 1, 1), object_store_memory=256 * 1024**2, log_to_driver=True,
                logging_level=logging.INFO)
    return True


# ---------------------------------------------------------------------------------------------
def run_pretrain(cfg: TrainConfig, *, resume: str | None = None) -> PretrainResult:
    """Everything ``train pretrain`` does after argument parsing. Raises TrainUsageError on bad input."""
    import ray

    validate(cfg)
    manifest, vocab = check_shards(cfg.data.shards)
    manifest_hash = manifest.hash()
    # MLflow tag values are capped at 8,000 characters; the full list travels in lineage.json
    pretrain_datasets = ",".join(d.dataset_id for d in manifest.datasets)[:7900]
    mcfg = model_config(cfg, len(vocab))
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    cfg.tracking.tracking_uri = uri
    storage = Path(cfg.cluster.storage_path).expanduser()
    storage = storage if "://" in cfg.cluster.storage_path else storage.resolve()

    resume_path, run_id, resumed_from = None, None, None
    if resume is not None:
        ckpt = find_checkpoint(storage, resume)
        st = json.loads((ckpt / STATE_FILE).read_text())
        if st["vocab_hash"] != vocab.hash():
            raise TrainUsageError(
                f"--resume: the checkpoint {ckpt} was trained with vocabulary {st['vocab_hash'][:12]} but the shards "
                f"at {cfg.data.shards} use {vocab.hash()[:12]}; resume with the original shard set")
        if st.get("manifest_hash") != manifest_hash:
            raise TrainUsageError(
                f"--resume: the checkpoint {ckpt} was trained on the shard set with manifest "
                f"{str(st.get('manifest_hash'))[:12]}, but --shards {cfg.data.shards} is another shard set (manifest "
                f"{manifest_hash[:12]}, query {manifest.obs_filter!r}); resume with the original --shards (the "
                "run's MLflow tag shards_path names it), or start a new run")
        if int(st["world_size"]) != cfg.cluster.num_workers:
            raise TrainUsageError(f"--resume: the checkpoint was written by {st['world_size']} workers; pass "
                                  f"--num-workers {st['world_size']} (ZeRO shards are per rank)")
        run_id, resume_path, resumed_from = st["mlflow_run_id"], str(ckpt), int(st["step"])
        cfg.cluster.run_name = ckpt.parent.name
        storage = ckpt.parent.parent
        from scgpt_model.config import ModelConfig

        if ModelConfig.from_dict(st["model_config"]) != mcfg:
            raise TrainUsageError("--resume: the model config differs from the checkpoint's; resume with the same "
                                  "--config (only schedule knobs such as --max-steps/--epochs may change)")
    else:
        cfg.cluster.run_name = cfg.cluster.run_name or f"{cfg.tracking.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (storage / cfg.cluster.run_name).exists() and any((storage / cfg.cluster.run_name).glob("checkpoint_*")):
            raise TrainUsageError(f"run {cfg.cluster.run_name!r} already has checkpoints under {storage}; pass "
                                  "--resume to continue it or another --run-name")

    train_idx, _ = D.build_index(cfg.data.shards, manifest)
    n_train = min(len(train_idx), cfg.data.max_train_cells or len(train_idx))
    world, ga = cfg.cluster.num_workers, cfg.optim.grad_accum
    steps_per_epoch = D.batches_per_epoch(n_train, world, cfg.data.batch_size, ga) // ga
    if n_train // world < steps_per_epoch * ga:
        raise TrainUsageError(f"{n_train} training cells are too few for {world} workers; use fewer workers")
    total_steps = steps_per_epoch * cfg.schedule.epochs
    if cfg.schedule.max_steps is not None:
        total_steps = min(total_steps, cfg.schedule.max_steps)

    started = _start_ray(cfg)
    try:
        check_resources(cfg)
        if run_id is None:
            params = {**cfg.flat(), **{f"model_config.{k}": v for k, v in mcfg.to_dict().items()},
                      "data.n_train_cells": n_train, "data.steps_per_epoch": steps_per_epoch,
                      "data.total_steps": total_steps}
            tags = {"manifest_hash": manifest_hash, "census_source": json.dumps(manifest.source),
                    "census_version": manifest.census_version,
                    "obs_filter": manifest.obs_filter, "vocab_hash": vocab.hash(),
                    "pretrain_datasets": pretrain_datasets,
                    "git_commit": tracking.git_commit(), "shards_path": str(Path(cfg.data.shards).resolve()),
                    "ray_run_name": cfg.cluster.run_name, "mlflow.runName": cfg.cluster.run_name}
            from training.parallelize import deepspeed_config

            run_id = tracking.start_run(
                uri, cfg.tracking.experiment, cfg.cluster.run_name, params=params, tags=tags,
                artifacts={"config.json": cfg.to_dict(), "model_config.json": mcfg.to_dict(),
                           MANIFEST_FILE: manifest.to_json(),
                           "deepspeed_config.json": deepspeed_config(cfg, on_gpu=cfg.cluster.use_gpu)})
        else:
            tracking.reopen_run(uri, run_id)
        print(f"mlflow run {run_id} ({uri}); {n_train} training cells, {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps" + (f", resuming from step {resumed_from}" if resumed_from is not None else ""),
              flush=True)
        result = _fit(cfg, mcfg, storage, {
            "train": cfg.to_dict(), "model_config": mcfg.to_dict(), "total_steps": total_steps,
            "resume_path": resume_path, "mlflow_run_id": run_id, "tracking_uri": uri,
            "vocab_hash": vocab.hash(), "manifest_hash": manifest_hash,
            "world_size": world, "audit_dir": str(storage / cfg.cluster.run_name)})
        try:
            ckpt_path, final = _final_checkpoint(result)
            model_uri = None
            if cfg.tracking.register:
                from training.registry import export_and_register, lineage_of

                model_uri = export_and_register(
                    ckpt_path, mcfg, vocab, tracking_uri=uri, run_id=run_id, model_name=cfg.tracking.model_name,
                    tags={"run_id": run_id, "manifest_hash": manifest_hash,
                          "census_source": json.dumps(manifest.source), "vocab_hash": vocab.hash(),
                          "pretrain_datasets": pretrain_datasets, "steps": str(final.get("step", ""))},
                    lineage=lineage_of(manifest))
        except BaseException:
            tracking.end_run(uri, run_id, "FAILED")
            raise
        tracking.end_run(uri, run_id, "FINISHED")
        print(f"done: run {run_id}, checkpoint {ckpt_path}" + (f", registered {model_uri}" if model_uri else ""),
              flush=True)
        return PretrainResult(run_id, uri, model_uri, str(ckpt_path), str(storage / cfg.cluster.run_name), final)
    finally:
        if started:
            ray.shutdown()


def _fit(cfg: TrainConfig, mcfg, storage: Path, loop_config: dict[str, Any]):
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.cluster.run_name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    try:
        return trainer.fit()
    except Exception as e:
        if loop_config.get("mlflow_run_id"):
            tracking.end_run(loop_config["tracking_uri"], loop_config["mlflow_run_id"], "FAILED")
        raise RuntimeError(f"training failed: {e}") from e


def _final_checkpoint(result) -> tuple[Path, dict[str, Any]]:
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training ended without a checkpoint")
    path = Path(ckpt.path)
    return path, dict(result.metrics or {})
