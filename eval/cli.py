"""`evaluate`: score a model on one task, or `evaluate suite` on every task.

    evaluate --model models:/scgpt-debug/1 --task annotation --dataset pbmc3k
    evaluate --model ./checkpoint --task integration --dataset my.h5ad --label-key celltype --batch-key batch
    evaluate suite --model models:/scgpt-debug@champion --epochs 5
    evaluate gep --model models:/scgpt-cpu/1 --shards demo_out/shards_pretrain --dataset symphony

Bad input (a model URI that does not resolve, a dataset with no genes in the vocabulary,
a missing key, one batch only, log-normalized data) exits with code 2 and one clear message.

Only argparse and the standard library load before a command runs (``--help`` and ``--version``
stay fast): the evaluation stack (torch, scanpy, MLflow) is imported inside the commands.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from eval.errors import EvalError

log = logging.getLogger(__name__)

# The task names, here so that parsing needs no torch; tests/test_cli_conventions.py binds them to eval.tasks.TASKS.
TASKS = ("annotation", "integration", "zero-shot", "gene-network", "multiomic", "perturbation")
COMMANDS = """commands:
  evaluate --model M --task T --dataset D [...]   fine-tune / embed and score M on one task (this help)
  evaluate suite --model M [...]                  every task on its shipped datasets (evaluate suite --help)
  evaluate gep --model M --shards S [...]         held-out generative loss vs trivial predictors (evaluate gep --help)
"""


def version() -> str:
    """The installed package's version (package metadata), for ``--version``."""
    try:
        return importlib.metadata.version("scgpt-census")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without `pip install -e .`
        return "unknown (not installed)"


