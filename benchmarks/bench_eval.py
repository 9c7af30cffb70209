"""Benchmark: wall time of `evaluate suite` for the `debug` and `small` presets on CPU.

For each preset it runs the real console script (`evaluate suite`, a subprocess, so imports and
MLflow logging are included) ``--repeats`` times and reports the median wall time, the per-task
times (from the runs' ``wall_s`` params) and the score tables the suite produced, with the
baselines beside the model rows. Results are printed and written as a Markdown section.

    .venv/bin/python benchmarks/bench_eval.py                      # untrained preset models
    .venv/bin/python benchmarks/bench_eval.py --model debug=models:/scgpt-debug/1 --tracking-uri sqlite:///mlflow.db

Without ``--model``, each preset is a freshly initialised network (seed 0) with an Ensembl
vocabulary of the shipped hg19 gene table (32,7k genes): the timing is that of a trained model of
the same shape; the model rows of the score tables are then those of an untrained network.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_model(preset: str, out: Path) -> str:
    import torch

    from eval.genes import symbol_table
    from scgpt_model.checkpoint import save_pretrained
    from scgpt_model.model import ScGPT
    from scgpt_model.presets import get_preset
    from scgpt_model.vocab import GeneVocab

    vocab = GeneVocab.from_genes(sorted(set(symbol_table().values())))
    torch.manual_seed(0)
    model = ScGPT(get_preset(preset, len(vocab)))
    save_pretrained(model, vocab, out)
    return str(out)


def pretrain(presets: list[str], work: Path, cells: int, epochs: int) -> tuple[str, dict[str, str]]:
    """Build the demo atlas, ingest it, and pretrain each preset briefly through `train pretrain`
    (local Ray, 2 workers, DeepSpeed ZeRO-2 on CPU); returns (tracking URI, preset -> models:/ URI)."""
    from ingest.demo import build_demo

    env = {**os.environ,  # Ray's settings: ingest and train set them themselves (localray.prepare)
           "RAY_ADDRESS": "local",  # always a fresh local Ray, never a cluster someone started on this machine
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    census = build_demo(work / "census")
    shards = work / "shards"
    subprocess.run([sys.executable, "-m", "ingest.cli", "census", "--census-uri", str(census), "--tissue", "blood",
                    "--cells-per-shard", "1000", "--num-cpus", "2", "--out", str(shards)], env=env, check=True,
                   capture_output=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    models = {}
    for preset in presets:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", preset, "--shards",
                               str(shards), "--num-workers", "2", "--cpus-per-worker", "1", "--zero-stage", "2",
                               "--epochs", str(epochs), "--max-train-cells", str(cells), "--tracking-uri", uri,
                               "--storage-path", str(work / "runs"), "--run-name", preset,
                               "--model-name", f"bench-eval-{preset}"], env=env, cwd=work, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"train pretrain --config {preset} failed ({proc.returncode})")
        models[preset] = [ln for ln in proc.stdout.splitlines() if ln.startswith("model: ")][-1].split()[1]
        print(f"{preset}: pretrained on {cells} demo-atlas cells x {epochs} epoch(s) in "
              f"{time.perf_counter() - t0:.0f}s -> {models[preset]}", flush=True)
    return uri, models


def run_suite(model: str, tracking_uri: str, out: Path, extra: list[str]) -> float:
    exe = ROOT / ".venv" / "bin" / "evaluate"
    cmd = [str(exe) if exe.exists() else "evaluate", "suite", "--model", model, "--tracking-uri", tracking_uri,
           "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"evaluate suite failed with exit code {proc.returncode}")
    return wall


def task_walls(tracking_uri: str, model: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name("scgpt-eval")
    walls: dict[str, list[float]] = {}
    flt = f"tags.model_name = '{model[len('models:/'):].split('/')[0].split('@')[0]}'" \
        if model.startswith("models:/") else ""
    for r in c.search_runs([exp.experiment_id], filter_string=flt):
        if "wall_s" in r.data.params:
            key = f"{r.data.tags['eval_task']} / {r.data.tags['eval_dataset']}"
            walls.setdefault(key, []).append(float(r.data.params["wall_s"]))
    return {k: statistics.median(v) for k, v in sorted(walls.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["debug", "small"])
    ap.add_argument("--model", action="append", default=[], help="preset=URI: use this model for the preset")
    ap.add_argument("--tracking-uri", help="where --model URIs are registered (results go to a fresh db)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-cells", type=int, default=400)
    ap.add_argument("--n-hvg", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pretrain-cells", type=int, default=0,
                    help="first pretrain each preset on this many demo-atlas cells (train pretrain); 0 = untrained")
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.md")
    args = ap.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    keep = tempfile.TemporaryDirectory(prefix="bench-eval-pretrain-")
    if args.pretrain_cells:
        args.tracking_uri, trained = pretrain([p for p in args.presets if p not in models], Path(keep.name),
                                              args.pretrain_cells, args.pretrain_epochs)
        models.update(trained)
    extra = ["--max-cells", str(args.max_cells), "--n-hvg", str(args.n_hvg), "--epochs", str(args.epochs),
             "--device", "cpu"]
    cmdline = "    .venv/bin/python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        for preset in args.presets:
            model = models.get(preset) or make_model(preset, tmp / f"model_{preset}")
            walls, tables = [], ""
            uri = args.tracking_uri if preset in models and args.tracking_uri else f"sqlite:///{tmp / f'{preset}.db'}"
            for i in range(args.repeats):
                out = tmp / f"out_{preset}_{i}"
                w = run_suite(model, uri, out, extra)
                walls.append(w)
                print(f"{preset}: evaluate suite run {i + 1}/{args.repeats}: {w:.1f}s", flush=True)
                tables = "\n\n".join(next(d.glob("scores_*.md")).read_text().strip()
                                     for d in sorted(out.iterdir()) if d.is_dir())
            desc = models.get(preset, "untrained (seed 0)")
            if args.pretrain_cells and preset in models:
                desc += f" (pretrained: {args.pretrain_cells} demo cells x {args.pretrain_epochs} epoch)"
            results[preset] = {"walls": walls, "median": statistics.median(walls), "tasks": task_walls(uri, model),
                               "tables": tables, "model": desc}
    lines = [f"## Evaluation: `evaluate suite` wall time ({dt.date.today().isoformat()})", "",
             f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
             "shared with other jobs, so absolute times are noisy.", "", "Command:", "", cmdline.rstrip(), "",
             f"Suite settings: `{' '.join(extra)}` (the CLI defaults are the paper's: all cells, 3,000/1,200 HVGs, "
             "30 epochs); every fine-tuned task also runs from random init, plus baselines.", "",
             "| preset | model | runs | median wall (s) | ratio to debug |", "|---|---|---:|---:|---:|"]
    base = results.get("debug", {}).get("median")
    for p, r in results.items():
        ratio = f"{r['median'] / base:.2f}" if base else "n/a"
        lines.append(f"| {p} | {r['model']} | {len(r['walls'])} | {r['median']:.1f} | {ratio} |")
    lines += ["", "Per task (median of the runs' `wall_s`, seconds):", "",
              "| task / dataset | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    keys = sorted({k for r in results.values() for k in r["tasks"]})
    for k in keys:
        cells = " | ".join(f"{r['tasks'].get(k, float('nan')):.1f}" for r in results.values())
        lines.append(f"| {k} | {cells} |")
    for p, r in results.items():
        lines += ["", f"### Score tables, `{p}` preset ({r['model']})", "", r["tables"]]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    keep.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
