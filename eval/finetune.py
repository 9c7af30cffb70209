"""Fine-tuning loops for the annotation and integration tasks (paper §4.5, §4.8).

Both start from the pretrained weights (or, for the "random init" rows of the score tables,
from a fresh init of the same architecture) and train on a fixed HVG set (``collate_all_genes``)
with a 9:1 train/validation split (§4.8). Each cell enters as its expressed HVGs with their bins,
as pretraining saw cells and as the reference fine-tuning does (``include_zero_gene=False``);
``include_zeros=True`` feeds every HVG with zeros as bin 0 (on symphony 4.5x slower and less
accurate: BENCHMARKS.md, "Zeros out"). The optimiser is AdamW with a linear warm-up over the first
steps, then the paper's decay to 90% per epoch (when ``min_steps`` adds epochs, the decay of the
epochs asked for is spread over the longer run). The paper's lr 1e-4 is for its pretrained
512-wide model; ``lr=None`` scales it with the width (Adam's effective step on a hidden layer
shrinks with fan-in, so narrow models take a larger lr): 1e-4 x (512 / d_model)^1.2, capped at
3e-3. Annotation keeps the epoch with the best validation accuracy (ties: lower loss);
integration the epoch with the lowest validation GEP loss.
Measurements behind these choices: BENCHMARKS.md, "Why fine-tuning learned nothing".

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
from eval.errors import EvalError
from scgpt_model.batching import collate_all_genes
from scgpt_model.checkpoint import CheckpointError, load_compatible
from scgpt_model.config import CellEmbStyle, ModelConfig
from scgpt_model.model import ScGPT

log = logging.getLogger(__name__)

Task = Literal["annotation", "integration"]


@dataclass(kw_only=True, slots=True)
class FineTuneConfig:
    task: Task
    epochs: int = 30  # §4.8: "trained for a fixed duration of 30 epochs"
    # a floor on optimizer steps: a small reference (10% of the labels: ~50 cells) gets 2 steps per
    # epoch, so a fixed epoch count leaves it at the class prior; the epochs are raised to reach this
    min_steps: int = 0
    lr: float | None = None  # None: the paper's 1e-4 at width 512, scaled with the width (default_lr)
    lr_decay: float = 0.9  # §4.8: "decayed to 90% after each epoch" (of the `epochs` asked for: when --min-steps
    # adds epochs, the same total decay is spread over the longer run, so the added steps are not at ~0 lr)
    warmup_fraction: float = 0.1  # linear warm-up over this share of all optimizer steps
    weight_decay: float = 0.01  # AdamW (decoupled); 0 = the paper's plain Adam
    batch_size: int = 32  # §4.8 mini-batch size
    val_fraction: float = 0.1  # §4.8: 9:1 train/evaluation split
    mask_ratio: float = 0.4  # §4.8: GEP/GEPC mask ratio (integration)
    ecs_beta: float = 0.6  # §4.8
    ecs_weight: float = 10.0  # §4.8
    grad_clip: float = 1.0  # as the reference fine-tuning scripts
    include_zeros: bool = False  # input: every HVG with zeros as bin 0; False: the cell's expressed HVGs only
    class_weight: Literal["balanced", "none"] = "none"  # annotation: "balanced" weights the cross-entropy by inverse
    # class frequency over the training cells (sklearn's "balanced"), so rare types count in the loss
    cell_emb: CellEmbStyle | None = None  # the cell embedding the CLS head / ECS / DAR read: "cls" or "avg-pool"
    # (the mean final gene state); None keeps the pretrained model's (BENCHMARKS.md, issue 10)
    dropout: float | None = None  # None: the pretrained model's (the official annotation tutorial fine-tunes at 0.2)
    gene_dropout: float = 0.0  # augmentation of the training cells: each step, each cell loses a share of its
    # expressed input genes drawn per cell uniformly from [0, gene_dropout), so the head cannot lean on how many genes a
    # cell has (sequencing depth differs between chemistries; BENCHMARKS.md, issue 10). Validation and
    # prediction see every gene.
    seed: int = 0
    device: str = "cpu"


@dataclass
class FineTuneResult:
    model: ScGPT
    classes: list[str] = field(default_factory=list)  # annotation: label order of the CLS head
    batches: list[str] = field(default_factory=list)  # integration: batch order of DSBN / DAR
    best_epoch: int = 0
    include_zeros: bool = False  # the input convention it was trained on (embeddings and predictions reuse it)
    history: list[dict] = field(default_factory=list)  # per epoch: train/val loss, seconds


def task_config(base: ModelConfig, task: Task, n_classes: int = 0, n_batches: int = 0,
                ft: FineTuneConfig | None = None) -> ModelConfig:
    """The fine-tuning architecture: the pretrained one plus the task's heads and objectives."""
    ft = ft or FineTuneConfig(task=task)
    if ft.cell_emb is not None:
        base = base.replace(cell_emb_style=ft.cell_emb)
    if ft.dropout is not None:
        base = base.replace(dropout=ft.dropout)
    if task == "annotation":
        return base.replace(n_cell_types=n_classes, objectives=dict(gep=False, gepc=False, ecs=False,
                                                                    dar=False, cls=True, depth_adv=False))
    return base.replace(n_batches=n_batches, dsbn=True, n_cell_types=0,
                        objectives=dict(gep=True, gepc=True, ecs=True, ecs_beta=ft.ecs_beta,
                                        ecs_weight=ft.ecs_weight, dar=True, cls=False, depth_adv=False))


