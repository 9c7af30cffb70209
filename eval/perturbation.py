"""The ``perturbation`` task (§2.4, §4.5 "Perturbation prediction", Methods "scRNA-seq perturbation").

Model: the pretrained weights plus a per-gene condition embedding (flag 1 = this gene is perturbed),
fine-tuned with perturb-GEP: every training cell (the cells of the training perturbations, and the
control cells with no flag) is paired with a random control cell (seeded, drawn again every epoch);
input = the control cell's log-normalised values on every gene of the gene set, zeros included,
condition = the target cell's flags, target = the target cell's values, MSE on every measured gene.
A target gene the assay did not measure is an extra token with its flag, no value and no loss. A
cell longer than ``max_seq_len`` is sub-sampled among its unflagged genes (the flags always stay).
AdamW with linear warm-up and the 0.9 decay per epoch of the other fine-tunes (``eval.finetune``);
the best epoch is the one with the highest corr(Δ) on the DE genes of the validation perturbations
(the Pearson on all genes saturates near 0.99 from the first epoch and picks nothing).

Prediction of a perturbation: the mean over a fixed, seeded pool of control cells of the model's
output with that perturbation's flags, on every gene (no sub-sampling). Scores and baselines:
``eval.perturbation_scores``; several split seeds, the table shows the mean over splits and the
spread (standard deviation over splits) beside it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eval import perturbation_scores as ps
from eval.errors import EvalError
from eval.finetune import build_task_model, default_lr, train_step
from eval.perturbation_data import PerturbData, prepare_perturbation, resolve
from eval.report import TaskResult, markdown_table
from scgpt_model.batching import ModelBatch, collate_perturbation
from scgpt_model.config import ModelConfig
from scgpt_model.model import ScGPT

log = logging.getLogger(__name__)

MODEL, RANDOM = "scGPT", "scGPT random init"
LINEAR, LINEAR_EMB, TRAIN_MEAN, NO_CHANGE = "linear (PCA)", "linear (scGPT emb.)", "train mean", "no change"
N_SPLITS = 5  # the issue: five split seeds by default
N_PRED_CONTROLS = 256  # control cells whose predictions are averaged into a perturbation's profile


@dataclass(kw_only=True, slots=True)
class PerturbConfig:
    epochs: int = 15  # the official scGPT perturbation tutorial's 15; the paper saw convergence in ~3
    lr: float | None = None  # None: eval.finetune.default_lr (1e-4 at width 512, scaled by width)
    lr_decay: float = 0.9  # §4.8: decay to 90% after each epoch
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32  # §4.8
    grad_clip: float = 1.0
    min_steps: int = 0  # a floor on optimizer steps (epochs are raised to reach it), as eval.finetune
    n_pred_controls: int = N_PRED_CONTROLS
    seed: int = 0
    device: str = "cpu"


@dataclass
class PerturbModel:
    model: ScGPT
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def task_config(base: ModelConfig) -> ModelConfig:
    """The pretrained architecture plus the condition embedding; perturb-GEP (MSE) is the only loss. No depth
    input: the decoder predicts the perturbed cell, whose depth is not the control's."""
    return base.replace(n_conditions=2, n_batches=0, use_batch_labels=False, dsbn=False, n_cell_types=0,
                        n_modalities=0, explicit_zero_prob=False, depth_input=False,
                        objectives=dict(gep=True, gep_loss="mse", gepc=False, ecs=False, dar=False, cls=False,
                                        depth_adv=False))


