"""The driver side of ``train pretrain``: check inputs, start Ray, run the TorchTrainer, register.

Order matters for "nothing half-written": every check that can fail on user input (config,
shards, vocabulary, tracking store, cluster size, resume state) runs before the MLflow run is
created; the model is registered only after training and the consolidated export succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localray.signals import Interrupted
from shardset import MANIFEST_FILE, VOCAB_FILE, Manifest, ManifestError
from training import data as train_data
from training import tracking
from training.config import TrainConfig, check_config
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
def check_shards(path: str, *, verify: bool = False) -> tuple[Manifest, Any]:
    """(manifest, vocab) of a shard set that passes the cheap pre-flight (manifest and vocabulary
    hashes, completeness, file sizes; ``verify``: every shard decoded and hashed, as `ingest
    validate`), or TrainUsageError naming the fix."""
    from ingest.errors import IngestError
    from scgpt_model.vocab import GeneVocab, VocabError

    if not path:
        raise TrainUsageError("no shard set given: pass --shards <folder written by `ingest census`>")
    p = Path(path)
    if not (p / MANIFEST_FILE).exists():
        raise TrainUsageError(f"--shards {path}: no manifest.json there; point it at the --out folder of "
                              "`ingest census` (it holds manifest.json, vocab.json and shards/)")
    try:
        if verify:
            from ingest.validate import validate_shards

            validate_shards(p)
        manifest = Manifest.load(p)
        vocab = GeneVocab.load(p / VOCAB_FILE)
    except (IngestError, ManifestError) as e:  # their messages name the fix of each problem
        raise TrainUsageError(f"--shards {path}: {e}") from e
    except VocabError as e:
        raise TrainUsageError(f"--shards {path}: {e}; re-run the `ingest census` command that wrote it, with the "
                              "same arguments and --out (it rewrites vocab.json)") from e
    if manifest.vocab_hash != vocab.hash():
        raise TrainUsageError(f"--shards {path}: vocab.json was changed after ingest (it does not match the "
                              "manifest's vocab_hash); re-run the `ingest census` command that wrote it, with the same "
                              "arguments and --out (it rewrites vocab.json)")
    train_data.preflight(p, manifest)
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
# run_pretrain and its parts
# ---------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """The checked inputs of a run: shard set, vocabulary, model config, tracking store, storage."""

    manifest: Manifest
    manifest_hash: str
    vocab: Any
    mcfg: Any
    uri: str
    storage: Path
    pretrain_datasets: str  # MLflow tag values are capped at 8,000 characters; lineage.json has all


@dataclass
class _Resume:
    """The checkpoint a resumed run continues from: the one source of where training restarts."""

    path: str
    run_id: str
    step: int


@dataclass
class _Schedule:
    n_train: int
    steps_per_epoch: int
    total_steps: int


def _check_inputs(cfg: TrainConfig, verify_shards: bool) -> _Inputs:
    check_config(cfg)
    manifest, vocab = check_shards(cfg.data.shards, verify=verify_shards)
    mcfg = model_config(cfg, len(vocab))
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    cfg.tracking.tracking_uri = uri
    storage = Path(cfg.cluster.storage_path).expanduser()
    storage = storage if "://" in cfg.cluster.storage_path else storage.resolve()
    return _Inputs(manifest, manifest.hash(), vocab, mcfg, uri, storage,
                   ",".join(d.dataset_id for d in manifest.datasets)[:7900])


def _check_resume(cfg: TrainConfig, inp: _Inputs, resume: str) -> _Resume:
    """The checkpoint to resume from, refused unless it belongs to these inputs; points the run
    name and storage at its run."""
    from scgpt_model.config import ModelConfig

    ckpt = find_checkpoint(inp.storage, resume)
    st = json.loads((ckpt / STATE_FILE).read_text())
    vocab_hash = inp.vocab.hash()
    if st["vocab_hash"] != vocab_hash:
        raise TrainUsageError(
            f"--resume: the checkpoint {ckpt} was trained with vocabulary {st['vocab_hash'][:12]} but the shards "
            f"at {cfg.data.shards} use {vocab_hash[:12]}; resume with the original shard set")
    if st.get("manifest_hash") != inp.manifest_hash:
        raise TrainUsageError(
            f"--resume: the checkpoint {ckpt} was trained on the shard set with manifest "
            f"{str(st.get('manifest_hash'))[:12]}, but --shards {cfg.data.shards} is another shard set (manifest "
            f"{inp.manifest_hash[:12]}, query {inp.manifest.obs_filter!r}); resume with the original --shards (the "
            "run's MLflow tag shards_path names it), or start a new run")
    if int(st["world_size"]) != cfg.cluster.num_workers:
        raise TrainUsageError(f"--resume: the checkpoint was written by {st['world_size']} workers; pass "
                              f"--num-workers {st['world_size']} (ZeRO shards are per rank)")
    cfg.cluster.run_name = ckpt.parent.name
    inp.storage = ckpt.parent.parent
    if ModelConfig.from_dict(st["model_config"]) != inp.mcfg:
        raise TrainUsageError("--resume: the model config differs from the checkpoint's; resume with the same "
                              "--config (only schedule knobs such as --max-steps/--epochs may change)")
    return _Resume(str(ckpt), st["mlflow_run_id"], int(st["step"]))


def _name_new_run(cfg: TrainConfig, storage: Path) -> None:
    cfg.cluster.run_name = cfg.cluster.run_name or f"{cfg.tracking.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (storage / cfg.cluster.run_name).exists() and any((storage / cfg.cluster.run_name).glob("checkpoint_*")):
        raise TrainUsageError(f"run {cfg.cluster.run_name!r} already has checkpoints under {storage}; pass "
                              "--resume to continue it or another --run-name")


def _schedule(cfg: TrainConfig, manifest: Manifest) -> _Schedule:
    # the manifest's per-shard counts (what the workers' index will hold): no shard read on the driver
    n_all = sum(s.n_train for s in manifest.shards)
    if n_all == 0:
        raise TrainUsageError(f"--shards {cfg.data.shards}: the shard set holds no training cells; re-run "
                              "`ingest census` with a query that matches cells")
    n_train = min(n_all, cfg.data.max_train_cells or n_all)
    world, ga = cfg.cluster.num_workers, cfg.optim.grad_accum
    steps_per_epoch = train_data.batches_per_epoch(n_train, world, cfg.data.batch_size, ga) // ga
    if n_train // world < steps_per_epoch * ga:
        raise TrainUsageError(f"{n_train} training cells are too few for {world} workers; use fewer workers")
    total_steps = steps_per_epoch * cfg.schedule.epochs
    if cfg.schedule.max_steps is not None:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    return _Schedule(n_train, steps_per_epoch, total_steps)


def _open_run(cfg: TrainConfig, inp: _Inputs, sched: _Schedule) -> str:
    """A new MLflow run holding the config, the data's identity and the DeepSpeed config."""
    from training.parallelize import deepspeed_config

    params = {**cfg.flat(), **{f"model_config.{k}": v for k, v in inp.mcfg.to_dict().items()},
              "data.n_train_cells": sched.n_train, "data.steps_per_epoch": sched.steps_per_epoch,
              "data.total_steps": sched.total_steps}
    tags = {"manifest_hash": inp.manifest_hash, "census_source": json.dumps(inp.manifest.source),
            "census_version": inp.manifest.census_version,
            "obs_filter": inp.manifest.obs_filter, "vocab_hash": inp.vocab.hash(),
            "pretrain_datasets": inp.pretrain_datasets,
            "git_commit": tracking.git_commit(), "shards_path": str(Path(cfg.data.shards).resolve()),
            "ray_run_name": cfg.cluster.run_name, "mlflow.runName": cfg.cluster.run_name}
    return tracking.start_run(
        inp.uri, cfg.tracking.experiment, cfg.cluster.run_name, params=params, tags=tags,
        artifacts={"config.json": cfg.to_dict(), "model_config.json": inp.mcfg.to_dict(),
                   MANIFEST_FILE: inp.manifest.to_json(),
                   "deepspeed_config.json": deepspeed_config(cfg, on_gpu=cfg.cluster.use_gpu)})


