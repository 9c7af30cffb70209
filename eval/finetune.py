"""Fine-tuning loops for the annotation and integration tasks (paper §4.5, §4.8).

Both start from the pretrained weights (or, for the "random init" rows of the score tables,
from a fresh init of the same architecture) and train on a fixed HVG set with zeros included
(``collate_all_genes``): Adam, lr 1e-4 decayed by 0.9 after each epoch, a 9:1 train/validation
split, and the epoch with the best validation loss is kept (§4.8).

* annotation: the CLS objective only (cross-entropy of the cell-type head on ``<cls>``);
* integration: GEP + GEPC on 40% masked values, ECS (beta 0.6, weight 10), DAR (batch
  discriminator behind gradient reversal) and DSBN (batch norm per batch on the input).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from eval.data import PreparedData
from scgpt_model.batching import collate_all_genes
from scgpt_model.config import ModelConfig
from scgpt_model.model import ScGPT

log = logging.getLogger(__name__)

Task = Literal["annotation", "integration"]


@dataclass(kw_only=True, slots=True)
class FineTuneConfig:
    task: Task
    epochs: int = 30  # §4.8: "trained for a fixed duration of 30 epochs"
    lr: float = 1e-4  # §4.8
    lr_decay: float = 0.9  # §4.8: "decayed to 90% after each epoch"
    batch_size: int = 32  # §4.8 mini-batch size
    val_fraction: float = 0.1  # §4.8: 9:1 train/evaluation split
    mask_ratio: float = 0.4  # §4.8: GEP/GEPC mask ratio (integration)
    ecs_beta: float = 0.6  # §4.8
    ecs_weight: float = 10.0  # §4.8
    grad_clip: float = 1.0  # as the reference fine-tuning scripts
    seed: int = 0
    device: str = "cpu"


@dataclass
class FineTuneResult:
    model: ScGPT
    classes: list[str] = field(default_factory=list)  # annotation: label order of the CLS head
    batches: list[str] = field(default_factory=list)  # integration: batch order of DSBN / DAR
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # per epoch: train/val loss, seconds


def task_config(base: ModelConfig, task: Task, n_classes: int = 0, n_batches: int = 0,
                ft: FineTuneConfig | None = None) -> ModelConfig:
    """The fine-tuning architecture: the pretrained one plus the task's heads and objectives."""
    ft = ft or FineTuneConfig(task=task)
    if task == "annotation":
        return base.replace(n_cell_types=n_classes, objectives=dict(gep=False, gepc=False, ecs=False,
                                                                    dar=False, cls=True))
    return base.replace(n_batches=n_batches, dsbn=True, n_cell_types=0,
                        objectives=dict(gep=True, gepc=True, ecs=True, ecs_beta=ft.ecs_beta,
                                        ecs_weight=ft.ecs_weight, dar=True, cls=False))


RANDOM_INIT_SEED_OFFSET = 1_000_003  # random-init baselines draw weights apart from any seed-`seed` init