# ------------------------------------------------------------------------------------------------
class Tokens:
    """Per-condition token layout: the G measured genes first, then the unmeasured targets."""

    def __init__(self, data: PerturbData) -> None:
        self.data = data
        self.G = data.n_genes
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def layout(self, cond: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gene ids, flags, measured) of a cell of ``cond``; lengths G + its unmeasured targets."""
        if cond not in self._cache:
            d = self.data
            extra = d.unmeasured(cond)
            genes = np.concatenate([d.token_ids, [d.target_token[g] for g in extra]]).astype(np.int64)
            flags = np.zeros(genes.size, dtype=np.int64)
            for g in d.targets.get(cond, ()):
                c = d.target_column[g]
                if c >= 0:
                    flags[c] = 1
            flags[self.G:] = 1
            measured = np.zeros(genes.size, dtype=bool)
            measured[:self.G] = True
            self._cache[cond] = (genes, flags, measured)
        return self._cache[cond]

    def batch(self, conds, ctrl_rows: np.ndarray, target_rows: np.ndarray | None, *, max_seq_len, rng,
              backend: str) -> ModelBatch:
        d = self.data
        genes, x, y, f, m = [], [], [], [], []
        for i, cond in enumerate(conds):
            g, fl, ms = self.layout(cond)
            pad = np.zeros(g.size - self.G, dtype=np.float32)
            xi = np.concatenate([d.expr[ctrl_rows[i]], pad])
            yi = xi if target_rows is None else np.concatenate([d.expr[target_rows[i]], pad])
            genes.append(g), x.append(xi), y.append(yi), f.append(fl), m.append(ms)
        return collate_perturbation(genes, x, y, f, measured=m, backend=backend, max_seq_len=max_seq_len, seed=rng)


def _measured_predictions(batch: ModelBatch, pred: torch.Tensor, G: int) -> torch.Tensor:
    """(B, G) predictions of the measured genes: tokens 1..G of each cell (after <cls>, order kept)."""
    if batch.layout == "padded":
        return pred.view(batch.n_cells, -1)[:, 1:1 + G]
    starts = batch.cu_q[:-1].long().to(pred.device) + 1
    idx = starts[:, None] + torch.arange(G, device=pred.device)[None, :]
    return pred[idx]


@torch.no_grad()
def predict_means(model: ScGPT, tok: Tokens, conds: list[str], ctrl_pool: np.ndarray, cfg: PerturbConfig) -> np.ndarray:
    """(n_conds, G) mean predicted profile of each condition over the control pool."""
    model.eval()
    out = np.zeros((len(conds), tok.G), dtype=np.float64)
    backend = model.collate_backend()
    for k, cond in enumerate(conds):
        tot = torch.zeros(tok.G, dtype=torch.float64)
        for s in range(0, ctrl_pool.size, cfg.batch_size * 2):
            rows = ctrl_pool[s:s + cfg.batch_size * 2]
            b = tok.batch([cond] * rows.size, rows, None, max_seq_len=None, rng=0, backend=backend).to(cfg.device)
            p = _measured_predictions(b, model(b, compute_loss=False).expr_pred.float(), tok.G)
            tot += p.sum(0).double().cpu()
        out[k] = (tot / ctrl_pool.size).numpy()
    return out.astype(np.float32)


def control_pool(data: PerturbData, cfg: PerturbConfig) -> np.ndarray:
    """The fixed, seeded control cells whose predictions make a perturbation's predicted profile."""
    ctrl = data.cells_of(PerturbData.CONTROL)
    rng = np.random.default_rng(cfg.seed + 17)
    return np.sort(rng.choice(ctrl, size=min(cfg.n_pred_controls, ctrl.size), replace=False))


def _val_score(model, tok, data: PerturbData, val: list[str], pool, cfg, ctrl_mean, obs) -> float:
    pred = predict_means(model, tok, val, pool, cfg)
    return ps.mean_defined([ps.scores(pred[i], obs[p], ctrl_mean, data.de_genes[p])["pearson_delta_de"]
                            for i, p in enumerate(val)])