def _parser(suite: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate suite" if suite else "evaluate",
        description=("Run every task on its default datasets" if suite else
                     "Fine-tune / embed and score a model on one task") + "; logs to MLflow. "
                    "Commands: evaluate, evaluate suite, evaluate gep (below).",
        epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"evaluate {version()}")
    ap.add_argument("--model", required=True,
                    help="models:/<name>/<version>, models:/<name>@<alias>, or a checkpoint folder")
    if suite:
        ap.add_argument("--task", action="append", default=[], choices=TASKS,
                        help="run only these tasks of the suite (repeatable; default: all)")
        ap.add_argument("--held-out-only", action="store_true",
                        help="skip the suite's datasets the model was pretrained on (its lineage.json)")
    if not suite:
        ap.add_argument("--task", required=True, choices=TASKS, help="the task to run: %(choices)s")
        ap.add_argument("--dataset", required=True, help="an .h5ad file with raw counts, or a shipped "
                        "dataset: pbmc3k, symphony; multiomic: a MuData .h5mu, an .h5ad with proteins in "
                        "obsm, or pbmc_cite; perturbation: a CRISPR screen .h5ad or papalexi")
        ap.add_argument("--label-key", help="obs column with cell types (default: the shipped dataset's)")
        ap.add_argument("--batch-key", help="obs column with batches (integration; default: the shipped dataset's)")
        ap.add_argument("--query-batch", action="append", default=[],
                        help="batch held out as the annotation / reference-mapping query (repeatable)")
    if not suite:
        ap.add_argument("--perturbation-key", help="perturbation: obs column of the conditions (default: perturbation)")
        ap.add_argument("--control", help="perturbation: the control label (default: the first of ctrl, control, "
                        "non-targeting, NT found)")
    ap.add_argument("--splits", type=int, default=5, help="perturbation: unseen-perturbation split seeds (default 5)")
    ap.add_argument("--max-perturbations", type=int, default=0,
                    help="perturbation: keep this many perturbations (seeded) for a quick run; 0 = all")
    ap.add_argument("--trunk", choices=("scratch", "inherit"), default="scratch",
                    help="multiomic: 'scratch' = only gene embeddings inherited, fresh 4-layer trunk (paper); "
                    "'inherit' = keep every pretrained weight")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                    "else sqlite:///./mlflow.db)")
    ap.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (paper: 30)")
    ap.add_argument("--batch-size", type=int, default=32, help="fine-tuning mini-batch (paper: 32)")
    ap.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the paper's 1e-4 at "
                    "width 512, scaled with the model width: 1e-4 x (512/d_model)^1.2, at most 3e-3)")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="linear warm-up, as a fraction of all fine-tuning steps (default 0.1; 0 = none)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01; 0 = Adam)")
    ap.add_argument("--label-fraction", type=float, default=1.0,
                    help="annotation: use the labels of this stratified share of the reference (default 1.0; "
                         "0.1 = a label-scarce reference)")
    ap.add_argument("--min-steps", type=int, default=0,
                    help="fine-tuning: at least this many optimizer steps (more epochs for a small reference)")
    ap.add_argument("--perturbation-min-steps", type=int, default=None,
                    help="perturbation fine-tunes: their own step floor (default: --min-steps). They are the "
                         "slowest fine-tunes of the suite (4 per split), so a CPU run can give them fewer steps")
    ap.add_argument("--class-weight", choices=("balanced", "none"), default="none",
                    help="annotation loss: 'balanced' weights the cross-entropy by inverse class frequency, so rare "
                         "cell types count as much as common ones (default: %(default)s, as the paper)")
    ap.add_argument("--dropout", type=float, default=None,
                    help="annotation / integration fine-tunes: dropout (default: the pretrained model's; the "
                         "official annotation tutorial uses 0.2)")
    ap.add_argument("--gene-dropout", type=float, default=None,
                    help="annotation / integration fine-tunes: augment each training cell at each step by dropping "
                         "a share of its expressed input genes drawn uniformly from [0, this), so the model cannot "
                         "lean on sequencing depth (default: 0.5 for annotation when the query is other batches, else 0 = "
                         "off; off for integration)")
    ap.add_argument("--include-zeros", action="store_true",
                    help="annotation / integration: feed every HVG, zeros as bin 0 (default: each cell's expressed "
                         "HVGs only, as pretraining and the reference fine-tuning)")
    ap.add_argument("--cell-emb", choices=("cls", "avg-pool"),
                    help="the cell embedding scored: the final <cls> state or avg-pool, the mean final gene "
                         "state (default: avg-pool for annotation and zero-shot, cls for integration and "
                         "multiomic, where GEPC and DAR train <cls>; BENCHMARKS.md, issue 10)")
    ap.add_argument("--n-hvg", type=int, help="HVGs (default: paper's 3000 annotation, 1200 integration)")
    ap.add_argument("--max-cells", type=int, default=0, help="subsample cells (seeded), an integer >= 0; 0 = all")
    ap.add_argument("--seed", type=int, default=0, help="seed of splits, subsampling, fine-tuning and the random-init "
                    "twin, any integer (default: %(default)s)")
    ap.add_argument("--no-random-init", action="store_true",
                    help="skip the from-scratch rows (same architecture, random weights)")
    ap.add_argument("--no-plots", action="store_true", help="skip UMAPs, confusion matrices and network figures")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default: auto)")
    ap.add_argument("--out", type=Path, help="also keep score tables and plots in this folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="info-level logs of every library, not only eval's")
    return ap


def _gep_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evaluate gep", description=(
        "Held-out generative loss (GEP MSE in bins on cells the model never trained on) against the "
        "per-gene-mean and cell-mean predictors: does pretraining predict expression from context?"))
    ap.add_argument("--version", action="version", version=f"evaluate {version()}")
    ap.add_argument("--model", required=True, help="models:/<name>/<version> or a checkpoint folder")
    ap.add_argument("--shards", required=True, type=Path,
                    help="the shard set the model was pretrained on (its training cells fit the per-gene mean; "
                         "its validation cells are scored)")
    ap.add_argument("--dataset", action="append", default=[],
                    help="also score the expressed genes of this dataset (shipped name or .h5ad); repeatable")
    ap.add_argument("--max-cells", type=int, default=2000, help="cells per scored set (seeded), an integer >= 1; "
                    "default 2000")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI of a models:/ URI (default: $MLFLOW_TRACKING_URI, "
                    "else sqlite:///./mlflow.db)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cell sample and the masks, any integer "
                    "(default: %(default)s)")
    return ap