def build_task_model(pretrained: ScGPT | None, cfg: ModelConfig, seed: int) -> ScGPT:
    """A model with ``cfg``; every pretrained tensor whose name and shape match is copied in.

    ``pretrained=None`` gives the random-init baseline: the same architecture and budget, with
    weights drawn from a seed distinct from the one the new heads use.
    """
    torch.manual_seed(seed if pretrained is not None else seed + RANDOM_INIT_SEED_OFFSET)
    model = ScGPT(cfg)
    if pretrained is not None:
        own = model.state_dict()
        src = {k: v for k, v in pretrained.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(src, strict=False)
        fresh = sorted(set(own) - set(src))
        log.info("fine-tune model: %d tensors from the pretrained model, %d new (%s%s)", len(src), len(fresh),
                 ", ".join(fresh[:4]), "..." if len(fresh) > 4 else "")
    return model


def _codes(values: np.ndarray, order: list[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(order)}
    return np.asarray([index[v] for v in values], dtype=np.int64)


def _batches(n: int, size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, size):
        yield order[s:s + size]


def _collate(data: PreparedData, dense: np.ndarray, idx: np.ndarray, *, mask_ratio: float, seed,
             backend: str, labels: np.ndarray | None, batches: np.ndarray | None):
    return collate_all_genes(data.token_ids, dense[idx], seed=seed, mask_ratio=mask_ratio, mode="mlm",
                             backend=backend, batch_labels=None if batches is None else batches[idx],
                             celltype_labels=None if labels is None else labels[idx])


def fine_tune(pretrained: ScGPT | None, base_cfg: ModelConfig, data: PreparedData, ft: FineTuneConfig,
              name: str = "") -> FineTuneResult:
    """Fine-tune on ``data`` (the reference cells); returns the best-validation model."""
    rng = np.random.default_rng(ft.seed)
    classes = sorted(set(data.labels)) if ft.task == "annotation" else []
    batch_names = sorted(set(data.batches)) if ft.task == "integration" else []
    labels = _codes(data.labels, classes) if classes else None
    batches = _codes(data.batches, batch_names) if batch_names else None
    cfg = task_config(base_cfg, ft.task, len(classes), len(batch_names), ft)
    model = build_task_model(pretrained, cfg, ft.seed).to(ft.device)
    backend = model.collate_backend()
    dense = data.bins.toarray().astype(np.float32)  # (n_cells, n_genes) bins with zeros: all genes
    perm = rng.permutation(data.n_cells)
    n_val = max(1, int(round(ft.val_fraction * data.n_cells)))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    mask = ft.mask_ratio if ft.task == "integration" else 0.0
    opt = torch.optim.Adam(model.parameters(), lr=ft.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=ft.lr_decay)
    best, best_state, best_epoch, history = np.inf, None, 0, []
    for epoch in range(1, ft.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        tot, n = 0.0, 0
        for b in _batches(tr_idx.size, ft.batch_size, rng):
            idx = tr_idx[b]
            if ft.task == "integration" and idx.size < 2:
                continue  # ECS and DSBN's batch norm need at least two cells
            batch = _collate(data, dense, idx, mask_ratio=mask, seed=rng, backend=backend,
                             labels=labels, batches=batches).to(ft.device)
            loss = model(batch).loss.total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ft.grad_clip)
            opt.step()
            tot += float(loss.detach()) * idx.size
            n += idx.size
        sched.step()
        val = evaluate_loss(model, data, dense, val_idx, ft, labels, batches, backend)
        history.append({"epoch": epoch, "train_loss": tot / max(n, 1), "val_loss": val,
                        "seconds": time.perf_counter() - t0})
        log.info("fine-tune %s %s epoch %d/%d: train %.4f val %.4f (%.1fs)", name, ft.task, epoch, ft.epochs,
                 tot / max(n, 1), val, history[-1]["seconds"])
        if val < best:
            best, best_epoch = val, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FineTuneResult(model=model, classes=classes, batches=batch_names, best_epoch=best_epoch,
                          history=history)


@torch.no_grad()
def evaluate_loss(model: ScGPT, data: PreparedData, dense: np.ndarray, idx: np.ndarray, ft: FineTuneConfig,
                  labels, batches, backend: str) -> float:
    """Validation loss: CLS cross-entropy (annotation) or GEP on 40% masked values (integration,
    §4.8), with a fixed mask seed so epochs are compared on the same masks."""
    model.eval()
    rng = np.random.default_rng(ft.seed + 1)
    tot, n = 0.0, 0
    for b in _batches(idx.size, ft.batch_size, None):
        sel = idx[b]
        mask = ft.mask_ratio if ft.task == "integration" else 0.0
        batch = _collate(data, dense, sel, mask_ratio=mask, seed=rng, backend=backend,
                         labels=labels, batches=batches).to(ft.device)
        terms = model(batch).loss.terms
        v = terms["cls"] if ft.task == "annotation" else terms["gep"]
        tot += float(v) * sel.size
        n += sel.size
    model.train()
    return tot / max(n, 1)


@torch.no_grad()
def embed_fixed_genes(model: ScGPT, data: PreparedData, *, batch_names: list[str] | None = None,
                      batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """(n_cells, d_model) cell embeddings on the HVG set with zeros (fine-tuned models)."""
    model.eval()
    dense = data.bins.toarray().astype(np.float32)
    batches = _codes(data.batches, batch_names) if batch_names else None
    out = []
    for b in _batches(data.n_cells, batch_size, None):
        batch = _collate(data, dense, b, mask_ratio=0.0, seed=0, backend=model.collate_backend(),
                         labels=None, batches=batches).to(device)
        out.append(model.embed_cells(batch).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def predict_labels(model: ScGPT, data: PreparedData, classes: list[str], *, batch_size: int = 64,
                   device: str = "cpu") -> np.ndarray:
    """Cell-type predictions of the CLS head (annotation models)."""
    model.eval()
    dense = data.bins.toarray().astype(np.float32)
    preds = []
    for b in _batches(data.n_cells, batch_size, None):
        batch = _collate(data, dense, b, mask_ratio=0.0, seed=0, backend=model.collate_backend(),
                         labels=None, batches=None).to(device)
        logits = model(batch, compute_loss=False).cls_logits
        preds.append(logits.argmax(-1).cpu().numpy())
    return np.asarray(classes)[np.concatenate(preds)]
