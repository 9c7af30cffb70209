"""The Ray Train worker function: everything it needs comes from its ``config`` dict.

One micro-batch: collate (background thread) -> forward -> ``engine.backward`` ->
``engine.step`` (DeepSpeed steps the optimizer once per ``grad_accum`` micro-batches). After
each optimizer step rank 0 prints one line and logs to MLflow; every ``checkpoint_every`` steps
and at the end all ranks write a DeepSpeed checkpoint and hand it to ``ray.train.report``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training import data as D
from training.config import TrainConfig
from training.parallelize import build_engine, resolve_precision

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"  # in every checkpoint: where to resume and what it belongs to
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-folder) inside a Ray checkpoint


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


def make_collate(cfg: TrainConfig, mcfg, *, epoch: int, rank: int, salt: int = 0):
    """Deterministic collate for (epoch, rank, batch number): one unknown ratio per batch.

    Drawing the ratio per batch (from {0.25, 0.5, 0.75}) rather than per cell keeps the known and
    unknown blocks of similar-length cells aligned, so padding stays at the bucketing level (a
    per-cell ratio pads both blocks to 75% of the length: ~33% waste).
    """
    from scgpt_model.batching import collate_generative, resolve_backend

    backend = resolve_backend(mcfg.attention_backend)
    ratios = np.asarray(cfg.data.unknown_ratios, dtype=float)

    def collate(genes: list, bins: list, b: int):
        rng = np.random.default_rng([cfg.schedule.seed, salt, epoch, rank, b])
        r = float(rng.choice(ratios))
        return collate_generative(genes, bins, max_seq_len=mcfg.max_seq_len, seed=rng, unknown_ratios=(r,),
                                  backend=backend)

    return collate


def _to_device(batch, device: torch.device, bf16: bool):
    batch = batch.to(device, non_blocking=True)
    if bf16:  # DeepSpeed bf16 keeps bf16 params: float inputs must match (bins are exact in bf16)
        batch = dataclasses.replace(batch, values=batch.values.to(torch.bfloat16),
                                    targets=batch.targets.to(torch.bfloat16))
    return batch


def _allreduce(vec: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(vec, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def validate(engine, cfg: TrainConfig, mcfg, store: D.ShardStore, plan: list[np.ndarray], device, bf16: bool,
             rank: int) -> dict[str, float]:
    """Mean validation loss terms over the fixed validation subset (all ranks take part)."""
    collate = make_collate(cfg, mcfg, epoch=0, rank=rank, salt=77)  # fixed masks: comparable over time
    sums: dict[str, float] = {}
    n = 0
    engine.eval()
    with torch.no_grad():
        for lb in D.iterate(plan, store, collate, prefetch=2):
            total, terms = engine(_to_device(lb.batch, device, bf16))
            for k, v in {"total": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * lb.batch.n_cells
            n += lb.batch.n_cells
    engine.train()
    keys = sorted(sums)
    red = _allreduce([sums[k] for k in keys] + [n], device)
    return {f"val_{k}": red[i] / max(red[-1], 1) for i, k in enumerate(keys)}


def _batch_flops(mcfg, batch) -> float:
    """Model FLOPs of one training micro-batch (fwd + bwd), per cell at the batch's mean shape."""
    from scgpt_model.flops import estimate_flops

    per_cell_tokens = max(1, round(batch.n_tokens / batch.n_cells))
    per_cell_keys = max(1, round((batch.n_tokens - batch.unknown_count) / batch.n_cells))
    return float(batch.n_cells * estimate_flops(mcfg, per_cell_tokens, per_cell_keys, training=True))


