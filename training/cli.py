"""``train`` console script: ``train pretrain --config <preset|yaml> --shards PATH [...]``.

Thin: parse, build the config, run, print. Bad input -> one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.config import PRESETS, TrainConfig, load_config
from training.errors import TrainUsageError

log = logging.getLogger(__name__)

# (flag, dotted config key, type, help)
OVERRIDES: list[tuple[str, str, type, str]] = [
    ("--epochs", "schedule.epochs", int, "passes over the training cells"),
    ("--max-steps", "schedule.max_steps", int, "stop after this many optimizer steps"),
    ("--batch-size", "data.batch_size", int, "cells per worker per micro-batch"),
    ("--lr", "optim.lr", float, "peak learning rate (Adam)"),
    ("--warmup-steps", "optim.warmup_steps", int, "linear warmup steps before cosine decay"),
    ("--grad-accum", "optim.grad_accum", int, "micro-batches per optimizer step"),
    ("--zero-stage", "deepspeed.zero_stage", int, "DeepSpeed ZeRO stage 1, 2 or 3"),
    ("--precision", "deepspeed.precision", str, "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16"),
    ("--optimizer", "deepspeed.optimizer", str, "torch (AdamW), cpu_adam or fused_adam"),
    ("--checkpoint-every", "schedule.checkpoint_every", int, "optimizer steps between checkpoints"),
    ("--val-every", "schedule.val_every", int, "optimizer steps between validation losses"),
    ("--seed", "schedule.seed", int, "seed of data order, masking, dropout and init"),
    ("--max-train-cells", "data.max_train_cells", int, "train on a fixed random subset of this many cells"),
    ("--val-max-cells", "data.val_max_cells", int, "validation cells scored each time"),
    ("--storage-path", "cluster.storage_path", str, "Ray Train storage for checkpoints (shared FS or s3://)"),
    ("--run-name", "cluster.run_name", str, "name of the run folder under --storage-path"),
    ("--cpus-per-worker", "cluster.cpus_per_worker", float, "CPUs reserved per training worker"),
    ("--model-name", "tracking.model_name", str, "registered model name (models:/<name>/<version>)"),
    ("--tracking-uri", "tracking.tracking_uri", str, "MLflow tracking URI (default MLFLOW_TRACKING_URI, "
                                                     "else sqlite:///<cwd>/mlflow.db)"),
    ("--experiment", "tracking.experiment", str, "MLflow experiment name"),
    ("--step-sleep", "schedule.step_sleep_s", float, argparse.SUPPRESS),  # testing aid (kill timing)
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="Pretrain scGPT on Census shards with Ray Train + DeepSpeed")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="generative pretraining (GEP + GEPC), tracked in MLflow, registered at the end")
    pre.add_argument("--config", default=None,
                     help=f"a preset ({', '.join(PRESETS)}) or a YAML file (may name `preset:` and override any key)")
    pre.add_argument("--shards", help="folder written by `ingest census` (manifest.json, vocab.json, shards/)")
    pre.add_argument("--num-workers", type=int, help="Ray Train workers (default 2)")
    pre.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, bf16, nccl")
    pre.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one on loopback)")
    pre.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                     help="continue a run from its newest checkpoint: no value = newest run under --storage-path, "
                          "or a run name, or a run/checkpoint folder")
    pre.add_argument("--no-register", action="store_true", help="skip the MLflow model registration")
    pre.add_argument("--record-seen", action="store_true",
                     help="audit: each worker writes the soma_joinids it trained on per epoch (<run>/seen/)")
    for flag, key, typ, hlp in OVERRIDES:
        pre.add_argument(flag, type=typ, dest=key.replace(".", "__"), help=hlp,
                         metavar=flag.lstrip("-").upper().replace("-", "_"))
    return p


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The preset/YAML (or, on resume, the checkpoint's saved config) plus the flags given."""
    from training.config import apply_overrides

    cfg = base if base is not None else load_config(args.config or "debug")
    values: dict[str, dict] = {}
    for _, key, _, _ in OVERRIDES:
        v = getattr(args, key.replace(".", "__"))
        if v is not None:
            sec, name = key.split(".")
            values.setdefault(sec, {})[name] = v
    if args.shards is not None:
        values.setdefault("data", {})["shards"] = args.shards
    if args.num_workers is not None:
        values.setdefault("cluster", {})["num_workers"] = args.num_workers
    if args.use_gpu:
        values.setdefault("cluster", {})["use_gpu"] = True
    if args.ray_address is not None:
        values.setdefault("cluster", {})["ray_address"] = args.ray_address
    if args.record_seen:
        values.setdefault("data", {})["record_seen"] = True
    if args.no_register:
        values.setdefault("tracking", {})["register"] = False
    apply_overrides(cfg, values, where="command line")
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    args = build_parser().parse_args(argv)
    try:
        base = None
        if args.resume is not None:  # the run's own config, then only the flags given now
            import json

            from training.launch import find_checkpoint
            from training.worker import STATE_FILE

            storage = Path(getattr(args, "cluster__storage_path") or TrainConfig().cluster.storage_path).resolve()
            ckpt = find_checkpoint(storage, args.resume)
            base = TrainConfig.from_dict(json.loads((ckpt / STATE_FILE).read_text())["train"])
            args.resume = str(ckpt)
        cfg = config_from_args(args, base)
        from training.launch import run_pretrain

        res = run_pretrain(cfg, resume=args.resume)
    except TrainUsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"model: {res.model_uri or '(not registered)'}  run: {res.run_id}  tracking: {res.tracking_uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
