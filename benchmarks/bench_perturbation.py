"""Benchmark: the perturbation task on the shipped Papalexi ECCITE-seq screen, CPU.

Runs the real console command (``python -m eval.cli --task perturbation --dataset papalexi``, a
subprocess: imports, MLflow logging and plots included) once, over ``--splits`` unseen-perturbation
split seeds, and writes the table (mean ± standard deviation over the splits) with the wall time,
the command and the machine to ``benchmarks/results/perturbation.md`` (and ``.json``). Beside the
scores: for how many test perturbations the linear (PCA) baseline had no gene embedding (none of
their targets measured) and fell back to its fitted offset, and the scores per subgroup of targets
(measured or not).

    .venv/bin/python benchmarks/bench_perturbation.py --model models:/scgpt-cpu/1 \\
        --tracking-uri sqlite:////tmp/h11/mlflow.db --max-cells 1500 --n-hvg 200 --epochs 4 --splits 5

Point ``--tracking-uri`` at a copy of the database that holds the model: the run is logged there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import perturbation_scores as ps  # noqa: E402
from eval.report import markdown_table  # noqa: E402

PAPER = ("Paper (Cui et al. 2024, Table 1), for context only (other screens, the full model, a GPU): "
         "scGPT corr(Δ) on the top-20 DE genes 0.775 on Adamson, 0.546 on Norman.")


def _cell(m: float, s: float) -> str:
    return "undefined" if not np.isfinite(m) else f"{m:.3f} ± {s:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--max-cells", type=int, default=1500)
    ap.add_argument("--max-perturbations", type=int, default=0)
    ap.add_argument("--n-hvg", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--min-steps", type=int, default=0)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} CPU cores (shared, loaded)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "perturbation")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-perturbation-") as tmp:
        out = Path(tmp)
        cmd = [sys.executable, "-m", "eval.cli", "--model", args.model, "--task", "perturbation", "--dataset",
               "papalexi", "--tracking-uri", args.tracking_uri, "--max-cells", str(args.max_cells),
               "--max-perturbations", str(args.max_perturbations), "--n-hvg", str(args.n_hvg),
               "--epochs", str(args.epochs), "--min-steps", str(args.min_steps), "--splits", str(args.splits),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--out", str(out), "-v"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"evaluate failed ({p.returncode}):\n{p.stderr[-4000:]}")
        d = out / "perturbation_papalexi"
        table = pd.read_csv(d / "scores_perturbation_papalexi.csv", index_col=0)
        spread = pd.read_csv(d / "scores_perturbation_papalexi_spread.csv", index_col=0)
        per = pd.read_csv(d / "perturbation_scores_per_perturbation_papalexi.csv")
    log = "\n".join(ln for ln in p.stderr.splitlines()
                    if "perturbation fine-tune" in ln and ("epoch" in ln or "training cells" in ln)
                    or "perturbation split" in ln or "cells (" in ln)
    cells = table.copy().astype(object)
    for m in table.index:
        for c in table.columns:
            cells.at[m, c] = _cell(table.at[m, c], spread.at[m, c])
    # per test perturbation: are its targets measured (the linear (PCA) baseline has an embedding)?
    first = per[per["method"] == table.index[0]]
    n_test = int(len(first))
    n_fallback = int((first["targets_measured"] == 0).sum())
    per["targets"] = np.where(per["targets_measured"] > 0, "measured", "not measured")
    by = per.groupby(["targets", "method"], sort=False)["pearson_delta_de"].agg(
        lambda v: ps.mean_defined(v.tolist())).unstack(0).reindex(table.index)
    counts = first.groupby(np.where(first["targets_measured"] > 0, "measured", "not measured")).size()
    by.columns = [f"{c} (n={int(counts.get(c, 0))})" for c in by.columns]
    by_md = markdown_table(by.astype(float).round(3).astype(object).where(by.notna(), "undefined"))
    wins = {m: float((per[per["method"] == m].set_index(["split", "perturbation"])["pearson_delta_de"]
                      > per[per["method"] == "train mean"].set_index(["split", "perturbation"])["pearson_delta_de"]
                      ).mean()) for m in table.index if m not in ("train mean", "no change")}
    shown = " ".join(shlex.quote(x) for x in [".venv/bin/python", "benchmarks/bench_perturbation.py", *sys.argv[1:]])
    when = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    head = (f"## Perturbation response: Papalexi ECCITE-seq screen (issue 11)\n\n"
            f"{when}; machine: {args.machine}; model `{args.model}`; {args.splits} unseen-perturbation split "
            f"seeds ({args.seed}..{args.seed + args.splits - 1}); at most {args.max_cells} cells "
            f"({'all' if not args.max_perturbations else args.max_perturbations} perturbations with >= 5 cells), "
            f"{args.n_hvg} HVGs + the measured targets, {args.epochs} epochs (min steps {args.min_steps}), "
            f"batch {args.batch_size}. Wall time of the whole command: **{wall:.0f} s** ({wall / 60:.1f} min).\n\n"
            f"Command: `{shown}`\n\n"
            f"(it runs `{' '.join(shlex.quote(x) for x in cmd[1:]).replace(str(out), '<tmp>')}`)\n")
    body = (f"### Scores (mean ± standard deviation over {args.splits} splits; per split the mean over its test "
            f"perturbations)\n\n{markdown_table(cells)}\n\n{PAPER}\n\n"
            f"### corr(Δ) on the DE genes by whether the test perturbation's target is measured\n\n"
            f"{n_fallback} of the {n_test} test perturbations (over all splits) have no measured target: the "
            "linear (PCA) baseline has no gene embedding for them and predicts its fitted offset (close to the "
            "training mean); linear (scGPT emb.) places them through the pretrained token embedding.\n\n"
            f"{by_md}\n\nShare of test perturbations where the method's corr(Δ) on the DE genes beats the "
            f"training mean's: " + ", ".join(f"{m} {v:.2f}" for m, v in wins.items()) + "\n\n"
            f"<details><summary>fine-tuning log</summary>\n\n```\n{log}\n```\n</details>\n")
    record = {"when": when, "machine": args.machine, "model": args.model, "command": shown, "wall_s": round(wall, 1),
              "settings": {k: getattr(args, k) for k in ("max_cells", "max_perturbations", "n_hvg", "epochs",
                                                         "min_steps", "splits", "batch_size", "seed")},
              "mean": table.round(4).to_dict(orient="index"), "std": spread.round(4).to_dict(orient="index"),
              "n_test_perturbations": n_test, "n_linear_fallback": n_fallback,
              "pearson_delta_de_by_targets": by.round(4).to_dict(orient="index"),
              "share_beating_train_mean": wins,
              "per_perturbation": per.drop(columns=["targets"]).round(4).to_dict(orient="records")}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text(head + "\n" + body)
    args.results.with_suffix(".json").write_text(json.dumps(record, indent=1, default=float))
    print(head + "\n" + body)
    print(f"wrote {args.results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