def default_lr(d_model: int) -> float:
    """The paper's fine-tuning lr (1e-4 at d_model 512), scaled as (512 / width)^1.2, at most 3e-3.

    Measured on pbmc3k from random init (debug preset, width 32): lr 1e-4 and 1e-3 stay at the
    majority class within 10 epochs, 3e-3 reaches 0.54 accuracy (logistic regression 0.63)."""
    return min(3e-3, 1e-4 * (512 / d_model) ** 1.2)


RANDOM_INIT_SEED_OFFSET = 1_000_003  # random-init baselines draw weights apart from any seed-`seed` init


def build_task_model(pretrained: ScGPT | None, cfg: ModelConfig, seed: int) -> ScGPT:
    """A model with ``cfg``; every pretrained tensor whose name and shape match is copied in.

    ``pretrained=None`` gives the random-init baseline: the same architecture and budget, with
    weights drawn from a seed distinct from the one the new heads use.
    """
    torch.manual_seed(seed if pretrained is not None else seed + RANDOM_INIT_SEED_OFFSET)
    model = ScGPT(cfg)
    if pretrained is not None:
        try:  # the checkpoint's one rule: new heads start fresh, a trunk tensor whose shape changed is an error
            fresh = load_compatible(model, pretrained.state_dict(), strict=False)
        except CheckpointError as e:
            raise EvalError(f"the fine-tuning model does not fit the pretrained weights: {e}. Fine-tune with the "
                            "pretrained architecture (drop the override that resizes its trunk)") from None
        log.info("fine-tune model: %d tensors from the pretrained model, %d new (%s%s)",
                 len(model.state_dict()) - len(fresh), len(fresh), ", ".join(fresh[:4]),
                 "..." if len(fresh) > 4 else "")
    return model