def _gep_main(args: argparse.Namespace) -> int:
    from eval.api import ScGPTModel
    from eval.data import load_dataset
    from eval.gep import cells_from_prepared, cells_from_shards, heldout_gep, training_gene_means
    from eval.leakage import warn_if_pretrained_on
    from shardset import ManifestError

    model = ScGPTModel.load(args.model, tracking_uri=args.tracking_uri, device="cpu")
    try:
        gm = training_gene_means(args.shards, len(model.vocab))
        sets = [("validation cells of " + args.shards.name, cells_from_shards(args.shards, args.max_cells, args.seed))]
    except ManifestError as e:
        raise EvalError(f"--shards {args.shards}: {e}") from None
    for spec in args.dataset:
        warn_if_pretrained_on(model.info, "zero-shot", spec)
        name, adata, _ = load_dataset(spec)
        data = model.prepare(adata, name=name, require_labels=False, max_cells=args.max_cells, seed=args.seed)
        sets.append((name, cells_from_prepared(data)))
    print("| cells | n | scGPT | random init | per-gene mean | cell mean | scGPT vs better trivial |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for where, (genes, bins) in sets:
        s = heldout_gep(model.model, genes, bins, gm, seed=args.seed)
        r = heldout_gep(model.random_init(args.seed).model, genes, bins, gm, seed=args.seed)
        print(f"| {where} | {s.n_cells} | {s.model:.1f} | {r.model:.1f} | {s.per_gene_mean:.1f} | {s.cell_mean:.1f} | "
              f"{-100 * s.gain:+.0f}% |")
    print("\nGEP MSE in bins over the unknown genes (25/50/75% of each cell's expressed genes, pretraining's "
          "protocol); lower is better; a negative last column means scGPT predicts better than both trivial ones.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gep":
        args = _gep_parser().parse_args(argv[1:])
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            return _gep_main(args)
        except EvalError as e:
            print(f"evaluate gep: error: {e}", file=sys.stderr)
            return 2
    suite = bool(argv) and argv[0] == "suite"
    args = _parser(suite).parse_args(argv[1:] if suite else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("eval").setLevel(logging.INFO)
    try:
        return _main(args, suite)
    except EvalError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, suite: bool) -> int:
    from eval import tasks
    from eval.api import ScGPTModel, default_device
    from eval.report import combine_markdown, plain_summary
    from eval.runner import evaluate, evaluate_suite
    from training.tracking import check_tracking_uri, resolve_tracking_uri

    for name in ("epochs", "batch_size", "max_cells", "splits", "max_perturbations", "min_steps",
                 "perturbation_min_steps"):
        if (getattr(args, name) or 0) < (1 if name in ("epochs", "batch_size", "splits") else 0):
            raise EvalError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise EvalError(f"--lr must be positive, got {args.lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise EvalError(f"--dropout is a probability in [0, 1), got {args.dropout}")
    if args.gene_dropout is not None and not 0 <= args.gene_dropout < 1:
        raise EvalError(f"--gene-dropout is a share of the expressed genes in [0, 1), got {args.gene_dropout}")
    if not 0 <= args.warmup < 1:
        raise EvalError(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    if args.weight_decay < 0:
        raise EvalError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 < args.label_fraction <= 1:
        raise EvalError(f"--label-fraction is a share of the reference in (0, 1], got {args.label_fraction}")
    if args.n_hvg is not None and args.n_hvg < 1:
        raise EvalError(f"--n-hvg must be positive, got {args.n_hvg}")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)  # the trainer's rule: flag, env, ./mlflow.db
    try:  # a missing folder, a file that is no database, an unreachable server: one message, nothing written
        check_tracking_uri(tracking_uri)
    except ValueError as e:
        raise EvalError(str(e)) from None
    device = default_device(args.device)
    model = ScGPTModel.load(args.model, tracking_uri=tracking_uri, device=device)
    opts = tasks.EvalOptions(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_fraction=args.warmup,
        weight_decay=args.weight_decay, n_hvg=args.n_hvg, max_cells=args.max_cells,
        seed=args.seed, label_fraction=args.label_fraction, min_steps=args.min_steps,
        perturbation_min_steps=args.perturbation_min_steps, dropout=args.dropout, gene_dropout=args.gene_dropout,
        include_zeros=args.include_zeros, class_weight=args.class_weight, cell_emb=args.cell_emb, random_init=not args.no_random_init, plots=not args.no_plots, device=device,
        label_key=None if suite else args.label_key, batch_key=None if suite else args.batch_key,
        query_batches=() if suite else tuple(args.query_batch), trunk=args.trunk,
        perturbation_key=None if suite else args.perturbation_key, control=None if suite else args.control,
        n_splits=args.splits, max_perturbations=args.max_perturbations)
    if suite:
        from eval.leakage import overlap

        chosen = tuple((t, d) for t, d in tasks.SUITE if not args.task or t in args.task)
        if args.held_out_only:
            skipped = [f"{t} on {d}" for t, d in chosen if overlap(model.info, t, d)]
            chosen = tuple((t, d) for t, d in chosen if not overlap(model.info, t, d))
            if skipped:
                print(f"skipping (pretrained on these cells): {', '.join(skipped)}", flush=True)
        if not chosen:
            raise EvalError("no suite entry is left to run: drop --held-out-only or choose other --task values")
        parent, results = evaluate_suite(model, opts, tracking_uri=tracking_uri, out=args.out, suite=chosen)
        print(combine_markdown(results))
        print("\nIn plain words (headline metric per task; 'about level' = within 0.02):\n" + plain_summary(results))
        print(f"\nMLflow: suite run {parent} in {tracking_uri} ({sum(r.wall_s for r in results):.1f}s)")
    else:
        res = evaluate(model, args.task, args.dataset, opts, tracking_uri=tracking_uri, out=args.out)
        print(res.markdown())
        print(f"\nMLflow: run {res.params['mlflow_run_id']} in {tracking_uri} ({res.wall_s:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