def save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, float], rank: int) -> None:
    """All ranks: DeepSpeed checkpoint into a local temp dir, handed to Ray Train (merged in storage)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="scgpt-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG, client_state={"train_state": state})
        if rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps(state, indent=2))
        ray.train.report({**metrics, "step": state["step"]},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    from scgpt_model.config import ModelConfig
    from scgpt_model.model import ScGPT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_dict(config["train"])
    mcfg = ModelConfig.from_dict(config["model_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = cfg.cluster.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    bf16 = resolve_precision(cfg, on_gpu) == "bf16"
    seed = cfg.schedule.seed

    # model: the same init on every rank (seeded), then wrapped from outside
    torch.manual_seed(seed)
    model = ScGPT(mcfg).to(device)
    total_steps = int(config["total_steps"])
    engine = build_engine(model, cfg, total_steps=total_steps, on_gpu=on_gpu)

    # data: the index is small (joinid + length per cell); shards are read lazily
    train_idx, val_idx = D.build_index(cfg.data.shards)
    train_idx = D.subsample(train_idx, cfg.data.max_train_cells, seed)
    # a bucketing window can span two shuffle blocks: keep both blocks' shards decoded
    store, val_store = D.ShardStore(train_idx, cache_shards=2 * cfg.data.shuffle_shards), D.ShardStore(val_idx)
    val_plan = D.validation_plan(val_idx, seed=seed, rank=rank, world=world, batch_size=cfg.data.batch_size,
                                 max_cells=cfg.data.val_max_cells)

    # resume: a checkpoint restored by Ray Train (worker restart) or the one the driver found
    state = {"epoch": 0, "next_batch": 0, "step": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_path"):
        ckpt = ray.train.Checkpoint(config["resume_path"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=DS_TAG)
            state = dict(client["train_state"])
        if rank == 0:
            print(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['next_batch']})", flush=True)
    base_state = {k: config[k] for k in ("mlflow_run_id", "vocab_hash", "manifest_hash", "world_size")}
    nodes: list = [None] * world  # which Ray node each rank runs on (recorded in every checkpoint)
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    base_state["nodes"] = nodes
    base_state["train"] = config["train"]
    base_state["model_config"] = config["model_config"]

    metrics_log = None
    if rank == 0 and config.get("mlflow_run_id"):
        from training.tracking import MetricLogger

        metrics_log = MetricLogger(config["tracking_uri"], config["mlflow_run_id"])
    seen_dir = Path(config["audit_dir"]) / "seen" if cfg.data.record_seen else None

    ga = cfg.optim.grad_accum
    step = state["step"]
    last_ckpt = step
    acc: dict[str, float] = {}
    t_step = time.perf_counter()
    metrics: dict[str, float] = {}
    done = step >= total_steps
    for epoch in range(state["epoch"], cfg.schedule.epochs):
        if done:
            break
        plan = D.rank_plan(train_idx, seed=seed, epoch=epoch, rank=rank, world=world, batch_size=cfg.data.batch_size,
                           grad_accum=ga, bucket_window=cfg.data.bucket_window, max_len=mcfg.max_seq_len,
                           shuffle_shards=cfg.data.shuffle_shards)
        start = state["next_batch"] if epoch == state["epoch"] else 0
        collate = make_collate(cfg, mcfg, epoch=epoch, rank=rank)
        seen: list[np.ndarray] = []
        for lb in D.iterate(plan, store, collate, start=start, prefetch=cfg.data.prefetch_batches):
            # dropout draws depend only on (seed, epoch, rank, batch): resume replays them exactly
            torch.manual_seed(_seed_for(seed, epoch, rank, lb.index))
            batch = _to_device(lb.batch, device, bf16)
            total, terms = engine(batch)
            engine.backward(total)
            lr_used = engine.get_lr()[0]  # the lr this optimizer step applies (the scheduler moves in step())
            engine.step()
            seen.append(lb.joinids)
            for k, v in {"loss": total, **{f"loss_{k}": t for k, t in terms.items()}}.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach()) / ga
            acc["cells"] = acc.get("cells", 0.0) + batch.n_cells
            acc["tokens"] = acc.get("tokens", 0.0) + batch.n_tokens
            acc["slots"] = acc.get("slots", 0.0) + batch.genes.numel()
            if on_gpu:  # MFU only means something against a known accelerator peak
                acc["flops"] = acc.get("flops", 0.0) + _batch_flops(mcfg, batch)
            if (lb.index + 1) % ga:
                continue
            # ---- one optimizer step done (the plan has a multiple of ga batches per epoch)
            step += 1
            if cfg.schedule.step_sleep_s:
                time.sleep(cfg.schedule.step_sleep_s)
            keys = sorted(acc)
            red = dict(zip(keys, _allreduce([acc[k] for k in keys], device)))
            dt = time.perf_counter() - t_step
            grad_norm = engine.get_global_grad_norm()
            metrics = {k: red[k] / world for k in keys if k.startswith("loss")}
            metrics.update({
                "lr": lr_used,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "cells_per_s": red["cells"] / dt, "tokens_per_s": red["tokens"] / dt,
                "padding_fraction": 1.0 - red["tokens"] / max(red["slots"], 1.0), "epoch": float(epoch),
            })
            if "flops" in red:  # global FLOPs / (wall x world x per-device peak)
                metrics["mfu"] = red["flops"] / dt / (world * cfg.cluster.peak_tflops * 1e12)
            done = step >= total_steps
            if step % cfg.schedule.val_every == 0 or done:
                metrics.update(validate(engine, cfg, mcfg, val_store, val_plan, device, bf16, rank))
            if rank == 0:
                print(f"step {step}/{total_steps} epoch {epoch} " + " ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"), flush=True)
                if metrics_log is not None:
                    metrics_log.log(metrics, step)
            acc = {}
            if step % cfg.schedule.checkpoint_every == 0 or done:
                state = {**base_state, "epoch": epoch, "next_batch": lb.index + 1, "step": step}
                if lb.index + 1 == len(plan):
                    state.update(epoch=epoch + 1, next_batch=0)
                save_checkpoint(engine, state, metrics, rank)
                last_ckpt = step
            t_step = time.perf_counter()
            if done:
                break
        if seen_dir is not None:
            D.write_seen(seen_dir, epoch, rank, seen)
    if last_ckpt != step or step == 0:  # epochs ran out before max_steps: final checkpoint
        state = {**base_state, "epoch": cfg.schedule.epochs, "next_batch": 0, "step": step}
        save_checkpoint(engine, state, metrics, rank)
