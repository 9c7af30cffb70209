"""The ``multiomic`` task (§2.5, §4.5 "Integrative representation learning for scMultiomic data").

Model (Methods): the pretrained vocabulary is extended with the new features under modality-
qualified keys (``scgpt_model.multiomic``); RNA gene embeddings are inherited bit for bit, the new
ones start fresh; by default (``trunk="scratch"``, the paper's) the rest is a fresh 4-layer trunk of
the pretrained width, ``"inherit"`` keeps every pretrained weight. Every token carries a modality
token (concatenated with the batch embedding before the heads, eq. 8); each cell lists every
feature it measured, zeros included, and nothing it did not (mosaic data). Objectives: GEP + GEPC
on 40% masked values, plus DAR (weight 1.0) when there are several batches. Adam, lr 1e-3 decayed
by 0.95 per epoch, 9:1 train/validation split, the best-validation epoch is kept (paper: 60 epochs).

Scores: scib (S.2) on the joint ``<cls>`` embedding; baselines on the same cells: PCA of RNA,
PCA of scaled RNA + CLR proteins, Harmony on that PCA, muon's weighted nearest neighbours (WNN),
and the same scGPT architecture from random init with the same budget.
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

from eval import baselines, metrics, plots
from eval.errors import EvalError
from eval.finetune import RANDOM_INIT_SEED_OFFSET, train_step
from eval.multiomic_data import (SHIPPED_NAME, MultiomicData, clr, load_input, prepare_multiomic,
                                 resolve_keys)
from eval.report import TaskResult
from scgpt_model.batching import collate_all_genes
from scgpt_model.model import ScGPT
from scgpt_model.multiomic import RNA, ModalityTable, Trunk, extend_for_modalities, qualify
from scgpt_model.vocab import GeneVocab

log = logging.getLogger(__name__)

DEFAULT_HVG = 1200  # Methods: the same 1,200 HVGs for every method
MODEL, RANDOM = "scGPT", "scGPT random init"


@dataclass(kw_only=True, slots=True)
class MultiomicConfig:
    epochs: int = 60  # Methods: "fixed 60 epochs", best validation epoch reported
    min_steps: int = 0  # a floor on optimizer steps (epochs raised to reach it), as eval.finetune: 340 cells
    #                     at batch 32 are 11 steps an epoch, far fewer than the paper's tens of thousands of cells
    lr: float = 1e-3  # Methods
    lr_decay: float = 0.95  # Methods: "decay of 0.95 after each epoch"
    batch_size: int = 32
    val_fraction: float = 0.1  # Methods: 9:1 train/evaluation split
    mask_ratio: float = 0.4  # GEP/GEPC mask ratio (§4.8)
    grad_clip: float = 1.0
    trunk: Trunk = "scratch"  # the paper's: only gene embeddings inherited
    seed: int = 0
    device: str = "cpu"


@dataclass
class Tokens:
    """Per-cell token lists: the measured features of the task, zeros included."""

    genes: list[np.ndarray]
    values: list[np.ndarray]
    modality: list[np.ndarray]
    batches: np.ndarray | None  # (n_cells,) int codes
    batch_names: list[str] = field(default_factory=list)


@dataclass
class MultiomicModel:
    model: ScGPT
    vocab: GeneVocab
    table: ModalityTable
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
def feature_keys(data: MultiomicData) -> dict[str, list[str]]:
    """Modality -> qualified vocabulary keys of the task's non-RNA features."""
    return {k: [qualify(k, f) for f in m.features] for k, m in data.mods.items() if k != RNA}


def build_model(pretrained: ScGPT | None, vocab: GeneVocab, table: ModalityTable | None, data: MultiomicData,
                cfg: MultiomicConfig) -> MultiomicModel:
    """The extended model for ``data``; ``pretrained=None``: the same architecture, random weights."""
    feats = {k: m.features for k, m in data.mods.items() if k != RNA}
    nb = 0 if data.batches is None else len(set(data.batches))
    over = dict(n_batches=max(nb, 1), use_batch_labels=nb > 1, dsbn=False, n_cell_types=0, depth_input=False,
                objectives=dict(gep=True, gepc=True, ecs=False, dar=nb > 1, dar_weight=1.0, cls=False,
                                depth_adv=False))
    model, new_vocab, tab = extend_for_modalities(pretrained, vocab, feats, trunk=cfg.trunk, table=table,
                                                  seed=cfg.seed, **over)
    return MultiomicModel(model, new_vocab, tab)


