"""End-to-end training throughput: `train pretrain` cells/s for `debug` and `small`, 1 and 2 workers.

Each configuration is a real `train pretrain` process (its own local Ray, DeepSpeed ZeRO-2 on
CPU, MLflow sqlite); cells/s is read back from the run's per-step MLflow metric (global cells
per step / step wall time), median over the steps after the first two. Every worker gets one
CPU (``--cpus-per-worker 1``, one torch thread), so scaling efficiency = cells/s(2) / (2 x cells/s(1)).

    .venv/bin/python benchmarks/bench_train_e2e.py [--shards PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train_common import BIN, ensure_demo_shards, write_section

STEPS = {"debug": 20, "small": 8}


def run(preset: str, workers: int, shards: Path, work: Path) -> dict:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = f"{preset}-w{workers}"
    cmd = [str(BIN / "train"), "pretrain", "--config", preset, "--shards", str(shards), "--num-workers", str(workers),
           "--cpus-per-worker", "1", "--max-steps", str(STEPS[preset]), "--checkpoint-every", "1000",
           "--val-every", "1000", "--tracking-uri", uri, "--storage-path", str(work / "runs"), "--run-name", name,
           "--no-register", "--experiment", "bench"]
    env = dict(os.environ)  # Ray's settings: train sets them itself (localray.prepare)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    (exp,) = [e for e in c.search_experiments() if e.name == "bench"]
    (r,) = [r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == name]
    hist = sorted(c.get_metric_history(r.info.run_id, "cells_per_s"), key=lambda m: m.step)
    tok = sorted(c.get_metric_history(r.info.run_id, "tokens_per_s"), key=lambda m: m.step)
    pad = sorted(c.get_metric_history(r.info.run_id, "padding_fraction"), key=lambda m: m.step)
    return {"cps": statistics.median(m.value for m in hist[2:]), "tps": statistics.median(m.value for m in tok[2:]),
            "pad": statistics.median(m.value for m in pad), "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=None)
    ap.add_argument("--presets", default="debug,small")
    args = ap.parse_args()
    shards = Path(args.shards) if args.shards else ensure_demo_shards()
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for preset in args.presets.split(","):
            for w in (1, 2):
                res[(preset, w)] = run(preset, w, shards, Path(tmp))
                print(preset, w, res[(preset, w)], flush=True)
    lines = ["| preset | workers | cells/s | tokens/s | padding | steps | process wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (p, w), r in res.items():
        lines.append(f"| {p} | {w} | {r['cps']:,.1f} | {r['tps']:,.0f} | {r['pad']:.1%} | {STEPS[p]} "
                     f"| {r['wall']:.0f} |")
    lines.append("")
    for p in args.presets.split(","):
        eff = res[(p, 2)]["cps"] / (2 * res[(p, 1)]["cps"])
        lines.append(f"Scaling efficiency `{p}` 1 -> 2 workers: **{eff:.2f}** (cells/s(2) / (2 x cells/s(1))).")
    lines += ["", "Process wall includes Ray start, worker start, DeepSpeed init and the final checkpoint "
              "(~1 minute on this machine); cells/s is per step, medians after 2 warm-up steps. "
              "No GPU on this machine: the H200 `base` bf16 figures (flash vs sdpa, MFU) were not measured."]
    print("\n".join(lines))
    write_section("End-to-end training throughput (CPU)", "python benchmarks/bench_train_e2e.py"
                  + (f" --shards {args.shards}" if args.shards else ""), lines)


if __name__ == "__main__":
    sys.exit(main())
