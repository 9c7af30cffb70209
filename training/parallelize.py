"""The one place where DeepSpeed touches the model: ``build_engine(model, cfg) -> engine``.

The network from ``scgpt_model`` stays an ordinary single-device ``nn.Module``; this function
wraps it from outside, in a fixed order: precision -> optimizer -> LR schedule -> ZeRO engine.
It expects ``torch.distributed`` to be initialised already (Ray Train does it: gloo on CPU,
nccl on GPU), so DeepSpeed only attaches to the existing process group.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig

log = logging.getLogger(__name__)


def resolve_precision(cfg: TrainConfig, on_gpu: bool) -> str:
    p = cfg.deepspeed.precision
    return ("bf16" if on_gpu else "fp32") if p == "auto" else p


def deepspeed_config(cfg: TrainConfig, *, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (also logged to MLflow as an artifact)."""
    precision = resolve_precision(cfg, on_gpu)
    zero: dict[str, Any] = {
        "stage": cfg.deepspeed.zero_stage,
        "overlap_comm": on_gpu,  # gloo on CPU gains nothing from overlap and it adds buffers
        "contiguous_gradients": True,
    }
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.deepspeed.zero_stage == 3:
        # keep small parameters gathered: the debug/small models are tiny and gathering per
        # layer would dominate; large ones stay partitioned.
        zero["stage3_param_persistence_threshold"] = 10_000
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,  # one optimizer step per accumulated batch
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # our optimizer is plain torch AdamW unless asked otherwise; DeepSpeed only vouches for its own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we print our own line per step
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    warm, floor = max(0, cfg.optim.warmup_steps), cfg.optim.min_lr_ratio
    total = max(total_steps, warm + 1)

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    kind = cfg.deepspeed.optimizer
    if kind == "torch":
        # No compiled ops: works on any CPU; on GPU torch's fused path is used.
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                 weight_decay=o.weight_decay)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay, adamw_mode=True)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


class LossModule(torch.nn.Module):
    """``model(batch) -> (loss, terms)``: tensor outputs, so ZeRO-3 can hook the backward pass.

    The network returns a ``ModelOutput`` dataclass, which DeepSpeed cannot look into; without
    tensor outputs its backward hooks do not fire and partitioned weights stay released.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model(batch)
        return out.loss.total, out.loss.terms


def build_engine(model: torch.nn.Module, cfg: TrainConfig, *, total_steps: int, on_gpu: bool):
    """Wrap ``model`` in a DeepSpeed engine (ZeRO stage, precision, AdamW, warmup+cosine LR).

    Returns the engine; use ``loss, terms = engine(batch)``, ``engine.backward(loss)``, ``engine.step()``
    each micro-batch: DeepSpeed steps the optimizer and the LR schedule once per
    ``grad_accum`` micro-batches and clips the global gradient norm first.
    """
    import deepspeed

    ds_cfg = deepspeed_config(cfg, on_gpu=on_gpu)
    wrapped = LossModule(model)
    optimizer = _optimizer(wrapped, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg, dist_init_required=False)
    log.info("DeepSpeed engine: ZeRO-%d, %s, %s optimizer, grad_accum %d",
             cfg.deepspeed.zero_stage, resolve_precision(cfg, on_gpu), cfg.deepspeed.optimizer, cfg.optim.grad_accum)
    return engine
