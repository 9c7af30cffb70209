"""`evaluate`: score a model on one task, or `evaluate suite` on every task.

    evaluate --model models:/scgpt-debug/1 --task annotation --dataset pbmc3k
    evaluate --model ./checkpoint --task integration --dataset my.h5ad --label-key celltype --batch-key batch
    evaluate suite --model models:/scgpt-debug@champion --epochs 5

Bad input (a model URI that does not resolve, a dataset with no genes in the vocabulary,
a missing key, one batch only, log-normalized data) exits with code 2 and one clear message.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from eval import tasks
from eval.errors import EvalError

log = logging.getLogger(__name__)


def _parser(suite: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate suite" if suite else "evaluate",
        description=("Run every task on its default datasets" if suite else
                     "Fine-tune / embed and score a model on one task") + "; logs to MLflow.")
    ap.add_argument("--model", required=True,
                    help="models:/<name>/<version>, models:/<name>@<alias>, or a checkpoint folder")
    if not suite:
        ap.add_argument("--task", required=True, choices=tasks.TASKS)
        ap.add_argument("--dataset", required=True, help="an .h5ad file with raw counts, or a shipped "
                        "dataset: pbmc3k, symphony; multiomic: a MuData .h5mu, an .h5ad with proteins in "
                        "obsm, or pbmc_cite")
        ap.add_argument("--label-key", help="obs column with cell types (default: the shipped dataset's)")
        ap.add_argument("--batch-key", help="obs column with batches (integration; default: the shipped dataset's)")
        ap.add_argument("--query-batch", action="append", default=[],
                        help="batch held out as the annotation / reference-mapping query (repeatable)")
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
    ap.add_argument("--n-hvg", type=int, help="HVGs (default: paper's 3000 annotation, 1200 integration)")
    ap.add_argument("--max-cells", type=int, default=0, help="subsample cells (seeded); 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-random-init", action="store_true",
                    help="skip the from-scratch rows (same architecture, random weights)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--out", type=Path, help="also keep score tables and plots in this folder")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    from eval.api import ScGPTModel, default_device
    from eval.report import combine_markdown
    from eval.runner import evaluate, evaluate_suite
    from training.tracking import resolve_tracking_uri

    for name in ("epochs", "batch_size", "max_cells"):
        if getattr(args, name) < (1 if name != "max_cells" else 0):
            raise EvalError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise EvalError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.warmup < 1:
        raise EvalError(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    if args.weight_decay < 0:
        raise EvalError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.n_hvg is not None and args.n_hvg < 1:
        raise EvalError(f"--n-hvg must be positive, got {args.n_hvg}")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)  # the trainer's rule: flag, env, ./mlflow.db
    device = default_device(args.device)
    model = ScGPTModel.load(args.model, tracking_uri=tracking_uri, device=device)
    opts = tasks.EvalOptions(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_fraction=args.warmup,
        weight_decay=args.weight_decay, n_hvg=args.n_hvg, max_cells=args.max_cells,
        seed=args.seed, random_init=not args.no_random_init, plots=not args.no_plots, device=device,
        label_key=None if suite else args.label_key, batch_key=None if suite else args.batch_key,
        query_batches=() if suite else tuple(args.query_batch), trunk=args.trunk)
    if suite:
        parent, results = evaluate_suite(model, opts, tracking_uri=tracking_uri, out=args.out)
        print(combine_markdown(results))
        print(f"\nMLflow: suite run {parent} in {tracking_uri} ({sum(r.wall_s for r in results):.1f}s)")
    else:
        res = evaluate(model, args.task, args.dataset, opts, tracking_uri=tracking_uri, out=args.out)
        print(res.markdown())
        print(f"\nMLflow: run {res.params['mlflow_run_id']} in {tracking_uri} ({res.wall_s:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