def fine_tune(pretrained: ScGPT | None, base_cfg: ModelConfig, data: PerturbData, split: ps.Split,
              cfg: PerturbConfig, name: str = "") -> PerturbModel:
    """Perturb-GEP on the training perturbations (+ control cells); best epoch by validation corr(Δ) on DE genes."""
    mcfg = task_config(base_cfg)
    model = build_task_model(pretrained, mcfg, cfg.seed).to(cfg.device)
    head = model.expr_head.fc[-1]
    with torch.no_grad():  # targets are log1p values, not the bins the head was pretrained on: start it at their
        head.bias.fill_(float(data.expr.mean()))  # mean (pretrained and random init alike)
    tok = Tokens(data)
    rng = np.random.default_rng(cfg.seed)
    ctrl = data.cells_of(PerturbData.CONTROL)
    pool = control_pool(data, cfg)
    train_rows = np.flatnonzero(np.isin(data.conditions, [PerturbData.CONTROL, *split.train]))
    assert not np.isin(data.conditions[train_rows], split.val + split.test).any()
    ctrl_mean = data.control_mean()
    obs = {p: data.expr[data.cells_of(p)].mean(axis=0) for p in split.val}
    lr = cfg.lr if cfg.lr is not None else default_lr(mcfg.d_model)
    steps_per_epoch = -(-train_rows.size // cfg.batch_size)
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    total = steps_per_epoch * epochs
    warmup = max(1, int(round(cfg.warmup_fraction * total))) if cfg.warmup_fraction > 0 else 0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup if warmup else 1.0) * cfg.lr_decay ** (s // steps_per_epoch))
    backend = model.collate_backend()
    log.info("perturbation fine-tune %s: %d training cells (%d perturbations + control) x %d genes, %d validation "
             "perturbations, %d epochs x %d steps, lr %.2g", name, train_rows.size, len(split.train), data.n_genes,
             len(split.val), epochs, steps_per_epoch, lr)
    best, best_state, best_epoch, history = -np.inf, None, 0, []
    t_start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = train_rows[rng.permutation(train_rows.size)]
        partners = rng.choice(ctrl, size=order.size)  # a fresh random control cell for every target cell
        tot, n = 0.0, 0
        for s in range(0, order.size, cfg.batch_size):
            rows, inp = order[s:s + cfg.batch_size], partners[s:s + cfg.batch_size]
            b = tok.batch(data.conditions[rows], inp, rows, max_seq_len=mcfg.max_seq_len, rng=rng,
                          backend=backend).to(cfg.device)
            tot += train_step(model, opt, model(b).loss.total, cfg.grad_clip, sched) * rows.size
            n += rows.size
        val = _val_score(model, tok, data, split.val, pool, cfg, ctrl_mean, obs)
        sec = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_mse": tot / max(n, 1), "val_pearson_delta_de": val, "seconds": sec})
        eta = (time.perf_counter() - t_start) / epoch * (epochs - epoch)
        log.info("perturbation fine-tune %s epoch %d/%d: train MSE %.4f, validation corr(delta) DE %.3f (%.1fs, ETA %.0fs)",
                 name, epoch, epochs, tot / max(n, 1), val, sec, eta)
        if best_state is None or (np.isfinite(val) and val > best):
            best, best_epoch = (val if np.isfinite(val) else -np.inf), epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return PerturbModel(model, best_epoch, history)


# ------------------------------------------------------------------------------------------------
@dataclass
class PerturbationResult(TaskResult):
    """A TaskResult whose table is the mean over splits; ``spread`` the standard deviation over splits."""

    spread: pd.DataFrame | None = None

    def markdown(self, digits: int = 3) -> str:
        head = f"**{self.task}** on `{self.dataset}`"
        seen = self.params.get("pretrained_on_eval_data")  # as TaskResult.markdown
        if seen:
            head += (f"  \n*not held out: the model was pretrained on {seen}; these scores overstate what it "
                     "does on new data*")
        n = self.params.get("n_splits", 1)
        cells = self.table.copy().astype(object)
        for m in self.table.index:
            for c in self.table.columns:
                v = self.table.at[m, c]
                sd = None if self.spread is None else self.spread.at[m, c]
                if not np.isfinite(v):
                    cells.at[m, c] = "undefined"
                else:
                    cells.at[m, c] = f"{v:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 and np.isfinite(sd) else "")
        note = (f"\n\nmean ± standard deviation over {n} unseen-perturbation splits (per split: the mean over its "
                "test perturbations); corr(Δ) of the no-change baseline is undefined (its predicted change is 0)")
        return head + "\n\n" + markdown_table(cells, digits) + note


def _cols(data: PerturbData, p: str) -> list[int]:
    return [data.target_column[g] for g in data.targets[p] if data.target_column[g] >= 0]


def _target_embeddings(model: ScGPT, data: PerturbData) -> dict[str, np.ndarray]:
    """Pretrained token embedding of every target gene (all kept targets are in the vocabulary)."""
    genes = sorted(data.target_token)
    ids = torch.as_tensor([data.target_token[g] for g in genes])
    return dict(zip(genes, model.gene_embeddings(ids).float().cpu().numpy()))


def run_split(data: PerturbData, split: ps.Split, pretrained: ScGPT | None, base_cfg: ModelConfig,
              cfg: PerturbConfig, random_init: bool) -> tuple[dict[str, np.ndarray], dict]:
    """Predicted mean profiles (n_test, G) of every method on the split's test perturbations."""
    ctrl = data.control_mean()
    train_means = np.stack([data.expr[data.cells_of(p)].mean(axis=0) for p in split.train])
    n = len(split.test)
    preds = {}
    info = {}
    variants = [(MODEL, pretrained)] + ([(RANDOM, None)] if random_init else [])
    for label, init in variants:
        pm = fine_tune(init, base_cfg, data, split, cfg, name=f"{data.name}/split{split.seed}/{label}")
        preds[label] = predict_means(pm.model, Tokens(data), split.test, control_pool(data, cfg), cfg)
        info[label] = pm.best_epoch
    tr_cols, te_cols = [_cols(data, p) for p in split.train], [_cols(data, p) for p in split.test]
    preds[LINEAR] = ps.linear_baseline(ctrl, train_means, tr_cols, te_cols)
    # test perturbations none of whose targets is measured: linear (PCA) has no embedding for them and
    # predicts its fitted offset (close to the training mean)
    info["linear_fallback"] = [p for p, c in zip(split.test, te_cols) if not c]
    if pretrained is not None:
        emb = _target_embeddings(pretrained, data)
        gene_emb = pretrained.gene_embeddings(torch.as_tensor(data.token_ids)).float().cpu().numpy()
        preds[LINEAR_EMB] = ps.linear_baseline(ctrl, train_means, tr_cols, te_cols, gene_emb=gene_emb,
                                               train_ext=[[emb[g] for g in data.unmeasured(p)] for p in split.train],
                                               test_ext=[[emb[g] for g in data.unmeasured(p)] for p in split.test])
    preds[TRAIN_MEAN] = ps.train_mean(ctrl, train_means, n)
    preds[NO_CHANGE] = ps.no_change(ctrl, n)
    return preds, info


def perturbation_min_steps(opts) -> int:
    """The step floor of the perturbation fine-tunes: ``opts.perturbation_min_steps``, else ``opts.min_steps``."""
    own = getattr(opts, "perturbation_min_steps", None)
    return int(own if own is not None else getattr(opts, "min_steps", 0) or 0)


def run_perturbation(p, model, opts, outdir: Path) -> TaskResult:
    data: PerturbData = p.data
    n_splits = getattr(opts, "n_splits", N_SPLITS)
    cfg = PerturbConfig(epochs=opts.epochs, lr=opts.lr, warmup_fraction=opts.warmup_fraction,
                        weight_decay=opts.weight_decay, batch_size=opts.batch_size, seed=opts.seed, device=opts.device,
                        min_steps=perturbation_min_steps(opts))
    ctrl = data.control_mean()
    rows, split_means, best_epochs = [], [], {}
    for k in range(n_splits):
        split = ps.make_split(data.targets, opts.seed + k)
        log.info("perturbation split %d/%d (seed %d): %d train, %d validation, %d test perturbations (test: %s)",
                 k + 1, n_splits, split.seed, len(split.train), len(split.val), len(split.test), ", ".join(split.test))
        preds, info = run_split(data, split, model.model, model.config, cfg, opts.random_init)
        fallback = info.pop("linear_fallback")
        best_epochs[f"linear_fallback_split{k}"] = len(fallback)
        for label, be in info.items():
            best_epochs[f"best_epoch_{'model' if label == MODEL else 'random_init'}_split{k}"] = be
        per = []
        for i, pert in enumerate(split.test):
            obs = data.expr[data.cells_of(pert)].mean(axis=0)
            for method, pred in preds.items():
                s = ps.scores(pred[i], obs, ctrl, data.de_genes[pert])
                per.append({"split": k, "split_seed": split.seed, "perturbation": pert,
                            "subgroup": split.subgroup[pert], "n_cells": int(data.cells_of(pert).size),
                            "targets_measured": len(_cols(data, pert)), "method": method, **s})
        df = pd.DataFrame(per)
        if k == 0:
            first = (split, preds)
        rows.append(df)
        split_means.append(df.groupby("method", sort=False)[list(ps.METRICS)]
                           .agg(lambda v: ps.mean_defined(v.tolist())))
    per_pert = pd.concat(rows, ignore_index=True)
    stacked = pd.concat(split_means, keys=range(n_splits))
    order = list(split_means[0].index)
    table = stacked.groupby(level=1).mean().reindex(order)  # undefined in every split stays NaN
    spread = stacked.groupby(level=1).std(ddof=0).reindex(order)
    arts = []
    path = outdir / f"perturbation_scores_per_perturbation_{p.dataset}.csv"
    per_pert.to_csv(path, index=False)
    arts.append(path)
    spath = outdir / f"scores_perturbation_{p.dataset}_spread.csv"
    spread.to_csv(spath)
    arts.append(spath)
    if (per_pert["subgroup"] != "single").any():
        gpath = outdir / f"perturbation_scores_by_subgroup_{p.dataset}.csv"
        per_pert.groupby(["subgroup", "method"])[list(ps.METRICS)].agg(
            lambda v: ps.mean_defined(v.tolist())).to_csv(gpath)
        arts.append(gpath)
    if opts.plots:
        from eval.perturbation_plots import plot_delta_de, plot_per_perturbation

        arts.append(plot_delta_de(data, first[0].test, first[1], ctrl, outdir / f"perturbation_delta_de_{p.dataset}.png"))
        arts.append(plot_per_perturbation(per_pert, outdir / f"perturbation_corr_delta_de_{p.dataset}.png"))
    params = {"task": "perturbation", "dataset": p.dataset, **data.report, "n_splits": n_splits,
              "split_seeds": ",".join(str(opts.seed + k) for k in range(n_splits)), "epochs": opts.epochs,
              "n_pred_controls": cfg.n_pred_controls, "model_d_model": model.config.d_model,
              "model_n_layers": model.config.n_layers, "seed": opts.seed, "max_cells": opts.max_cells,
              "max_perturbations": getattr(opts, "max_perturbations", 0), **best_epochs}
    return PerturbationResult("perturbation", p.dataset, table, params, arts, spread=spread)


# ------------------------------------------------------------------------------------------------
def plan_perturbation(model, dataset: str, opts) -> PerturbData:
    """Load and check the screen; raises EvalError before anything is logged."""
    if model.config.value_encoding != "continuous":
        raise EvalError("the perturbation task feeds log-normalised values to the model's continuous value encoder; "
                        f"this model uses value_encoding={model.config.value_encoding!r}")
    n_splits = getattr(opts, "n_splits", N_SPLITS)
    if n_splits < 1:
        raise EvalError(f"--splits must be at least 1, got {n_splits}")
    name, adata = resolve(dataset)
    return prepare_perturbation(adata, model.vocab, name=name, key=getattr(opts, "perturbation_key", None),
                                control=getattr(opts, "control", None), n_hvg=opts.n_hvg, max_cells=opts.max_cells,
                                max_perturbations=getattr(opts, "max_perturbations", 0), seed=opts.seed)