def _codes(values: np.ndarray, order: list[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(order)}
    return np.asarray([index[v] for v in values], dtype=np.int64)


def _batches(n: int, size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, size):
        yield order[s:s + size]


def _drop_genes(rows: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``rows`` with each cell's expressed genes set to zero at a rate drawn per cell from [0, share)."""
    rate = rng.uniform(0.0, share, size=(rows.shape[0], 1))
    return np.where(rng.random(rows.shape) < rate, 0.0, rows).astype(rows.dtype, copy=False)


def _collate(data: PreparedData, dense: np.ndarray, idx: np.ndarray, *, mask_ratio: float, seed,
             backend: str, labels: np.ndarray | None, batches: np.ndarray | None, include_zeros: bool,
             gene_dropout: float = 0.0):
    rows = dense[idx]
    if gene_dropout > 0:  # training-time augmentation (FineTuneConfig.gene_dropout); seed is the loop's Generator
        rows = _drop_genes(rows, gene_dropout, seed)
    if include_zeros:
        genes, values = data.token_ids, rows
    else:  # each cell's expressed HVGs (a cell with none keeps only <cls>)
        keep = rows > 0
        genes, values = [data.token_ids[k] for k in keep], [r[k] for r, k in zip(rows, keep)]
    return collate_all_genes(genes, values, seed=seed, mask_ratio=mask_ratio, mode="mlm",
                             backend=backend, batch_labels=None if batches is None else batches[idx],
                             celltype_labels=None if labels is None else labels[idx])


def train_step(model: ScGPT, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
               sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One optimizer step on ``loss`` (gradients clipped to ``grad_clip``); returns the loss as a float.
    Every fine-tuning loop (annotation, integration, multi-omic, perturbation) steps through here."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def _fmt_s(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


LONG_RUN_S = 3600.0  # warn up front when a fine-tune is estimated to take longer than this


def fine_tune(pretrained: ScGPT | None, base_cfg: ModelConfig, data: PreparedData, ft: FineTuneConfig,
              name: str = "") -> FineTuneResult:
    """Fine-tune on ``data`` (the reference cells); returns the model of the best validation epoch."""
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
    lr = ft.lr if ft.lr is not None else default_lr(cfg.d_model)
    steps_per_epoch = -(-tr_idx.size // ft.batch_size)
    epochs = max(ft.epochs, -(-ft.min_steps // steps_per_epoch))
    if epochs > ft.epochs:
        log.info("fine-tune %s: %d epochs of %d steps are below --min-steps %d; training %d epochs", name,
                 ft.epochs, steps_per_epoch, ft.min_steps, epochs)
    total = steps_per_epoch * epochs
    warmup = max(1, int(round(ft.warmup_fraction * total))) if ft.warmup_fraction > 0 else 0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ft.weight_decay)
    decay_every = max(1, round(total / ft.epochs))  # steps_per_epoch unless --min-steps stretched the run

    def lr_factor(s: int) -> float:  # warm-up per step, then the paper's per-epoch decay
        return min(1.0, (s + 1) / warmup if warmup else 1.0) * ft.lr_decay ** (s // decay_every)

    weight = None
    if labels is not None and ft.class_weight == "balanced":
        counts = np.bincount(labels[tr_idx], minlength=len(classes)).astype(np.float64)
        weight = torch.tensor(tr_idx.size / (len(classes) * np.maximum(counts, 1.0)), dtype=torch.float32,
                              device=ft.device)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    log.info("fine-tune %s %s: %d train / %d validation cells x %d genes, %d epochs x %d steps, lr %.2g "
             "(AdamW, wd %g, warm-up %d steps%s)", name, ft.task, tr_idx.size, val_idx.size, data.n_genes,
             epochs, steps_per_epoch, lr, ft.weight_decay, warmup,
             f", gene dropout up to {ft.gene_dropout:g}" if ft.gene_dropout else "")
    best_key, best_state, best_epoch, history = None, None, 0, []
    t_start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        tot, n = 0.0, 0
        for b in _batches(tr_idx.size, ft.batch_size, rng):
            idx = tr_idx[b]
            if ft.task == "integration" and idx.size < 2:
                continue  # ECS and DSBN's batch norm need at least two cells
            batch = _collate(data, dense, idx, mask_ratio=mask, seed=rng, backend=backend,
                             labels=labels, batches=batches, include_zeros=ft.include_zeros,
                             gene_dropout=ft.gene_dropout).to(ft.device)
            loss = model(batch, cls_class_weight=weight).loss.total
            tot += train_step(model, opt, loss, ft.grad_clip, sched) * idx.size
            n += idx.size
            if sched.last_epoch == 3 and total > 3:  # after 3 scheduler steps: a measured estimate of the whole run
                est = (time.perf_counter() - t_start) / 3 * total * (1 + ft.val_fraction)
                msg = (f"fine-tune {name} {ft.task}: estimated {_fmt_s(est)} on {ft.device} "
                       f"({epochs} epochs x {steps_per_epoch} steps, {data.n_genes} genes per cell)")
                if est > LONG_RUN_S:
                    log.warning("%s. To shorten it: fewer genes (--n-hvg; attention cost grows with the "
                                "square), fewer cells (--max-cells), fewer --epochs, or a GPU (--device cuda)", msg)
                else:
                    log.info("%s", msg)
        val, acc = evaluate_loss(model, data, dense, val_idx, ft, labels, batches, backend)
        sec = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": tot / max(n, 1), "val_loss": val, "val_accuracy": acc,
                        "lr": opt.param_groups[0]["lr"], "seconds": sec})
        eta = (time.perf_counter() - t_start) / epoch * (epochs - epoch)
        log.info("fine-tune %s %s epoch %d/%d: train %.4f val %.4f%s (%.1fs, ETA %s)", name, ft.task, epoch,
                 epochs, tot / max(n, 1), val, "" if acc is None else f" val acc {acc:.3f}", sec, _fmt_s(eta))
        key = (-acc, val) if acc is not None else (val,)
        if best_key is None or key < best_key:
            best_key, best_epoch = key, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FineTuneResult(model=model, classes=classes, batches=batch_names, best_epoch=best_epoch,
                          include_zeros=ft.include_zeros, history=history)


@torch.no_grad()
def evaluate_loss(model: ScGPT, data: PreparedData, dense: np.ndarray, idx: np.ndarray, ft: FineTuneConfig,
                  labels, batches, backend: str) -> tuple[float, float | None]:
    """(validation loss, validation accuracy or None): CLS cross-entropy and accuracy (annotation),
    or GEP on 40% masked values (integration, §4.8) with a fixed mask seed so that epochs are
    compared on the same masks."""
    model.eval()
    rng = np.random.default_rng(ft.seed + 1)
    tot, n, right = 0.0, 0, 0
    for b in _batches(idx.size, ft.batch_size, None):
        sel = idx[b]
        mask = ft.mask_ratio if ft.task == "integration" else 0.0
        batch = _collate(data, dense, sel, mask_ratio=mask, seed=rng, backend=backend,
                         labels=labels, batches=batches, include_zeros=ft.include_zeros).to(ft.device)
        out = model(batch)
        terms = out.loss.terms
        v = terms["cls"] if ft.task == "annotation" else terms["gep"]
        if ft.task == "annotation":
            right += int((out.cls_logits.argmax(-1).cpu().numpy() == labels[sel]).sum())
        tot += float(v) * sel.size
        n += sel.size
    model.train()
    return tot / max(n, 1), (right / max(n, 1) if ft.task == "annotation" else None)


@torch.no_grad()
def embed_fixed_genes(model: ScGPT, data: PreparedData, *, batch_names: list[str] | None = None,
                      batch_size: int = 64, device: str = "cpu", style: str | None = None,
                      include_zeros: bool = False) -> np.ndarray:
    """(n_cells, d_model) cell embeddings of a fine-tuned model on its HVG set (``include_zeros``: as it
    was fine-tuned)."""
    model.eval()
    dense = data.bins.toarray().astype(np.float32)
    batches = _codes(data.batches, batch_names) if batch_names else None
    out = []
    for b in _batches(data.n_cells, batch_size, None):
        batch = _collate(data, dense, b, mask_ratio=0.0, seed=0, backend=model.collate_backend(),
                         labels=None, batches=batches, include_zeros=include_zeros).to(device)
        out.append(model.embed_cells(batch, style=style).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def predict_labels(model: ScGPT, data: PreparedData, classes: list[str], *, batch_size: int = 64,
                   device: str = "cpu", include_zeros: bool = False) -> np.ndarray:
    """Cell-type predictions of the CLS head (annotation models)."""
    model.eval()
    dense = data.bins.toarray().astype(np.float32)
    preds = []
    for b in _batches(data.n_cells, batch_size, None):
        batch = _collate(data, dense, b, mask_ratio=0.0, seed=0, backend=model.collate_backend(),
                         labels=None, batches=None, include_zeros=include_zeros).to(device)
        logits = model(batch, compute_loss=False).cls_logits
        preds.append(logits.argmax(-1).cpu().numpy())
    return np.asarray(classes)[np.concatenate(preds)]
