"""``train`` console script: ``train pretrain --config <preset|yaml> --shards PATH [...]``.

Thin: parse, build the config, run, print. Bad input -> one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import typing
from pathlib import Path

import localray
from localray.signals import Interrupted, stop_on_signals
from training.config import PRESETS, ZERO_STAGES, Optimizer, Precision, TrainConfig, load_config
from training.errors import TrainUsageError

log = logging.getLogger(__name__)

# (flag, dotted config key, type, help); the default of each is the --config's value
OVERRIDES: list[tuple[str, str, type, str]] = [
    ("--epochs", "schedule.epochs", int, "passes over the training cells, an integer >= 1"),
    ("--max-steps", "schedule.max_steps", int, "stop after this many optimizer steps, an integer >= 1"),
    ("--batch-size", "data.batch_size", int, "cells per worker per micro-batch, an integer >= 1"),
    ("--lr", "optim.lr", float, "peak learning rate (Adam), a number > 0, e.g. 1e-4"),
    ("--warmup-steps", "optim.warmup_steps", int, "linear warmup steps before cosine decay, an integer >= 0"),
    ("--grad-accum", "optim.grad_accum", int, "micro-batches per optimizer step, an integer >= 1"),
    ("--zero-stage", "deepspeed.zero_stage", int, "DeepSpeed ZeRO stage: 1 (optimizer states sharded), "
                                                  "2 (+ gradients) or 3 (+ parameters)"),
    ("--precision", "deepspeed.precision", str, "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16"),
    ("--optimizer", "deepspeed.optimizer", str, "torch (AdamW, works everywhere), cpu_adam or fused_adam (GPU "
                                                "only; both compile DeepSpeed ops on first use)"),
    ("--checkpoint-every", "schedule.checkpoint_every", int, "optimizer steps between checkpoints, an integer >= 1"),
    ("--val-every", "schedule.val_every", int, "optimizer steps between validation losses, an integer >= 1"),
    ("--seed", "schedule.seed", int, "seed of data order, masking, dropout and init, any integer"),
    ("--max-train-cells", "data.max_train_cells", int, "train on a fixed random subset of this many cells, "
                                                       "an integer >= 1"),
    ("--val-max-cells", "data.val_max_cells", int, "validation cells scored each time, an integer >= 1"),
    ("--storage-path", "cluster.storage_path", str, "Ray Train storage for checkpoints (shared FS or s3://)"),
    ("--run-name", "cluster.run_name", str, "name of the run folder under --storage-path "
                                            "(default: <model-name>-<UTC time>)"),
    ("--cpus-per-worker", "cluster.cpus_per_worker", float, "CPUs reserved per training worker, a number > 0"),
    ("--model-name", "tracking.model_name", str, "registered model name (models:/<name>/<version>)"),
    ("--tracking-uri", "tracking.tracking_uri", str, "MLflow tracking URI (default MLFLOW_TRACKING_URI, "
                                                     "else sqlite:///<cwd>/mlflow.db)"),
    ("--experiment", "tracking.experiment", str, "MLflow experiment name"),
    ("--step-sleep", "schedule.step_sleep_s", float, argparse.SUPPRESS),  # testing aid (kill timing)
]
# options with a closed set of values, shown as {a,b,c}; training.config.check_config checks them (for YAML too)
CHOICES: dict[str, tuple] = {"deepspeed.zero_stage": ZERO_STAGES, "deepspeed.precision": typing.get_args(Precision),
                             "deepspeed.optimizer": typing.get_args(Optimizer)}


def version() -> str:
    """The installed package's version (package metadata), for ``--version``."""
    try:
        return importlib.metadata.version("scgpt-census")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without `pip install -e .`
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="Pretrain scGPT on Census shards with Ray Train + DeepSpeed")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="generative pretraining (GEP + GEPC), tracked in MLflow, registered at the end",
                         description="Generative pretraining (GEP + GEPC) on Ray Train + DeepSpeed, tracked in MLflow "
                         "and registered at the end. An option left out keeps the value of --config (or, on --resume, "
                         "of the run).")
    pre.add_argument("--config", default=None,
                     help=f"a preset ({', '.join(PRESETS)}) or a YAML file (may name `preset:` and override any key)")
    pre.add_argument("--shards", help="folder written by `ingest census` (manifest.json, vocab.json, shards/)")
    pre.add_argument("--num-workers", type=int, help="Ray Train workers, an integer >= 1 (default 2)")
    pre.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, bf16, nccl")
    pre.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one on loopback)")
    pre.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                     help="continue a run from its newest checkpoint: no value = newest run under --storage-path, "
                          "or a run name, or a run/checkpoint folder")
    pre.add_argument("--no-register", action="store_true", help="skip the MLflow model registration")
    pre.add_argument("--verify-shards", action="store_true",
                     help="decode and hash every shard before step 1, as `ingest validate` does (default: the cheap "
                          "pre-flight: manifest and vocabulary hashes, completeness, file sizes)")
    pre.add_argument("--record-seen", action="store_true",
                     help="audit: each worker writes the soma_joinids it trained on per epoch (<run>/seen/)")
    for flag, key, typ, hlp in OVERRIDES:
        metavar = ("{" + ",".join(map(str, CHOICES[key])) + "}" if key in CHOICES
                   else flag.lstrip("-").upper().replace("-", "_"))
        pre.add_argument(flag, type=typ, dest=key.replace(".", "__"), help=hlp, metavar=metavar)
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
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    localray.quiet.no_progress_bars_unless_terminal()  # before ray/deepspeed/mlflow import tqdm
    args = build_parser().parse_args(argv)
    with stop_on_signals():
        return _pretrain(args)


def _pretrain(args: argparse.Namespace) -> int:
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
        localray.prepare(cfg.cluster.ray_address)  # before anything imports ray
        from training.launch import run_pretrain

        res = run_pretrain(cfg, resume=args.resume, verify_shards=args.verify_shards)
    except TrainUsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except localray.LocalRayError as e:  # not bad input: the machine could not start Ray
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:  # Ray is shut down and the run marked KILLED by now
        print(f"interrupted by {e.name}: {e.kept or 'nothing was written'}", file=sys.stderr, flush=True)
        return e.exit_code
    print(f"model: {res.model_uri or '(not registered)'}  run: {res.run_id}  tracking: {res.tracking_uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
