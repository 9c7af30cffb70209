"""The Ray Train worker function: everything it needs comes from its ``config`` dict.

The loop is four small parts, each deciding one thing:

* :class:`TrainStep`: one optimizer step, ``grad_accum`` micro-batches of collate (background
  thread) -> forward -> ``engine.backward`` -> ``engine.step`` (DeepSpeed steps the optimizer at
  the accumulation boundary). Its loss record stays on the device.
* :class:`MetricsAccumulator`: turns a step's record into the logged metrics, crossing to the
  host once per step (one all-reduce, one ``.tolist()``), and decides when to log (rank 0
  prints one line and logs to MLflow).
* :class:`Validator`: decides when the validation losses are due and computes them.
* :class:`Checkpointer`: decides when to save; all ranks write a DeepSpeed checkpoint and hand
  it to ``ray.train.report``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training import data as train_data
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


def _allreduce(vec: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over the ranks (in place when there is more than one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    return vec


def _loss_vector(total: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """[total, *terms] as one float64 device vector (no host sync)."""
    return torch.stack([v.detach().reshape(()).to(torch.float64) for v in (total, *terms.values())])


# ---------------------------------------------------------------------------------------------
# the train step
# ---------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """What one optimizer step did, on this rank. ``losses`` is a device tensor (the mean over the
    step's micro-batches of [total, *terms], named by ``loss_names``); the counts are host numbers."""

    loss_names: list[str]
    losses: torch.Tensor
    lr: float  # the lr this optimizer step applied
    last_index: int  # the plan index of the step's last micro-batch
    cells: int = 0
    tokens: int = 0
    slots: int = 0
    flops: float = 0.0
    joinids: list[np.ndarray] = field(default_factory=list)


class TrainStep:
    """One optimizer step over ``grad_accum`` micro-batches drawn from a batch iterator."""

    def __init__(self, engine, mcfg, *, device: torch.device, bf16: bool, grad_accum: int, seed: int, rank: int,
                 count_flops: bool) -> None:
        self.engine, self.mcfg, self.device, self.bf16 = engine, mcfg, device, bf16
        self.grad_accum, self.seed, self.rank, self.count_flops = grad_accum, seed, rank, count_flops

    def __call__(self, batches: Iterator[train_data.LoadedBatch], epoch: int) -> StepRecord | None:
        """The next step of ``batches``, or None when the epoch has no micro-batch left."""
        from scgpt_model.flops import batch_flops

        rec = None
        for i in range(self.grad_accum):
            lb = next(batches, None)
            if lb is None:
                if i:  # the plan holds a multiple of grad_accum micro-batches per epoch
                    raise RuntimeError(f"epoch {epoch} ended inside an accumulation window ({i}/{self.grad_accum})")
                return None
            # dropout draws depend only on (seed, epoch, rank, batch): resume replays them exactly
            torch.manual_seed(_seed_for(self.seed, epoch, self.rank, lb.index))
            batch = _to_device(lb.batch, self.device, self.bf16)
            total, terms = self.engine(batch)
            self.engine.backward(total)
            lr = self.engine.get_lr()[0]  # the lr this optimizer step applies (the scheduler moves in step())
            self.engine.step()
            losses = _loss_vector(total, terms) / self.grad_accum
            if rec is None:
                rec = StepRecord(["loss", *(f"loss_{k}" for k in terms)], torch.zeros_like(losses), lr, lb.index)
            rec.losses += losses
            rec.lr, rec.last_index = lr, lb.index
            rec.cells += batch.n_cells
            rec.tokens += batch.n_tokens
            rec.slots += batch.genes.numel()
            if self.count_flops:
                rec.flops += batch_flops(self.mcfg, batch.n_cells, batch.n_tokens, batch.unknown_count)
            rec.joinids.append(lb.joinids)
        return rec


# ---------------------------------------------------------------------------------------------
# metrics, validation, checkpoints
# ---------------------------------------------------------------------------------------------
class MetricsAccumulator:
    """Reduces each step's record over the ranks into the logged metrics and decides when to log.

    One host sync per step: the loss record and the counts go into one float64 vector, one
    all-reduce, one ``.tolist()``. MFU (only against a known accelerator peak) comes from
    :func:`scgpt_model.flops.mfu`.
    """

    def __init__(self, *, world: int, rank: int, device: torch.device, total_steps: int,
                 peak_flops_per_device: float | None, mlflow_logger=None, log_every: int = 1,
                 logged_through: int = 0) -> None:
        self.world, self.rank, self.device, self.total_steps = world, rank, device, total_steps
        self.peak = peak_flops_per_device
        self.mlflow_logger, self.log_every = mlflow_logger, log_every
        # a resumed run replays the steps between its checkpoint and the interrupt: those are in
        # MLflow already (the replay is deterministic), so they are printed but not logged again
        self.logged_through = logged_through

    def reduce(self, rec: StepRecord, *, grad_norm, started: float, epoch: int) -> dict[str, float]:
        """The step's metrics; ``started`` is the step's ``time.perf_counter()`` start (the wall
        time is read after the host sync, so it covers the device work on an accelerator too)."""
        from scgpt_model.flops import mfu

        counts = torch.tensor([rec.cells, rec.tokens, rec.slots, rec.flops], dtype=torch.float64, device=self.device)
        vec = _allreduce(torch.cat([rec.losses, counts]))
        if isinstance(grad_norm, torch.Tensor):  # already global: rides along, not reduced
            vec = torch.cat([vec, grad_norm.detach().reshape(1).to(vec)])
        host = vec.tolist()  # the one host sync of the step
        seconds = time.perf_counter() - started
        n = len(rec.loss_names)
        losses, (cells, tokens, slots, flops) = host[:n], host[n:n + 4]
        gn = host[n + 4] if isinstance(grad_norm, torch.Tensor) else grad_norm
        metrics = {k: v / self.world for k, v in sorted(zip(rec.loss_names, losses))}
        metrics.update({
            "lr": rec.lr,
            "grad_norm": float(gn) if gn is not None else float("nan"),
            "cells_per_s": cells / seconds, "tokens_per_s": tokens / seconds,
            "padding_fraction": 1.0 - tokens / max(slots, 1.0), "epoch": float(epoch),
        })
        if self.peak is not None:  # global FLOPs over wall x world x per-device peak
            metrics["mfu"] = mfu(flops, seconds, self.world * self.peak)
        return metrics

    def should_log(self, step: int, last: bool) -> bool:
        return step % self.log_every == 0 or last

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        print(f"step {step}/{self.total_steps} epoch {epoch} " + " ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"), flush=True)
        if self.mlflow_logger is not None and step > self.logged_through:
            self.mlflow_logger.log(metrics, step)

    def close(self) -> None:
        """End of training: send any points held through an MLflow outage."""
        if self.mlflow_logger is not None and not self.mlflow_logger.flush():
            log.warning("MLflow metric logging: %d points could not be sent", len(self.mlflow_logger.pending))