def _logged_through(uri: str, run_id: str) -> int:
    """The last step a run logged to MLflow (0: none), so that a resumed run logs each step once."""
    history = tracking.client(uri).get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=0)


def _register(cfg: TrainConfig, inp: _Inputs, run_id: str, ckpt_path: Path, final: dict[str, Any]) -> str | None:
    """Export the final checkpoint and register it (None when registration is off)."""
    if not cfg.tracking.register:
        return None
    from training.registry import export_and_register, lineage_of

    return export_and_register(
        ckpt_path, inp.mcfg, inp.vocab, tracking_uri=inp.uri, run_id=run_id, model_name=cfg.tracking.model_name,
        tags={"run_id": run_id, "manifest_hash": inp.manifest_hash,
              "census_source": json.dumps(inp.manifest.source), "vocab_hash": inp.vocab.hash(),
              "pretrain_datasets": inp.pretrain_datasets, "steps": str(final.get("step", ""))},
        lineage=lineage_of(inp.manifest))


def run_pretrain(cfg: TrainConfig, *, resume: str | None = None, verify_shards: bool = False) -> PretrainResult:
    """Everything ``train pretrain`` does after argument parsing. Raises TrainUsageError on bad input.
    ``verify_shards``: decode and hash every shard before training (the default pre-flight only
    checks hashes of the manifest and vocabulary, completeness and file sizes)."""
    import ray

    inp = _check_inputs(cfg, verify_shards)
    resumed = _check_resume(cfg, inp, resume) if resume is not None else None
    if resumed is None:
        _name_new_run(cfg, inp.storage)
    sched = _schedule(cfg, inp.manifest)

    run_id: str | None = None
    started = _start_ray(cfg)
    try:
        check_resources(cfg)
        logged_through = 0
        if resumed is None:
            run_id = _open_run(cfg, inp, sched)
        else:
            run_id = resumed.run_id
            tracking.reopen_run(inp.uri, run_id)
            logged_through = _logged_through(inp.uri, run_id)
            if logged_through > resumed.step:
                print(f"steps {resumed.step + 1}-{logged_through} ran after checkpoint {resumed.step} before the "
                      "run stopped: they are trained again and not logged to MLflow a second time", flush=True)
        print(f"mlflow run {run_id} ({inp.uri}); {sched.n_train} training cells, {sched.steps_per_epoch} "
              f"steps/epoch, {sched.total_steps} steps"
              + (f", resuming from step {resumed.step}" if resumed is not None else ""), flush=True)
        result = _fit(cfg, inp.mcfg, inp.storage, {
            "train": cfg.to_dict(), "model_config": inp.mcfg.to_dict(), "total_steps": sched.total_steps,
            "resume_path": resumed.path if resumed is not None else None, "mlflow_run_id": run_id,
            "logged_through": logged_through, "tracking_uri": inp.uri, "vocab_hash": inp.vocab.hash(),
            "manifest_hash": inp.manifest_hash,
            "world_size": cfg.cluster.num_workers, "audit_dir": str(inp.storage / cfg.cluster.run_name)})
        try:
            ckpt_path, final = _final_checkpoint(result)
            model_uri = _register(cfg, inp, run_id, ckpt_path, final)
        except BaseException:
            tracking.end_run(inp.uri, run_id, "FAILED")
            raise
        tracking.end_run(inp.uri, run_id, "FINISHED")
        print(f"done: run {run_id}, checkpoint {ckpt_path}" + (f", registered {model_uri}" if model_uri else ""),
              flush=True)
        return PretrainResult(run_id, inp.uri, model_uri, str(ckpt_path), str(inp.storage / cfg.cluster.run_name),
                              final)
    except Interrupted as e:
        if started:  # stop the workers before looking at what they left
            ray.shutdown()
            started = False
        if run_id is not None:
            tracking.end_run(inp.uri, run_id, "KILLED")
        e.kept = _interrupted_note(cfg, inp, run_id)
        raise
    finally:
        if started:
            ray.shutdown()


