"""ZeRO stages 1, 2 and 3 (2 gloo ranks, real DeepSpeed on CPU): same first-step loss, same weights after 3 steps.

Runs ``build_engine`` (the one DeepSpeed entry point) on the debug model with real batches from
the shard pipeline; the weights are compared after the consolidation the registry uses
(``zero_to_fp32`` on a saved checkpoint), so the export path is checked for every stage too.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

STAGES = (1, 2, 3)
STEPS = 3
# The stage-agreement tolerance (1e-5) is about reduction order, not init: the small GPT-2 style init
# keeps weights (and so float rounding) at the scale this tolerance was set for.
INIT_STD = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, shards: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from scgpt_model.presets import get_preset
    from scgpt_model.model import ScGPT
    from training import data as train_data
    from training.config import debug
    from training.parallelize import build_engine
    from training.registry import consolidated_state_dict
    from training.worker import DS_TAG, make_collate

    dist.init_process_group("gloo", rank=rank, world_size=world)
    train, _ = train_data.build_index(shards)
    vocab_size = json.loads((Path(shards) / "vocab.json").read_text())["tokens"].__len__()
    results = {}
    for stage in STAGES:
        cfg = debug()
        cfg.deepspeed.zero_stage = stage
        cfg.data.batch_size = 8
        cfg.optim.grad_accum = 2  # 2 micro-batches per optimizer step: checks accumulation too
        cfg.optim.lr = 1e-2
        mcfg = get_preset("debug", vocab_size, init_std=INIT_STD)
        torch.manual_seed(0)
        engine = build_engine(ScGPT(mcfg), cfg, total_steps=STEPS, on_gpu=False)
        plan = train_data.rank_plan(train, seed=0, epoch=0, rank=rank, world=world, batch_size=8, grad_accum=2)
        collate = make_collate(cfg, mcfg, epoch=0, rank=rank)
        losses = []
        for lb in train_data.iterate(plan[: STEPS * 2], train_data.ShardStore(train), collate):
            total, _ = engine(lb.batch)
            engine.backward(total)
            engine.step()
            t = total.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / world)
        assert engine.global_steps == STEPS, engine.global_steps  # optimizer stepped once per 2 micro-batches
        ck = Path(out_dir) / f"stage{stage}"
        engine.save_checkpoint(str(ck), tag=DS_TAG)
        dist.barrier()
        if rank == 0:
            sd = consolidated_state_dict(ck)
            torch.save(sd, Path(out_dir) / f"weights{stage}.pt")
            results[stage] = losses
        dist.barrier()
    if rank == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_zero_stages_agree(tiny_shards, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_shards), str(tmp_path)), nprocs=2, join=True)
    losses = {int(k): v for k, v in json.loads((tmp_path / "losses.json").read_text()).items()}
    first = {s: losses[s][0] for s in STAGES}
    assert first[1] == pytest.approx(first[2], rel=1e-6) and first[1] == pytest.approx(first[3], rel=1e-6)
    assert losses[1][-1] != losses[1][0]  # training moved
    w = {s: torch.load(tmp_path / f"weights{s}.pt") for s in STAGES}
    assert set(w[1]) == set(w[2]) == set(w[3])
    init = {}
    from scgpt_model.model import ScGPT
    from scgpt_model.presets import get_preset

    vocab_size = len(json.loads((tiny_shards / "vocab.json").read_text())["tokens"])
    torch.manual_seed(0)
    init = ScGPT(get_preset("debug", vocab_size, init_std=INIT_STD)).state_dict()
    moved = 0
    for k in w[1]:
        torch.testing.assert_close(w[2][k], w[1][k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w[3][k], w[1][k], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(w[1][k], init[k]))
    assert moved > len(w[1]) // 2  # most tensors changed: the comparison is not of untouched weights
