"""Benchmark: the multiomic task on the shipped 10x CITE-seq pair (RNA + protein, 2 batches), CPU.

Runs the real console command (``python -m eval.cli --task multiomic --dataset pbmc_cite``, a
subprocess: imports, MLflow logging and plots included) once per trunk mode and writes the score
tables with the wall time to ``benchmarks/results/multiomic.md`` (and ``.json``).

    .venv/bin/python benchmarks/bench_multiomic.py --model models:/scgpt-mo-debug/1 \\
        --tracking-uri sqlite:////tmp/mo_demo/mlflow.db --epochs 15 --n-hvg 500

``--min-steps N`` raises the epochs until each fine-tune makes at least N optimizer steps (377 cells
at batch 32 are 11 steps an epoch). Each command's log streams to ``$TMPDIR/bench_multiomic.<trunk>.log``
while it runs (the fine-tune logs its ETA every epoch). For a held-out score the model should be
pretrained on data that excludes these cells; the demo atlas's blood pretraining includes their RNA
(`pbmc-cite-10k`, `pbmc-cite-5k`), so the command marks its tables *not held out*.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.report import markdown_table  # noqa: E402


def run_once(args, trunk: str, out: Path) -> tuple[pd.DataFrame, float, str]:
    cmd = [sys.executable, "-m", "eval.cli", "--model", args.model, "--task", "multiomic", "--dataset", "pbmc_cite",
           "--tracking-uri", args.tracking_uri, "--epochs", str(args.epochs), "--n-hvg", str(args.n_hvg),
           "--batch-size", str(args.batch_size), "--min-steps", str(args.min_steps), "--trunk", trunk,
           "--seed", str(args.seed), "--out", str(out), "-v"]
    log_path = Path(tempfile.gettempdir()) / f"bench_multiomic.{trunk}.log"
    print("running:", " ".join(cmd[1:]), f"(log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as err:
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    stderr = log_path.read_text()
    if p.returncode != 0:
        raise SystemExit(f"evaluate failed ({p.returncode}):\n{stderr[-4000:]}")
    df = pd.read_csv(out / "multiomic_pbmc_cite" / "scores_multiomic_pbmc_cite.csv", index_col=0)
    log = "\n".join(line for line in stderr.splitlines() if "epoch" in line and "multiomic fine-tune" in line)
    return df, wall, log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--n-hvg", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--min-steps", type=int, default=0, help="optimizer steps per fine-tune at least (epochs raised)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trunk", action="append", default=None, help="scratch and/or inherit (default: both)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "multiomic")
    args = ap.parse_args()
    trunks = args.trunk or ["scratch", "inherit"]
    sections, record = [], {"model": args.model, "epochs": args.epochs, "n_hvg": args.n_hvg,
                            "min_steps": args.min_steps, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-multiomic-") as tmp:
        for trunk in trunks:
            df, wall, log = run_once(args, trunk, Path(tmp) / trunk)
            record["runs"][trunk] = {"wall_s": round(wall, 1), "table": df.round(4).to_dict(orient="index")}
            sections.append(f"### trunk = {trunk} ({wall:.0f} s wall, whole command)\n\n{markdown_table(df)}\n\n"
                            f"<details><summary>fine-tuning log</summary>\n\n```\n{log}\n```\n</details>\n")
            print(f"trunk={trunk}: {wall:.0f}s\n{markdown_table(df)}\n", flush=True)
    head = (f"## Multi-omic integration: 10x CITE-seq PBMC pair (RNA + protein, 2 batches)\n\n"
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs "
            f"(shared); model `{args.model}`; {args.epochs} epochs (min steps {args.min_steps}), {args.n_hvg} HVGs + "
            f"all proteins, batch {args.batch_size}, seed {args.seed}.\n")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text(head + "\n" + "\n".join(sections))
    args.results.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