def _interrupted_note(cfg: TrainConfig, inp: _Inputs, run_id: str | None) -> str:
    """What an interrupted run kept and how to continue it (one line)."""
    run_dir = inp.storage / cfg.cluster.run_name
    try:
        ckpt = find_checkpoint(inp.storage, str(run_dir))
    except TrainUsageError:
        ckpt = None
    run = f"MLflow run {run_id} marked KILLED" if run_id else "no MLflow run was started"
    if ckpt is None:
        return f"no checkpoint was written yet ({run}); start it again with the same command"
    step = json.loads((ckpt / STATE_FILE).read_text())["step"]
    return (f"kept the step-{step} checkpoint {ckpt} ({run}); continue with: train pretrain --resume {run_dir} "
            f"--storage-path {inp.storage}")


def _fit(cfg: TrainConfig, mcfg, storage: Path, loop_config: dict[str, Any]):
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.rendezvous import torch_config

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # the process group's TCPStore on loopback for a local run (torch's default: every interface)
        torch_config=torch_config(cfg.cluster.ray_address, use_gpu=cfg.cluster.use_gpu),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.cluster.run_name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    # fit() in a helper thread: in the main thread Ray Train takes SIGINT over (its handler asks
    # the controller to abort and can wait for minutes); here the main thread only waits, so
    # SIGINT / SIGTERM reach localray.signals, and run_pretrain stops Ray itself
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread below
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        e = box["error"]
        if loop_config.get("mlflow_run_id"):
            tracking.end_run(loop_config["tracking_uri"], loop_config["mlflow_run_id"], "FAILED")
        raise RuntimeError(f"training failed: {e}") from e
    return box["result"]


def _final_checkpoint(result) -> tuple[Path, dict[str, Any]]:
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training ended without a checkpoint")
    path = Path(ckpt.path)
    return path, dict(result.metrics or {})