class Validator:
    """Mean validation loss terms over the fixed validation subset, every ``every`` steps and at
    the end (all ranks take part)."""

    def __init__(self, engine, cfg: TrainConfig, mcfg, store: train_data.ShardStore, plan: list[np.ndarray], *,
                 device: torch.device, bf16: bool, rank: int) -> None:
        self.engine, self.store, self.plan, self.device, self.bf16 = engine, store, plan, device, bf16
        self.every = cfg.schedule.val_every
        self.collate = make_collate(cfg, mcfg, epoch=0, rank=rank, salt=77)  # fixed masks: comparable over time

    def should_run(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def run(self) -> dict[str, float]:
        names, sums, n = None, None, 0
        self.engine.eval()
        with torch.no_grad():
            for lb in train_data.iterate(self.plan, self.store, self.collate, prefetch=2):
                total, terms = self.engine(_to_device(lb.batch, self.device, self.bf16))
                v = _loss_vector(total, terms) * lb.batch.n_cells
                if names is None:
                    names, sums = ["total", *terms], torch.zeros_like(v)
                sums += v
                n += lb.batch.n_cells
        self.engine.train()
        names = names or []
        vec = torch.zeros(0, dtype=torch.float64, device=self.device) if sums is None else sums
        red = _allreduce(torch.cat([vec, torch.tensor([float(n)], dtype=torch.float64, device=self.device)])).tolist()
        return {f"val_{k}": v / max(red[-1], 1) for k, v in sorted(zip(names, red[:-1]))}


def save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, float], rank: int) -> None:
    """All ranks: DeepSpeed checkpoint into a local temp dir, handed to Ray Train (merged in storage)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="scgpt-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG, client_state={"train_state": state})
        if rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps(state, indent=2))
        ray.train.report({**metrics, "step": state["step"]},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


class Checkpointer:
    """Where training starts, when to save, and the final checkpoint."""

    def __init__(self, engine, *, every: int, base_state: dict[str, Any], rank: int) -> None:
        self.engine, self.every, self.base_state, self.rank = engine, every, base_state, rank
        self.last_saved: int | None = None

    def load(self, ckpt) -> dict[str, Any]:
        """The training state to start from: fresh, or the one in ``ckpt`` (a ray.train.Checkpoint,
        from :func:`start_checkpoint`)."""
        state = {"epoch": 0, "next_batch": 0, "step": 0}
        if ckpt is not None:
            with ckpt.as_directory() as d:
                _, client = self.engine.load_checkpoint(d, tag=DS_TAG)
                state = dict(client["train_state"])
            if self.rank == 0:
                print(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['next_batch']})",
                      flush=True)
        self.last_saved = state["step"]
        return state

    def should_save(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def save(self, *, step: int, epoch: int, next_batch: int, metrics: dict[str, float]) -> None:
        state = {**self.base_state, "epoch": epoch, "next_batch": next_batch, "step": step}
        save_checkpoint(self.engine, state, metrics, self.rank)
        self.last_saved = step

    def finish(self, *, step: int, epochs: int, metrics: dict[str, float]) -> None:
        """The end of training: a final checkpoint unless the last step already has one."""
        if self.last_saved != step or step == 0:  # epochs ran out before max_steps
            self.save(step=step, epoch=epochs, next_batch=0, metrics=metrics)


def checkpoint_step(ckpt) -> int:
    """The optimizer step a checkpoint (a ray.train.Checkpoint) was written at."""
    with ckpt.as_directory() as d:
        return int(json.loads((Path(d) / STATE_FILE).read_text())["step"])


def start_checkpoint(resume_path: str | None, restored):
    """The one checkpoint a worker starts from.

    ``resume_path`` is the checkpoint the driver chose and announced (``--resume``: the newest
    complete one on disk). ``restored`` is Ray Train's ``get_checkpoint()``: after a worker restart
    the newest one reported in this fit, but on a new fit of the same run it is whatever Ray's
    snapshot last recorded, which can be older than the driver's choice (interrupted after a
    checkpoint was written and before Ray recorded it). The driver's choice wins unless Ray's is
    newer (a restart of this fit after later checkpoints).
    """
    import ray.train

    if not resume_path:
        return restored
    chosen = ray.train.Checkpoint(resume_path)
    if restored is not None and checkpoint_step(restored) > checkpoint_step(chosen):
        return restored
    return chosen


# ---------------------------------------------------------------------------------------------
# the worker function
# ---------------------------------------------------------------------------------------------
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
    train_idx, val_idx = train_data.build_index(cfg.data.shards)
    train_idx = train_data.subsample(train_idx, cfg.data.max_train_cells, seed)
    # a bucketing window can span two shuffle blocks: keep both blocks' shards decoded
    store = train_data.ShardStore(train_idx, cache_shards=2 * cfg.data.shuffle_shards)
    val_store = train_data.ShardStore(val_idx)
    val_plan = train_data.validation_plan(val_idx, seed=seed, rank=rank, world=world,
                                          batch_size=cfg.data.batch_size, max_cells=cfg.data.val_max_cells)

    base_state = {k: config[k] for k in ("mlflow_run_id", "vocab_hash", "manifest_hash", "world_size")}
    nodes: list = [None] * world  # which Ray node each rank runs on (recorded in every checkpoint)
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    base_state.update(nodes=nodes, train=config["train"], model_config=config["model_config"])

    # resume: the checkpoint the driver announced (or a newer one Ray Train restored in this fit)
    checkpointer = Checkpointer(engine, every=cfg.schedule.checkpoint_every, base_state=base_state, rank=rank)
    state = checkpointer.load(start_checkpoint(config.get("resume_path"), ray.train.get_checkpoint()))

    mlflow_logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        from training.tracking import MetricLogger

        mlflow_logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"])
    meter = MetricsAccumulator(world=world, rank=rank, device=device, total_steps=total_steps,
                               peak_flops_per_device=cfg.cluster.peak_tflops * 1e12 if on_gpu else None,
                               mlflow_logger=mlflow_logger, logged_through=int(config.get("logged_through", 0)))
    validator = Validator(engine, cfg, mcfg, val_store, val_plan, device=device, bf16=bf16, rank=rank)
    train_step = TrainStep(engine, mcfg, device=device, bf16=bf16, grad_accum=cfg.optim.grad_accum, seed=seed,
                           rank=rank, count_flops=on_gpu)  # MFU only means something against a known peak
    seen_dir = Path(config["audit_dir"]) / "seen" if cfg.data.record_seen else None

    step = state["step"]
    metrics: dict[str, float] = {}
    done = step >= total_steps
    t_step = time.perf_counter()
    for epoch in range(state["epoch"], cfg.schedule.epochs):
        if done:
            break
        plan = train_data.rank_plan(train_idx, seed=seed, epoch=epoch, rank=rank, world=world,
                                    batch_size=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
                                    bucket_window=cfg.data.bucket_window, max_len=mcfg.max_seq_len,
                                    shuffle_shards=cfg.data.shuffle_shards)
        start = state["next_batch"] if epoch == state["epoch"] else 0
        collate = make_collate(cfg, mcfg, epoch=epoch, rank=rank)
        seen: list[np.ndarray] = []
        batches_it = train_data.iterate(plan, store, collate, start=start, prefetch=cfg.data.prefetch_batches)
        with closing(batches_it) as batches:
            while not done and (rec := train_step(batches, epoch)) is not None:
                step += 1
                seen.extend(rec.joinids)
                if cfg.schedule.step_sleep_s:
                    time.sleep(cfg.schedule.step_sleep_s)
                metrics = meter.reduce(rec, grad_norm=engine.get_global_grad_norm(),
                                       started=t_step, epoch=epoch)
                done = step >= total_steps
                if validator.should_run(step, done):
                    metrics.update(validator.run())
                if meter.should_log(step, done):
                    meter.log(step, epoch, metrics)
                if checkpointer.should_save(step, done):
                    end_of_epoch = rec.last_index + 1 == len(plan)
                    checkpointer.save(step=step, epoch=epoch + 1 if end_of_epoch else epoch,
                                      next_batch=0 if end_of_epoch else rec.last_index + 1, metrics=metrics)
                t_step = time.perf_counter()
        if seen_dir is not None:
            train_data.write_seen(seen_dir, epoch, rank, seen)
    checkpointer.finish(step=step, epochs=cfg.schedule.epochs, metrics=metrics)
    meter.close()