def random_twin(m: MultiomicModel, seed: int) -> MultiomicModel:
    torch.manual_seed(seed + RANDOM_INIT_SEED_OFFSET)
    return MultiomicModel(ScGPT(m.model.cfg), m.vocab, m.table)


def tokens(data: MultiomicData, vocab: GeneVocab, table: ModalityTable) -> Tokens:
    ids, mods, cols = [], [], []
    for k, m in data.mods.items():
        if k == RNA:
            ids.append(np.asarray(data.rna_token_ids, dtype=np.int64))
        else:
            enc = vocab.encode([qualify(k, f) for f in m.features]).astype(np.int64)
            assert (enc >= 0).all(), "every task feature is in the extended vocabulary"
            ids.append(enc)
        mods.append(np.full(m.n_features, table.id(k), dtype=np.int64))
    all_ids, all_mod = np.concatenate(ids), np.concatenate(mods)
    import scipy.sparse as sp

    bins = sp.hstack([data.bins[k] for k in data.mods]).toarray().astype(np.float32)
    measured = np.hstack([m.measured for m in data.mods.values()])
    g, v, mm = [], [], []
    for i in range(data.n_cells):
        sel = np.flatnonzero(measured[i])  # missing features are absent tokens, never zeros
        g.append(all_ids[sel])
        v.append(bins[i, sel])
        mm.append(all_mod[sel])
    names = sorted(set(data.batches)) if data.batches is not None else []
    codes = None if not names else np.searchsorted(np.asarray(names), data.batches).astype(np.int64)
    return Tokens(g, v, mm, codes, names)


def _collate(t: Tokens, idx: np.ndarray, *, mask_ratio: float, seed, with_batches: bool):
    return collate_all_genes([t.genes[i] for i in idx], [t.values[i] for i in idx], seed=seed, mask_ratio=mask_ratio,
                             mode="mlm", backend="sdpa", modality=[t.modality[i] for i in idx],
                             batch_labels=t.batches[idx] if with_batches and t.batches is not None else None)


def _loss(model: ScGPT, batch) -> torch.Tensor:
    return model(batch).loss.total


@torch.no_grad()
def _val(model: ScGPT, t: Tokens, idx: np.ndarray, cfg: MultiomicConfig) -> float:
    model.eval()
    rng = np.random.default_rng(cfg.seed + 1)  # the same masks every epoch
    tot = 0.0
    for s in range(0, idx.size, cfg.batch_size):
        sel = idx[s:s + cfg.batch_size]
        b = _collate(t, sel, mask_ratio=cfg.mask_ratio, seed=rng, with_batches=True).to(cfg.device)
        tot += float(model(b).loss.terms["gep"]) * sel.size
    model.train()
    return tot / max(idx.size, 1)


