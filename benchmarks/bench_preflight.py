"""Benchmark: the driver's work before step 1 of `train pretrain`, full verification vs the cheap pre-flight.

Before issue 13 item 4 the driver ran `ingest validate`'s full check (decode every shard, sha256
every file) and read two columns of every shard for the step count before Ray even started. Now
it checks the manifest and vocabulary hashes, completeness and file sizes, and takes the step
count from the manifest (`--verify-shards` keeps the full check). Both paths run here, in one
process, on one synthetic shard set (the test fixture's writer, pyarrow), median of --repeats.
The workers' own index (two small columns per shard, read once per worker) is the same in both.

    .venv/bin/python benchmarks/bench_preflight.py [--cells 200000] [--cells-per-shard 10000] [--repeats 3] [--e2e]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--cells-per-shard", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e", action="store_true", help="also time `train pretrain` to its first step line, with "
                    "--verify-shards and without")
    ap.add_argument("--dir", default=None, help="where to write the shard set (default: a temporary folder)")
    args = ap.parse_args()

    from ingest.validate import validate_shards
    from shardset import Manifest
    from tests.fixtures.training import write_tiny_shards
    from training import data as train_data
    from training.config import TrainConfig
    from training.launch import _schedule, check_shards

    with tempfile.TemporaryDirectory(prefix="bench-preflight-", dir=args.dir) as tmp:
        t0 = time.perf_counter()
        shards = write_tiny_shards(Path(tmp) / "shards", n_cells=args.cells, n_genes=2000,
                                   cells_per_shard=args.cells_per_shard)
        t_write = time.perf_counter() - t0
        n_bytes = sum(f.stat().st_size for f in (shards / "shards").glob("*.parquet"))
        cfg = TrainConfig()
        cfg.data.shards = str(shards)

        def old() -> None:  # what the driver did before: full validation, then an index for the step count
            validate_shards(shards)
            m = Manifest.load(shards)
            train_data.build_index(shards, m)

        def new() -> None:
            m, _ = check_shards(str(shards))
            _schedule(cfg, m)

        t_old, t_new = _time(old, args.repeats), _time(new, args.repeats)
        e2e = {k: _to_step_1(shards, Path(tmp) / k, verify) for k, verify in
               (("verify", True), ("preflight", False))} if args.e2e else {}
    n_shards = -(-args.cells // args.cells_per_shard)
    print(f"shard set: {args.cells:,} cells in {n_shards} shards, {n_bytes / 1e6:.0f} MB (written in {t_write:.0f} s); "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"driver before step 1, full verification + index (before): {t_old:.2f} s "
          f"({t_old / args.cells * 1e6:.1f} us/cell)")
    print(f"driver before step 1, cheap pre-flight (after):           {t_new:.3f} s "
          f"({t_new / n_shards * 1e3:.2f} ms/shard)")
    for k, t in e2e.items():
        how = "--verify-shards (the old driver check)" if k == "verify" else "default pre-flight"
        print(f"train pretrain start to its 'step 1/' line, {how}: {t:.0f} s")


def _to_step_1(shards: Path, work: Path, verify: bool) -> float:
    """Wall seconds from starting `train pretrain` (debug preset, 2 workers, local Ray) to its
    first step line; the run is then stopped (SIGINT)."""
    import signal
    import subprocess

    work.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MASTER_ADDR": "127.0.0.1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "training.cli", "pretrain", "--config", "debug", "--shards", str(shards),
           "--num-workers", "2", "--cpus-per-worker", "1", "--batch-size", "16", "--max-steps", "50",
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--storage-path", str(work / "runs"),
           "--no-register"] + (["--verify-shards"] if verify else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "step 1/" in line:
                return time.perf_counter() - t0
        raise RuntimeError(f"train pretrain exited {proc.wait()} before step 1")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)


if __name__ == "__main__":
    main()
