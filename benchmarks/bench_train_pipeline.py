"""Input pipeline against the model: can the shard reader feed a `small` training step 5x over?

Same batch shapes for both: rank 0 of 2 workers, the `small` preset's batch size and
max_seq_len, length bucketing on. Pipeline = plan + Parquet read + known/unknown split +
padding (``training.data.iterate`` with the trainer's collate, one background thread), measured
by draining it. Step = forward + backward + AdamW step of the `small` model on those batches,
one process, all CPU threads. Writes a section to benchmarks/results/training.md.

    .venv/bin/python benchmarks/bench_train_pipeline.py --shards demo_out/shards_blood
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_common import ensure_demo_shards, write_section  # noqa: E402
from training import data as D  # noqa: E402
from training.config import small  # noqa: E402
from training.worker import make_collate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=None, help="shard set (default: build the demo atlas shards in /tmp)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--step-batches", type=int, default=8)
    args = ap.parse_args()
    shards = Path(args.shards) if args.shards else ensure_demo_shards()
    from scgpt_model.model import ScGPT
    from scgpt_model.presets import get_preset
    from scgpt_model.vocab import GeneVocab

    cfg = small()
    vocab = GeneVocab.load(shards / "vocab.json")
    mcfg = get_preset("small", len(vocab))
    train, _ = D.build_index(shards)
    plan = D.rank_plan(train, seed=0, epoch=0, rank=0, world=2, batch_size=cfg.data.batch_size,
                       bucket_window=cfg.data.bucket_window, max_len=mcfg.max_seq_len)[: args.batches]
    collate = make_collate(cfg, mcfg, epoch=0, rank=0)

    # pipeline: drain it (includes the first shard reads)
    t0 = time.perf_counter()
    batches = list(D.iterate(plan, D.ShardStore(train), collate, prefetch=cfg.data.prefetch_batches))
    t_pipe = time.perf_counter() - t0
    cells = sum(b.batch.n_cells for b in batches)
    tokens = sum(b.batch.n_tokens for b in batches)
    slots = sum(b.batch.genes.numel() for b in batches)
    pipe_cps, pipe_tps, pad = cells / t_pipe, tokens / t_pipe, 1 - tokens / slots

    # model step on the same batches
    torch.manual_seed(0)
    model = ScGPT(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    times, step_cells, step_tokens = [], 0, 0
    for i, lb in enumerate(batches[: args.step_batches + 1]):
        t0 = time.perf_counter()
        out = model(lb.batch)
        out.loss.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i > 0:  # first step is warm-up (allocator, kernels)
            times.append(dt)
            step_cells += lb.batch.n_cells
            step_tokens += lb.batch.n_tokens
    step_cps, step_tps = step_cells / sum(times), step_tokens / sum(times)
    ratio = pipe_cps / step_cps
    # padding of the same bucketing at the `base` preset's 1,200 genes per cell (fewer cells are
    # capped there, so lengths vary more): from the plan's lengths, no model needed
    base_pad = {}
    for window in (cfg.data.bucket_window, 1):
        bp = D.rank_plan(train, seed=0, epoch=0, rank=0, world=2, batch_size=32, bucket_window=window, max_len=1200)
        lens = [np.minimum(train.length[b], 1200) + 1 for b in bp]
        base_pad[window] = 1 - sum(x.sum() for x in lens) / sum(len(x) * x.max() for x in lens)
    lines = [
        f"Shards: `{shards}` ({len(train)} training cells); preset `small` (d_model {mcfg.d_model}, "
        f"{mcfg.n_layers} layers, max_seq_len {mcfg.max_seq_len}), batch {cfg.data.batch_size}, "
        f"bucket window {cfg.data.bucket_window}, rank 0 of 2.",
        "",
        "| | cells/s | tokens/s |",
        "|---|---:|---:|",
        f"| input pipeline (1 reader thread, {len(batches)} batches) | {pipe_cps:,.0f} | {pipe_tps:,.0f} |",
        f"| `small` training step (fwd+bwd+AdamW, {len(times)} batches, median {statistics.median(times)*1e3:.0f} ms) "
        f"| {step_cps:,.1f} | {step_tps:,.0f} |",
        "",
        f"Pipeline / step = **{ratio:.0f}x** (target >= 5x); padding fraction of the bucketed batches = "
        f"**{pad:.1%}** (target <= 10%).",
        "At `base`'s max_seq_len 1200 on the same cells (lengths from the plan): "
        f"padding {base_pad[cfg.data.bucket_window]:.1%} "
        f"with bucketing, {base_pad[1]:.1%} without (bucket window 1).",
    ]
    print("\n".join(lines))
    write_section("Input pipeline vs `small` training step",
                  "python benchmarks/bench_train_pipeline.py" + (f" --shards {args.shards}" if args.shards else ""),
                  lines)


if __name__ == "__main__":
    main()