def fine_tune(m: MultiomicModel, t: Tokens, cfg: MultiomicConfig, name: str = "") -> MultiomicModel:
    """GEP + GEPC (+ DAR) on every cell; returns the best-validation model (GEP on fixed masks)."""
    model = m.model.to(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    n = len(t.genes)
    perm = rng.permutation(n)
    n_val = max(1, int(round(cfg.val_fraction * n)))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    full, rest = divmod(tr_idx.size, cfg.batch_size)
    steps_per_epoch = max(full + (rest >= 2), 1)  # a last batch of one cell is skipped (DAR)
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    if epochs > cfg.epochs:
        log.info("multiomic fine-tune %s: %d epochs x %d steps < --min-steps %d: running %d epochs", name,
                 cfg.epochs, steps_per_epoch, cfg.min_steps, epochs)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.lr_decay)
    best, best_state, history = np.inf, None, []
    t_start = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        tot, seen = 0.0, 0
        order = tr_idx[rng.permutation(tr_idx.size)]
        for s in range(0, order.size, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if idx.size < 2:
                continue  # DAR's batch statistics need two cells
            loss = _loss(model, _collate(t, idx, mask_ratio=cfg.mask_ratio, seed=rng, with_batches=True).to(cfg.device))
            tot += train_step(model, opt, loss, cfg.grad_clip) * idx.size
            seen += idx.size
        sched.step()
        val = _val(model, t, val_idx, cfg)
        sec = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": tot / max(seen, 1), "val_gep": val, "seconds": sec})
        eta = (time.perf_counter() - t_start) / epoch * (epochs - epoch)
        log.info("multiomic fine-tune %s epoch %d/%d: train %.4f val GEP %.4f (%.1fs, ETA %.0fs)", name, epoch,
                 epochs, tot / max(seen, 1), val, sec, eta)
        if val < best:
            best, m.best_epoch = val, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    m.history = history
    return m


@torch.no_grad()
def embed(model: ScGPT, t: Tokens, batch_size: int = 64, device: str = "cpu", style: str = "cls") -> np.ndarray:
    """(n_cells, d_model) joint cell embeddings, every measured feature known: the final <cls> state
    (default; GEPC and DAR train it) or ``style="avg-pool"``, the mean final state of the cell's features."""
    model.eval()
    out = []
    for s in range(0, len(t.genes), batch_size):
        idx = np.arange(s, min(s + batch_size, len(t.genes)))
        out.append(model.embed_cells(_collate(t, idx, mask_ratio=0.0, seed=0, with_batches=False).to(device),
                                     style=style).float().cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------
def _lognorm_rna(data: MultiomicData) -> np.ndarray:
    import scipy.sparse as sp

    X = data.mods[RNA].counts.astype(np.float64)
    tot = np.asarray(X.sum(axis=1)).ravel()
    tot[tot == 0] = 1.0
    return np.log1p((sp.diags(1e4 / tot) @ X).toarray()).astype(np.float32)


def _other_normalised(data: MultiomicData) -> dict[str, np.ndarray]:
    """CLR proteins / log-TF peaks per batch over the features measured; unmeasured -> the feature's
    mean over the cells that measured it (the baselines need a dense matrix)."""
    groups = data.batches if data.batches is not None else np.zeros(data.n_cells, dtype=object)
    out = {}
    for k, m in data.mods.items():
        if k == RNA:
            continue
        if k == "prot":
            v = clr(m.counts, m.measured, groups)
        else:
            v = np.where(m.measured, np.log1p(m.counts.toarray()), np.nan).astype(np.float32)
        mean = np.nanmean(np.where(np.isnan(v), np.nan, v), axis=0)
        v = np.where(np.isnan(v), np.nan_to_num(mean)[None, :], v)
        out[k] = v.astype(np.float32)
    return out


def wnn_neighbours(n_cells: int) -> dict[str, int]:
    """muon's WNN neighbour counts, capped below the number of cells.

    muon asks pynndescent for ``n_multineighbors + 1`` (default 201) candidates per cell; with
    fewer cells than that, pynndescent pads each row with index -1, muon builds a CSR graph from
    those indices unchecked, and scipy's sparse add then writes out of bounds ("double free or
    corruption", a native abort: any task on <= 200 cells). The counts (muon's defaults 15 / 20 /
    200) are capped at ``n_cells - 1``, so every request fits; above 201 cells nothing changes."""
    cap = max(n_cells - 1, 1)
    return {"n_neighbors": min(15, cap), "n_bandwidth_neighbors": min(20, cap), "n_multineighbors": min(200, cap)}


def _wnn(rna_pcs: np.ndarray, other: dict[str, np.ndarray], data: MultiomicData, seed: int):
    """muon's WNN graph (per-modality PCA -> kNN -> ``mu.pp.neighbors``) and ``mu.tl.umap`` on it."""
    import anndata as ad
    import mudata as md
    import muon as mu
    import scanpy as sc

    k = wnn_neighbours(data.n_cells)
    mods = {RNA: ad.AnnData(X=np.zeros((data.n_cells, 1), np.float32), obsm={"X_pca": rna_pcs})}
    for name, v in other.items():
        mods[name] = ad.AnnData(X=np.zeros((data.n_cells, 1), np.float32),
                                obsm={"X_pca": baselines.pca_embedding(v, n_comps=min(30, v.shape[1] - 1), seed=seed)})
    for a in mods.values():
        a.obs_names = data.obs.index.astype(str)
        sc.pp.neighbors(a, use_rep="X_pca", n_neighbors=k["n_neighbors"], random_state=seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mudata's legacy obs/var merging warns on every update
        mdata = md.MuData(mods)
        mu.pp.neighbors(mdata, key_added="wnn", random_state=seed, n_neighbors=k["n_neighbors"],
                        n_bandwidth_neighbors=k["n_bandwidth_neighbors"], n_multineighbors=k["n_multineighbors"])
        mu.tl.umap(mdata, neighbors_key="wnn", random_state=seed)
    return mdata.obsp["wnn_connectivities"], mdata.obsp["wnn_distances"], np.asarray(mdata.obsm["X_umap"])


def graph_scores(conn, dist, coords: np.ndarray, labels, batches, *, resolutions) -> dict[str, float]:
    """scib on a graph output (WNN): clustering and connectivity on the graph itself, the two ASWs
    on the graph's UMAP coordinates (a graph has no embedding of its own; see BENCHMARKS.md)."""
    import anndata as ad

    a = ad.AnnData(X=np.zeros((coords.shape[0], 1), dtype=np.float32))
    a.obsm["X_emb"] = coords.astype(np.float32)
    a.obs["label"] = pd.Categorical(np.asarray(labels).astype(str))
    if batches is not None:
        a.obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    a.obsp["connectivities"], a.obsp["distances"] = conn, dist
    a.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                          "params": {"method": "umap"}}
    out = metrics.bio_scores(a, resolutions)
    if batches is not None and len(set(batches)) >= 2:
        out.update(metrics.batch_scores(a))
        out["Overall"] = 0.6 * out["AvgBIO"] + 0.4 * out["AvgBATCH"]
    return out


def baseline_rows(data: MultiomicData, seed: int, resolutions) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    rows, embs = {}, {}
    lab, bat = data.labels, data.batches
    rna = _lognorm_rna(data)
    other = _other_normalised(data)
    pcs_rna = baselines.pca_embedding(rna, seed=seed)
    joint = np.hstack([rna, *other.values()])  # scaled inside pca_embedding (z-score per feature)
    pcs_joint = baselines.pca_embedding(joint, seed=seed)
    embs["PCA (RNA)"], embs["PCA (RNA + protein)"] = pcs_rna, pcs_joint
    if "prot" not in other:
        embs["PCA (RNA + ATAC)"] = embs.pop("PCA (RNA + protein)")
    if bat is not None and len(set(bat)) >= 2:
        embs[f"Harmony ({'RNA + protein' if 'prot' in other else 'RNA + ATAC'})"] = \
            baselines.harmony_embedding(pcs_joint, bat, seed=seed)
    for k, e in embs.items():
        rows[k] = metrics.integration_scores(e, lab, bat, seed=seed, resolutions=resolutions)
    conn, dist, coords = _wnn(pcs_rna, other, data, seed)
    rows["WNN (muon)"] = graph_scores(conn, dist, coords, lab, bat, resolutions=resolutions)
    embs["WNN (muon)"] = coords
    return rows, embs


# ------------------------------------------------------------------------------------------------
def plan_multiomic(model, dataset: str, opts) -> MultiomicData:
    """Load and check the input; raises EvalError before anything is logged."""
    inp = load_input(dataset)
    label, batch = resolve_keys(inp, opts.label_key, opts.batch_key)
    if getattr(opts, "trunk", "scratch") not in ("scratch", "inherit"):
        raise EvalError(f"--trunk must be 'scratch' or 'inherit', got {opts.trunk!r}")
    data = prepare_multiomic(inp, model.vocab, label_key=label, batch_key=batch,
                             n_hvg=opts.n_hvg or DEFAULT_HVG, max_cells=opts.max_cells, seed=opts.seed,
                             n_bins=model.config.n_bins)
    if batch is not None and len(set(data.batches)) < 2:
        log.info("%s: one batch only; DAR and the batch scores are skipped", data.name)
    return data


def model_table(model) -> ModalityTable | None:
    """The modality table of a loaded model that is already multi-omic (else None)."""
    path = (model.info or {}).get("path")
    return ModalityTable.load(path) if path else None


def run_multiomic(p, model, opts, outdir: Path) -> TaskResult:
    data: MultiomicData = p.data
    cfg = MultiomicConfig(epochs=opts.epochs, batch_size=opts.batch_size, seed=opts.seed, device=opts.device,
                          trunk=getattr(opts, "trunk", "scratch"), min_steps=getattr(opts, "min_steps", 0) or 0)
    from eval.tasks import cell_emb

    style = cell_emb(opts, "multiomic")  # the one table of per-task defaults
    table = model_table(model)
    m = build_model(model.model, model.vocab, table, data, cfg)
    variants = [(MODEL, m)] + ([(RANDOM, random_twin(m, opts.seed))] if opts.random_init else [])
    t = tokens(data, m.vocab, m.table)
    rows, embs, best = {}, {}, {}
    for label, mm in variants:
        mm = fine_tune(mm, t, cfg, name=f"{data.name}/{label}")
        embs[label] = embed(mm.model, t, device=opts.device, style=style)
        rows[label] = metrics.integration_scores(embs[label], data.labels, data.batches, seed=opts.seed,
                                                 resolutions=opts.resolutions)
        best[label] = mm.best_epoch
        if label == MODEL:
            m = mm
    b_rows, b_embs = baseline_rows(data, opts.seed, opts.resolutions)
    rows.update(b_rows)
    table_df = pd.DataFrame(rows).T
    arts = []
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
        if opts.plots:
            key = "Overall" if "Overall" in table_df.columns else "AvgBIO"
            best_base = table_df.loc[list(b_rows), key].astype(float).idxmax()
            arts.append(plots.plot_umap(embs[MODEL], data.labels, data.batches,
                                        outdir / f"umap_{data.name}_multiomic.png", f"{MODEL} (RNA + {', '.join(k for k in data.mods if k != RNA)})",
                                        seed=opts.seed))
            arts.append(plots.plot_umap(b_embs[best_base], data.labels, data.batches,
                                        outdir / f"umap_{data.name}_best_baseline.png", best_base, seed=opts.seed))
        hist = pd.DataFrame(m.history)
        hist.to_csv(outdir / f"history_{data.name}_multiomic.csv", index=False)
        arts.append(outdir / f"history_{data.name}_multiomic.csv")
    cfg_m = m.model.cfg
    params = {"task": "multiomic", "dataset": data.name, "n_cells": data.n_cells, "seed": opts.seed,
              "max_cells": opts.max_cells, "gene_match": data.match.report(), "genes_matched": data.match.n_matched,
              "modalities": ",".join(m.table.names), "trunk": cfg.trunk, "trunk_layers": cfg_m.n_layers,
              "cell_emb": style, "epochs": cfg.epochs, "min_steps": cfg.min_steps, "epochs_run": len(m.history), "lr": cfg.lr, "lr_decay": cfg.lr_decay, "label_key": data.label_key,
              "batch_key": data.batch_key, "n_batches": 0 if data.batches is None else len(set(data.batches)),
              "dar": bool(cfg_m.objectives.dar), "vocab_size_extended": len(m.vocab),
              "vocab_size_pretrained": len(model.vocab), "best_epoch": best.get(MODEL),
              "best_epoch_random_init": best.get(RANDOM), "model_d_model": cfg_m.d_model,
              "wnn_note": "WNN: clustering/GraphConn on muon's WNN graph, ASWs on its UMAP", **data.params}
    if data.name == SHIPPED_NAME:
        params["label_source"] = "protein-marker gating (see data/README.md); labels derive from the protein modality"
    return TaskResult("multiomic", data.name, table_df, params, arts)


def register_multiomic(model_dir: str | Path, *, model_name: str, tracking_uri: str,
                       run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Log a :func:`scgpt_model.multiomic.save_multiomic` folder as an MLflow pyfunc model (the
    same layout the trainer registers: artifact ``model_dir``) and register it; returns
    ``models:/<name>/<version>``. ``load_registered_model`` / ``ScGPTModel.load`` read it back, with
    its extended vocabulary and ``modalities.json``."""
    import mlflow

    from training.pyfunc_model import ScGPTPyfunc
    from training.registry import ARTIFACT_KEY, pip_requirements

    d = Path(model_dir)
    if ModalityTable.load(d) is None:
        raise EvalError(f"{d} has no modality table: save it with scgpt_model.multiomic.save_multiomic")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    pkg_root = Path(__file__).resolve().parents[1]
    from training.tracking import ensure_experiment

    # the project's one rule: artifacts beside a sqlite database (<db folder>/mlartifacts), never ./mlruns
    mlflow.set_experiment(experiment_id=ensure_experiment(tracking_uri, "scgpt-multiomic"))
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scgpt-register-") as tmp, \
            mlflow.start_run(run_id=run_id, run_name=None if run_id else f"multiomic-model:{model_name}") as run:
        src = Path(tmp) / ARTIFACT_KEY  # pyfunc stores a directory artifact under its own name
        shutil.copytree(d, src)
        mlflow.log_artifacts(str(src), artifact_path="pretrained")
        info = mlflow.pyfunc.log_model(name="model", python_model=ScGPTPyfunc(), artifacts={ARTIFACT_KEY: str(src)},
                                       pip_requirements=pip_requirements(),
                                       code_paths=[str(pkg_root / "scgpt_model"), str(pkg_root / "training")])
        rid = run.info.run_id
    table = ModalityTable.load(d)
    mv = mlflow.register_model(info.model_uri, model_name,
                               tags={"modalities": ",".join(table.names), "source_run_id": rid, **(tags or {})})
    return f"models:/{model_name}/{mv.version}"
