"""Does pretraining pay? A pretrained model against its random-init twin on data held out of
pretraining, with the same fine-tuning budget, over several seeds (mean and spread).

Measures (issue 10, item 3), on a held-out labelled dataset (default: the symphony PBMCs, which
the main job's pretraining leaves out, with the 5' batch as query):

* annotation with all reference labels and with 10% of them (accuracy, macro-F1; logistic
  regression on PCA beside them);
* zero-shot embedding: AvgBIO and kNN reference-mapping accuracy (PCA beside them);
* held-out generative loss (GEP, the pretraining objective) on the dataset's cells, against the
  per-gene mean bin over the pretraining shard set's training cells and the cell's own mean bin;
* gene networks: Reactome Pearson of the gene-embedding network (co-expression beside it).

The seed changes the fine-tuning order and initial head, the random-init weights, the kNN split
and the GEP masks; the pretrained weights are the same in every seed.

    python benchmarks/bench_pretrain.py --model models:/scgpt-cpu/latest --shards demo_out/shards_blood \\
        --tracking-uri sqlite:///demo_out/mlflow.db --out benchmarks/results/pretrain
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eval import tasks  # noqa: E402
from eval.api import ScGPTModel  # noqa: E402
from eval.gep import cells_from_prepared, cells_from_shards, heldout_gep, training_gene_means  # noqa: E402
from eval.leakage import overlap  # noqa: E402

MODEL, RANDOM = tasks.MODEL, tasks.RANDOM


def measure(model: ScGPTModel, shards: str, dataset: str, seed: int, args) -> dict[tuple[str, str], float]:
    """{(measure, method): value} for one seed."""
    out: dict[tuple[str, str], float] = {}
    opts = dict(epochs=args.epochs, n_hvg=args.n_hvg, max_cells=args.max_cells, seed=seed, plots=False,
                min_steps=args.min_steps)
    with tempfile.TemporaryDirectory() as tmp:
        for frac in (1.0, 0.1):
            o = tasks.EvalOptions(**opts, label_fraction=frac)
            res = tasks.run(tasks.plan("annotation", model, dataset, o), model, o, Path(tmp) / f"a{frac}")
            tag = "all labels" if frac == 1.0 else "10% labels"
            for method in (MODEL, RANDOM, "logreg on PCA"):
                out[(f"annotation accuracy, {tag}", method)] = float(res.table.loc[method, "accuracy"])
                out[(f"annotation macro-F1, {tag}", method)] = float(res.table.loc[method, "macro_f1"])
        o = tasks.EvalOptions(**opts)
        res = tasks.run(tasks.plan("zero-shot", model, dataset, o), model, o, Path(tmp) / "z")
        for method in (MODEL, RANDOM, "PCA"):
            out[("zero-shot AvgBIO", method)] = float(res.table.loc[method, "AvgBIO"])
            out[("zero-shot kNN accuracy", method)] = float(res.table.loc[method, "knn_accuracy"])
        o = tasks.EvalOptions(**{**opts, "n_hvg": None})
        res = tasks.run(tasks.plan("gene-network", model, dataset, o), model, o, Path(tmp) / "g")
        for method in (MODEL, RANDOM, "co-expression"):
            out[("gene network Reactome Pearson", method)] = float(res.table.loc[method, "pathway_pearson"])
    # held-out GEP: the dataset's expressed genes, and the shard set's validation cells
    gm = args.gene_means
    data = model.prepare(tasks.load_dataset(dataset)[1], name=dataset, require_labels=False,
                         max_cells=args.max_cells, seed=seed)
    rnd = model.random_init(seed)
    for where, (genes, bins) in ((dataset, cells_from_prepared(data)), ("shard-set validation cells",
                                                                         cells_from_shards(shards))):
        s = heldout_gep(model.model, genes, bins, gm, seed=seed)
        r = heldout_gep(rnd.model, genes, bins, gm, seed=seed)
        key = f"held-out GEP MSE ({where})"
        out[(key, MODEL)], out[(key, RANDOM)] = s.model, r.model
        out[(key, "per-gene mean")], out[(key, "cell mean")] = s.per_gene_mean, s.cell_mean
    return out


LOWER_IS_BETTER = "GEP"


def summarize(per_seed: list[dict[tuple[str, str], float]]) -> pd.DataFrame:
    keys = sorted({k for d in per_seed for k in d}, key=lambda k: list(per_seed[0]).index(k))
    rows = []
    for measure_, method in keys:
        v = np.array([d[(measure_, method)] for d in per_seed], dtype=float)
        rows.append({"measure": measure_, "method": method, "mean": v.mean(), "sd": v.std(ddof=1) if v.size > 1 else 0.0,
                     "values": " ".join(f"{x:.3f}" for x in v)})
    return pd.DataFrame(rows)


def verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """Per measure: pretrained minus random init, and whether the gap exceeds both spreads."""
    out = []
    for measure_, g in df.groupby("measure", sort=False):
        g = g.set_index("method")
        pre, rnd = g.loc[MODEL], g.loc[RANDOM]
        sign = -1.0 if LOWER_IS_BETTER in measure_ else 1.0
        gap = sign * (pre["mean"] - rnd["mean"])
        others = g.drop(index=[MODEL, RANDOM])
        best_other = (others["mean"].min() if sign < 0 else others["mean"].max()) if len(others) else np.nan
        out.append({"measure": measure_, "pretrained": f"{pre['mean']:.3f} ± {pre['sd']:.3f}",
                    "random init": f"{rnd['mean']:.3f} ± {rnd['sd']:.3f}",
                    "best baseline": f"{best_other:.3f} ({others['mean'].idxmin() if sign < 0 else others['mean'].idxmax()})"
                    if len(others) else "",
                    "pretrained ahead beyond the spread": bool(gap > pre["sd"] + rnd["sd"])})
    return pd.DataFrame(out)


def _options(args) -> dict:
    """What a saved seed depends on besides the model (a --resume reuses a seed only when these match)."""
    return {k: getattr(args, k) for k in ("dataset", "epochs", "n_hvg", "max_cells", "min_steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="models:/<name>/<version> or a model folder")
    ap.add_argument("--shards", required=True, help="the shard set the model was pretrained on")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--dataset", default="symphony", help="a labelled dataset held out of pretraining")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-hvg", type=int, default=500)
    ap.add_argument("--max-cells", type=int, default=0)
    ap.add_argument("--min-steps", type=int, default=0, help="fine-tuning step floor (evaluate --min-steps)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain"))
    ap.add_argument("--resume", action="store_true", help="reuse the seeds already saved under --out (seed_<n>.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    model = ScGPTModel.load(args.model, tracking_uri=args.tracking_uri, device="cpu")
    seen = overlap(model.info, "annotation", args.dataset)
    if seen:
        sys.exit(f"{args.dataset} is in the model's pretraining data ({', '.join(seen)}): pick a held-out dataset")
    args.gene_means = training_gene_means(args.shards, len(model.vocab))
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for s in args.seeds:  # each seed is saved as it finishes; a re-run with --resume reuses the saved ones
        path = args.out / f"seed_{s}.json"
        if args.resume and path.exists():
            saved = json.loads(path.read_text())
            if saved["model"] == args.model and saved["options"] == _options(args):
                per_seed.append({tuple(k.split("\t")): v for k, v in saved["values"].items()})
                print(f"seed {s}: reused {path}", flush=True)
                continue
        t = time.perf_counter()
        per_seed.append(measure(model, args.shards, args.dataset, s, args))
        path.write_text(json.dumps({"model": args.model, "options": _options(args),
                                    "wall_s": round(time.perf_counter() - t, 1),
                                    "values": {"\t".join(k): v for k, v in per_seed[-1].items()}}, indent=1))
        print(f"seed {s}: {time.perf_counter() - t:.0f}s", flush=True)
    df = summarize(per_seed)
    v = verdicts(df)
    wall = time.perf_counter() - t0
    df.to_csv(args.out / "pretrain_vs_random.csv", index=False)
    meta = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "model": args.model, "model_config": model.config.to_dict(), "dataset": args.dataset,
            "seeds": args.seeds, "epochs": args.epochs, "n_hvg": args.n_hvg, "min_steps": args.min_steps,
            "max_cells": args.max_cells, "wall_s": round(wall, 1)}
    (args.out / "pretrain_vs_random.json").write_text(json.dumps(meta, indent=1))
    md = ["| measure | pretrained | random init | best baseline | pretrained ahead beyond the spread |",
          "|---|---:|---:|---:|:---:|"]
    md += [f"| {r['measure']} | {r['pretrained']} | {r['random init']} | {r['best baseline']} | "
           f"{'yes' if r['pretrained ahead beyond the spread'] else 'no'} |" for _, r in v.iterrows()]
    text = "\n".join(md)
    (args.out / "pretrain_vs_random.md").write_text(text + f"\n\n{meta['command']}\n{meta['machine']}, "
                                                     f"{wall:.0f}s\n")
    print(text)
    print(f"\n{sum(v['pretrained ahead beyond the spread'])} of {len(v)} measures: pretrained ahead beyond the "
          f"seed spread; wall {wall:.0f}s")


if __name__ == "__main__":
    main()
