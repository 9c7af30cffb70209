"""The four evaluation tasks. Each is two steps:

``plan_*`` loads the dataset and checks every user input (keys, counts, genes, batches) and
raises ``EvalError`` before anything is logged; ``run_*`` fine-tunes or embeds, scores the model
and its baselines on the same split, and returns a ``TaskResult`` (score table + artifacts).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eval import baselines, genenet, metrics, plots
from eval.api import DEFAULT_HVG, ScGPTModel
from eval.data import PreparedData, batch_split, load_dataset, select_hvg, stratified_split
from eval.errors import EvalError
from eval.finetune import FineTuneConfig, embed_fixed_genes, fine_tune, predict_labels
from eval.report import TaskResult

log = logging.getLogger(__name__)

TASKS = ("annotation", "integration", "zero-shot", "gene-network", "multiomic", "perturbation")
# `evaluate suite`: every task on its default datasets (paper-like choices, all shipped)
SUITE: tuple[tuple[str, str], ...] = (
    ("annotation", "pbmc3k"), ("annotation", "symphony"), ("integration", "symphony"),
    ("zero-shot", "symphony"), ("zero-shot", "pbmc3k"), ("gene-network", "pbmc3k"), ("gene-network", "symphony"),
    ("multiomic", "pbmc_cite"), ("perturbation", "papalexi"))
MODEL, RANDOM = "scGPT", "scGPT random init"


@dataclass(kw_only=True)
class EvalOptions:
    epochs: int = 30  # §4.8 fine-tuning epochs
    lr: float | None = None  # None: eval.finetune.default_lr (the paper's 1e-4 at width 512, scaled by width)
    warmup_fraction: float = 0.1  # linear warm-up share of the optimizer steps
    weight_decay: float = 0.01  # AdamW
    batch_size: int = 32  # §4.8
    n_hvg: int | None = None  # None: the task's paper default (3,000 annotation, 1,200 integration)
    max_cells: int = 0  # 0: all cells; >0 subsamples (seeded) for quick runs
    seed: int = 0
    label_key: str | None = None  # None: the shipped dataset's default
    batch_key: str | None = None
    query_batches: tuple[str, ...] = ()  # annotation / zero-shot: batches held out as the query
    query_fraction: float = 0.2  # stratified query share when there are no query batches
    label_fraction: float = 1.0  # annotation: the share of reference cells whose labels are used (stratified)
    min_steps: int = 0  # fine-tuning: a floor on optimizer steps (epochs are raised to reach it)
    perturbation_min_steps: int | None = None  # the perturbation fine-tunes' own floor; None: min_steps
    include_zeros: bool = False  # annotation / integration input: every HVG with zeros (False: expressed HVGs only)
    class_weight: str = "none"  # annotation loss: "balanced" (inverse class frequency) or "none"
    dropout: float | None = None  # annotation / integration fine-tunes; None: the pretrained model's
    gene_dropout: float | None = None  # annotation / integration fine-tunes: FineTuneConfig.gene_dropout
    # (augmentation); None: the default for the task and its split (DEFAULT_GENE_DROPOUT)
    cell_emb: str | None = None  # "cls" / "avg-pool"; None: the task's default (DEFAULT_CELL_EMB)
    knn_k: int = 10
    network_threshold: float = 0.4  # §4.7: 0.4 (CD antigens); 0.5 for HLA
    query_gene: str = "CD8A"  # §4.7
    random_init: bool = True  # also score the same architecture from random weights
    plots: bool = True
    device: str = "cpu"
    resolutions: tuple[float, ...] = metrics.RESOLUTIONS
    trunk: str = "scratch"  # multiomic: "scratch" (paper: only gene embeddings inherited) or "inherit"
    perturbation_key: str | None = None  # perturbation: obs column of the conditions (None: "perturbation")
    control: str | None = None  # perturbation: control label (None: the first of ctrl, control, non-targeting, NT)
    n_splits: int = 5  # perturbation: unseen-perturbation split seeds (seed, seed + 1, ...)
    max_perturbations: int = 0  # perturbation: 0 = all; >0 keeps that many (seeded) for quick runs


# The cell embedding each task reads (`--cell-emb` overrides). The CPU-scale pretrained `<cls>` state is
# dominated by sequencing depth; the mean gene state carries more cell type (BENCHMARKS.md, issue 10).
DEFAULT_CELL_EMB = {"annotation": "avg-pool", "integration": "cls", "zero-shot": "avg-pool",  # integration: not measured
                    "multiomic": "cls"}  # multiomic: GEPC and DAR train <cls>, which scored higher there (BENCHMARKS.md)


def cell_emb(opts: EvalOptions, task: str) -> str:
    return opts.cell_emb or DEFAULT_CELL_EMB[task]


# Training-time gene dropout of each fine-tune (`--gene-dropout` overrides), keyed by task and by whether the
# query is other batches than the reference. It is an augmentation against a depth shift, so it pays only where
# there is one. Annotation on symphony (query: the 5' batch, another chemistry): dropping up to half of each
# training cell's genes raised macro-F1 from 0.54 to 0.69 (pretrained without the depth discriminator) and from
# 0.65 to 0.75 (with it). On pbmc3k (a stratified query from the same cells) it cost the pretrained model 0.08
# accuracy and 0.09 macro-F1 (BENCHMARKS.md, issue 10). Integration: not measured, so off.
DEFAULT_GENE_DROPOUT = {("annotation", True): 0.5, ("annotation", False): 0.0,
                        ("integration", True): 0.0, ("integration", False): 0.0}


def gene_dropout(opts: EvalOptions, task: str, cross_batch: bool) -> float:
    """The fine-tune's gene dropout: ``opts.gene_dropout``, else the default for ``task`` and the split
    (``cross_batch``: the query is other batches than the reference)."""
    return opts.gene_dropout if opts.gene_dropout is not None else DEFAULT_GENE_DROPOUT[task, cross_batch]


@dataclass
class TaskInputs:
    task: str
    dataset: str
    data: PreparedData
    query_batches: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)


def _keys(adata, meta, opts: EvalOptions, name: str, *, need_label: bool, need_batch: bool):
    label = opts.label_key or (meta.label_key if meta else None)
    batch = opts.batch_key or (meta.batch_key if meta else None)
    cols = ", ".join(map(str, adata.obs.columns)) or "(none)"
    if need_label and label is None:
        raise EvalError(f"dataset {name} needs a cell-type label column: pass --label-key (obs columns: {cols})")
    if need_batch and batch is None:
        raise EvalError(f"dataset {name} needs a batch column for this task: pass --batch-key (obs columns: {cols})")
    return label, batch


def plan(task: str, model: ScGPTModel, dataset: str, opts: EvalOptions) -> TaskInputs:
    """Load and check everything for one task; raises ``EvalError`` on bad input."""
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "multiomic":  # MuData / CITE-seq input: its own loader and checks (eval/multiomic_data.py)
        from eval.multiomic import plan_multiomic

        data = plan_multiomic(model, dataset, opts)
        return TaskInputs(task, data.name, data)
    if task == "perturbation":  # CRISPR screens: their own loader and checks (eval/perturbation_data.py)
        from eval.perturbation import plan_perturbation

        data = plan_perturbation(model, dataset, opts)
        return TaskInputs(task, data.name, data)
    name, adata, meta = load_dataset(dataset)
    need_batch = task == "integration"
    label, batch = _keys(adata, meta, opts, name, need_label=True, need_batch=need_batch)
    if task == "gene-network":
        n_hvg = opts.n_hvg if opts.n_hvg is not None else DEFAULT_HVG["integration"]
        extra = tuple(s for s in adata.var_names.astype(str) if s.startswith("HLA-")) + (opts.query_gene,)
        data = model.prepare(adata, name=name, label_key=label, batch_key=None, n_hvg=n_hvg,
                             max_cells=opts.max_cells, seed=opts.seed, require_labels=False)
        if extra:
            full = model.prepare(adata, name=name, label_key=label, batch_key=None, n_hvg=0,
                                 max_cells=opts.max_cells, seed=opts.seed, require_labels=False)
            keep = set(data.token_ids.tolist()) | {int(t) for t, s in zip(full.token_ids, full.symbols)
                                                   if s in set(extra)}
            data = full.take_genes(np.flatnonzero(np.isin(full.token_ids, list(keep))))
        return TaskInputs(task, name, data, params={"n_hvg_target": n_hvg})
    if task == "integration":
        found = sorted(adata.obs[batch].dropna().astype(str).unique()) if batch in adata.obs else []
        if batch in adata.obs and len(found) < 2:
            raise EvalError(f"integration needs at least 2 batches; {name}.obs[{batch!r}] has only {found}. "
                            "Pick a dataset with several batches or another --batch-key")
    data = model.prepare(adata, name=name, label_key=label, batch_key=batch,
                         n_hvg=(opts.n_hvg or DEFAULT_HVG["integration"]) if task == "integration" else 0,
                         max_cells=opts.max_cells, seed=opts.seed)
    if task == "integration" and len(set(data.batches)) < 2:
        raise EvalError(f"integration needs at least 2 batches; {name}.obs[{batch!r}] has only "
                        f"{sorted(set(data.batches))}. Pick a dataset with several batches or another --batch-key")
    if opts.query_batches and batch is None:
        raise EvalError(f"--query-batch needs a batch column: pass --batch-key (obs columns: "
                        f"{', '.join(map(str, adata.obs.columns))})")
    qb = tuple(opts.query_batches) or (meta.query_batches if meta and batch == meta.batch_key else ())
    if qb and batch is not None:
        missing = sorted(set(qb) - set(data.batches))
        if missing:
            raise EvalError(f"query batches {missing} are not in {name}.obs[{batch!r}]; batches: "
                            f"{sorted(set(data.batches))}")
    return TaskInputs(task, name, data, query_batches=qb if batch is not None else (),
                params={"n_hvg_target": opts.n_hvg or DEFAULT_HVG.get(task, 0)})


def reference_query_split(p: TaskInputs, opts: EvalOptions) -> tuple[np.ndarray, np.ndarray, str]:
    """(reference rows, query rows, how): the query batches when there are any, else a stratified share."""
    if p.query_batches:
        ref, qry = batch_split(p.data.batches, p.query_batches)
        return ref, qry, f"query = batches {list(p.query_batches)}"
    ref, qry = stratified_split(p.data.labels, opts.query_fraction, opts.seed)
    return ref, qry, f"stratified {int(100 * opts.query_fraction)}% query"


def _base_params(p: TaskInputs, opts: EvalOptions, model: ScGPTModel) -> dict:
    return {"task": p.task, "dataset": p.dataset, "n_cells": p.data.n_cells, "gene_match": p.data.match.report(),
            "genes_matched": p.data.match.n_matched, "seed": opts.seed, "max_cells": opts.max_cells,
            "model_d_model": model.config.d_model, "model_n_layers": model.config.n_layers,
            **({"cell_emb": cell_emb(opts, p.task)} if p.task in DEFAULT_CELL_EMB else {}), **p.params}


def _ft_config(opts: EvalOptions, task: str, cross_batch: bool, **task_only) -> FineTuneConfig:
    """The fine-tune of ``task`` (annotation / integration) as ``opts`` sets it; ``cross_batch``: the query is
    other batches than the reference; ``task_only``: its own settings."""
    return FineTuneConfig(task=task, epochs=opts.epochs, batch_size=opts.batch_size, seed=opts.seed,
                          device=opts.device, lr=opts.lr, warmup_fraction=opts.warmup_fraction,
                          weight_decay=opts.weight_decay, min_steps=opts.min_steps, include_zeros=opts.include_zeros,
                          cell_emb=cell_emb(opts, task), dropout=opts.dropout,
                          gene_dropout=gene_dropout(opts, task, cross_batch), **task_only)


def _ft_params(ft: FineTuneConfig) -> dict:
    """The fine-tuning settings a run used, logged with its scores (lr None: the width-scaled default)."""
    skip = {"task", "seed", "device", "epochs"}
    return {f"ft_{f.name}": getattr(ft, f.name) for f in dataclasses.fields(ft) if f.name not in skip}


def run_annotation(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    """CLS fine-tuning on the reference, scored on the held-out query (§2.3, §4.5)."""
    ref_i, qry_i, how = reference_query_split(p, opts)
    if opts.label_fraction < 1.0:  # a label-scarce reference: a stratified share keeps every type
        keep, _ = stratified_split(p.data.labels[ref_i], 1.0 - opts.label_fraction, opts.seed + 1)
        ref_i = np.sort(ref_i[keep])
        how += f", {opts.label_fraction:.0%} of the reference labels"
    n_hvg = opts.n_hvg or DEFAULT_HVG["annotation"]
    ref_all = p.data.subset(ref_i)
    cols = select_hvg(ref_all.counts, n_hvg)  # HVGs from the reference only: no query leakage
    ref, qry = ref_all.take_genes(cols), p.data.subset(qry_i).take_genes(cols)
    y_q = qry.labels
    ft = _ft_config(opts, "annotation", bool(p.query_batches), class_weight=opts.class_weight)
    rows, hist, arts = {}, {}, []
    variants = [(MODEL, model.model)] + ([(RANDOM, None)] if opts.random_init else [])
    for label, init in variants:
        res = fine_tune(init, model.config, ref, ft, name=f"{p.dataset}/{label}")
        pred = predict_labels(res.model, qry, res.classes, device=opts.device, include_zeros=res.include_zeros)
        rows[label] = metrics.classification_scores(y_q, pred)
        hist[label] = res.best_epoch
        cm = metrics.normalized_confusion(y_q, pred)
        slug = "model" if init is not None else "random_init"
        cm.to_csv(outdir / f"confusion_{p.dataset}_{slug}.csv")
        arts.append(outdir / f"confusion_{p.dataset}_{slug}.csv")
        if opts.plots and init is not None:
            arts.append(plots.plot_confusion(cm, outdir / f"confusion_{p.dataset}.png",
                                             f"{label} on {p.dataset} query (rows: true type)"))
    pred = baselines.logreg_annotation(ref.lognorm(), ref.labels, qry.lognorm(), seed=opts.seed)
    rows["logreg on PCA"] = metrics.classification_scores(y_q, pred)
    params = {**_base_params(p, opts, model), "split": how, "n_reference": ref.n_cells, "n_query": qry.n_cells,
              "n_genes": ref.n_genes, "epochs": opts.epochs, "best_epoch": hist.get(MODEL),
              "best_epoch_random_init": hist.get(RANDOM), **_ft_params(ft)}
    return TaskResult("annotation", p.dataset, pd.DataFrame(rows).T, params, arts)


def _umap(emb, data: PreparedData, outdir: Path, slug: str, title: str, opts: EvalOptions) -> list[Path]:
    if not opts.plots:
        return []
    return [plots.plot_umap(emb, data.labels, data.batches, outdir / f"umap_{slug}.png", title, seed=opts.seed)]


def _embedding_baselines(data: PreparedData, opts: EvalOptions) -> dict[str, np.ndarray]:
    """PCA of log-normalized HVGs, and Harmony on it when there are batches."""
    n_hvg = opts.n_hvg or DEFAULT_HVG["integration"]
    cols = select_hvg(data.counts, n_hvg, data.batches)
    pcs = baselines.pca_embedding(data.take_genes(cols).lognorm() if cols.size < data.n_genes else data.lognorm(),
                                  seed=opts.seed)
    out = {"PCA": pcs}
    if data.batches is not None and len(set(data.batches)) >= 2:
        out["Harmony"] = baselines.harmony_embedding(pcs, data.batches, seed=opts.seed)
    return out


def run_integration(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    """GEP+GEPC+ECS+DAR+DSBN fine-tuning on all cells, scib scores of the embedding (§2.2)."""
    d = p.data
    ft = _ft_config(opts, "integration", False)  # no query: every cell is trained on
    rows, arts, best = {}, [], {}
    variants = [(MODEL, model.model)] + ([(RANDOM, None)] if opts.random_init else [])
    for label, init in variants:
        res = fine_tune(init, model.config, d, ft, name=f"{p.dataset}/{label}")
        emb = embed_fixed_genes(res.model, d, batch_names=res.batches, device=opts.device,
                                include_zeros=res.include_zeros)
        rows[label] = metrics.integration_scores(emb, d.labels, d.batches, seed=opts.seed,
                                                 resolutions=opts.resolutions)
        best[label] = res.best_epoch
        if init is not None:
            arts += _umap(emb, d, outdir, f"{p.dataset}_integration", f"{label} fine-tuned", opts)
    for label, emb in _embedding_baselines(d, opts).items():
        rows[label] = metrics.integration_scores(emb, d.labels, d.batches, seed=opts.seed,
                                                 resolutions=opts.resolutions)
        if label == "PCA":
            arts += _umap(emb, d, outdir, f"{p.dataset}_pca", "PCA", opts)
    params = {**_base_params(p, opts, model), "n_genes": d.n_genes, "n_batches": len(set(d.batches)),
              "epochs": opts.epochs, "best_epoch": best.get(MODEL), "best_epoch_random_init": best.get(RANDOM),
              **_ft_params(ft)}
    return TaskResult("integration", p.dataset, pd.DataFrame(rows).T, params, arts)


def zero_shot_scores(emb: np.ndarray, d: PreparedData, ref_i: np.ndarray, qry_i: np.ndarray,
                     opts: EvalOptions) -> dict[str, float]:
    """scib scores of one embedding plus kNN label transfer from the reference rows to the query rows."""
    s = metrics.integration_scores(emb, d.labels, d.batches, seed=opts.seed, resolutions=opts.resolutions)
    pred = metrics.knn_transfer(emb[ref_i], d.labels[ref_i], emb[qry_i], k=opts.knn_k)
    c = metrics.classification_scores(d.labels[qry_i], pred)
    s["knn_accuracy"], s["knn_macro_f1"] = c["accuracy"], c["macro_f1"]
    return s


def run_zero_shot(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    """Embeddings of the pretrained model, no fine-tuning: scib scores and kNN reference mapping."""
    d = p.data
    ref_i, qry_i, how = reference_query_split(p, opts)
    style = cell_emb(opts, "zero-shot")
    embs = {MODEL: model.embed_cells(d, seed=opts.seed, style=style)}
    if opts.random_init:
        embs[RANDOM] = model.random_init(opts.seed).embed_cells(d, seed=opts.seed, style=style)
    embs.update(_embedding_baselines(d, opts))
    rows = {label: zero_shot_scores(emb, d, ref_i, qry_i, opts) for label, emb in embs.items()}
    arts = _umap(embs[MODEL], d, outdir, f"{p.dataset}_zero_shot", f"{MODEL} zero-shot", opts)
    params = {**_base_params(p, opts, model), "split": how, "n_reference": int(ref_i.size),
              "n_query": int(qry_i.size), "n_genes": d.n_genes, "knn_k": opts.knn_k}
    return TaskResult("zero-shot", p.dataset, pd.DataFrame(rows).T, params, arts)


def run_gene_network(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    """Gene-embedding networks vs Reactome (§2.6, §4.7), beside a co-expression network."""
    d = p.data
    pw = genenet.load_gmt()
    keep = np.asarray([bool(s) for s in d.symbols])  # Reactome is keyed by symbol
    genes = [s for s in d.symbols if s]
    ids = d.token_ids[keep]
    sims = {MODEL: genenet.cosine_similarity(model.model.gene_embeddings(ids).float().cpu().numpy())}
    if opts.random_init:
        rnd = model.random_init(opts.seed).model
        sims[RANDOM] = genenet.cosine_similarity(rnd.gene_embeddings(ids).float().cpu().numpy())
    sims["co-expression"] = baselines.coexpression_similarity(d.lognorm()[:, keep])
    rows, arts = {}, []
    for label, sim in sims.items():
        scores, progs = genenet.network_scores(sim, genes, pw, threshold=opts.network_threshold,
                                               query=opts.query_gene, seed=opts.seed)
        rows[label] = scores
        slug = {MODEL: "model", RANDOM: "random_init"}.get(label, "coexpression")
        path = outdir / f"gene_programs_{p.dataset}_{slug}.csv"
        pd.DataFrame({"program": [i for i, pr in enumerate(progs) for _ in pr],
                      "gene": [genes[j] for pr in progs for j in pr]}).to_csv(path, index=False)
        arts.append(path)
    if opts.plots:
        hla = sorted(g for g in genes if g.startswith("HLA-"))
        nb = genenet.neighbours(sims[MODEL], genes, opts.query_gene, 10) if opts.query_gene in genes else []
        focus = hla + [g for g in nb if g not in hla]
        arts.append(plots.plot_gene_network(sims[MODEL], genes, focus, opts.network_threshold,
                                            outdir / f"gene_network_{p.dataset}.png",
                                            f"{MODEL} gene embeddings: HLA genes and {opts.query_gene}'s neighbours"))
        (outdir / f"{opts.query_gene}_neighbours_{p.dataset}.txt").write_text("\n".join(nb) + "\n")
        arts.append(outdir / f"{opts.query_gene}_neighbours_{p.dataset}.txt")
    params = {**_base_params(p, opts, model), "n_genes": len(genes), "threshold": opts.network_threshold,
              "query_gene": opts.query_gene, "reactome": genenet.REACTOME_GMT.name}
    return TaskResult("gene-network", p.dataset, pd.DataFrame(rows).T, params, arts)


RUNNERS = {"annotation": run_annotation, "integration": run_integration, "zero-shot": run_zero_shot,
           "gene-network": run_gene_network, "multiomic": lambda *a: _run_multiomic(*a),
           "perturbation": lambda *a: _run_perturbation(*a)}


def _run_perturbation(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    from eval.perturbation import run_perturbation

    return run_perturbation(p, model, opts, outdir)


def _run_multiomic(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    from eval.multiomic import run_multiomic

    return run_multiomic(p, model, opts, outdir)


def run(p: TaskInputs, model: ScGPTModel, opts: EvalOptions, outdir: Path) -> TaskResult:
    t0 = time.perf_counter()
    outdir.mkdir(parents=True, exist_ok=True)
    log.info("evaluating %s on %s (%d cells x %d genes)", p.task, p.dataset, p.data.n_cells, p.data.n_genes)
    res = RUNNERS[p.task](p, model, opts, outdir)
    res.wall_s = time.perf_counter() - t0
    res.params["wall_s"] = round(res.wall_s, 2)
    bad = res.out_of_range()
    if bad:  # a metric outside its definition's range is a bug, not a result
        raise AssertionError(f"scores out of range in {p.task}/{p.dataset}: {bad}")
    return res
