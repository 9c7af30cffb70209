"""The sharded input pipeline: exactly-once per epoch, equal step counts, reshuffling, bucketing, resume."""

from __future__ import annotations

import numpy as np
import pytest

from training import data as train_data
from training.config import debug
from training.errors import TrainUsageError
from training.worker import make_collate


@pytest.fixture(scope="module")
def index(tiny_shards):
    train, val = train_data.build_index(tiny_shards)
    return train, val


def synthetic_index(n: int, n_shards: int, seed: int = 0) -> train_data.CellIndex:
    rng = np.random.default_rng(seed)
    shard = np.sort(rng.integers(0, n_shards, n)).astype(np.int32)
    shard[:n_shards] = np.arange(n_shards)  # every shard non-empty
    shard = np.sort(shard)
    row = np.concatenate([np.arange((shard == s).sum()) for s in range(n_shards)])
    return train_data.CellIndex([f"s{i}" for i in range(n_shards)], shard, row, np.arange(n, dtype=np.int64) * 3 + 11,
                       rng.integers(5, 3000, n).astype(np.int32))


def test_split_follows_the_manifest_function(tiny_shards, index):
    from shardset import Manifest

    train, val = index
    m = Manifest.load(tiny_shards)
    assert len(train) + len(val) == m.totals.cells
    assert not m.split_of(train.joinid).any()
    assert m.split_of(val.joinid).all()
    assert len(val) == sum(s.n_val for s in m.shards) == m.totals.n_val


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,batch,accum", [(1000, 16, 1), (997, 7, 3), (50, 4, 2)])
def test_exactly_once_per_epoch_with_equal_step_counts(world, n, batch, accum):
    idx = synthetic_index(n, n_shards=7)
    orders = []
    for epoch in range(3):
        plans = [train_data.rank_plan(idx, seed=3, epoch=epoch, rank=r, world=world, batch_size=batch, grad_accum=accum,
                             bucket_window=5) for r in range(world)]
        lengths = {len(p) for p in plans}
        assert len(lengths) == 1, "every rank must run the same number of micro-batches"
        assert lengths.pop() % accum == 0, "an epoch ends on an optimizer step"
        assert all(0 < len(b) <= batch for p in plans for b in p)
        seen = np.concatenate([idx.joinid[b] for p in plans for b in p])
        assert np.array_equal(np.sort(seen), np.sort(idx.joinid)), "each training cell exactly once"
        per_rank = [set(idx.joinid[np.concatenate(p)].tolist()) for p in plans]
        assert sum(len(s) for s in per_rank) == n  # disjoint shares
        orders.append(np.concatenate([idx.joinid[b] for b in plans[0]]))
    assert not np.array_equal(orders[0], orders[1]), "the shuffle changes every epoch"


def test_real_shards_exactly_once_for_2_and_3_workers(index):
    train, _ = index
    for world in (2, 3):
        plans = [train_data.rank_plan(train, seed=0, epoch=1, rank=r, world=world, batch_size=8) for r in range(world)]
        seen = np.concatenate([train.joinid[b] for p in plans for b in p])
        assert np.array_equal(np.sort(seen), np.sort(train.joinid))


def test_plan_is_deterministic_and_resume_skips_without_reading(index):
    train, _ = index
    kw = dict(seed=5, epoch=2, rank=1, world=2, batch_size=8, bucket_window=4)
    a, b = train_data.rank_plan(train, **kw), train_data.rank_plan(train, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    cfg = debug()
    from scgpt_model.presets import get_preset

    mcfg = get_preset("debug", 400)
    collate = make_collate(cfg, mcfg, epoch=2, rank=1)
    store = train_data.ShardStore(train)
    full = list(train_data.iterate(a, store, collate))
    resumed = list(train_data.iterate(a, train_data.ShardStore(train), collate, start=3))
    assert [x.index for x in resumed] == list(range(3, len(a)))
    for x, y in zip(full[3:], resumed):
        assert np.array_equal(x.joinids, y.joinids)
        assert np.array_equal(x.batch.genes.numpy(), y.batch.genes.numpy())
        assert np.array_equal(x.batch.unknown.numpy(), y.batch.unknown.numpy())


def test_cells_read_back_match_the_shards(tiny_shards, index):
    import pyarrow.parquet as pq

    train, _ = index
    pos = np.array([0, 5, len(train) - 1])
    genes, bins, jid = train_data.ShardStore(train).cells(pos)
    for g, b, j, p in zip(genes, bins, jid, pos):
        t = pq.read_table(train.shard_paths[train.shard[p]]).to_pydict()
        r = int(train.row[p])
        assert t["soma_joinid"][r] == j
        assert g.tolist() == t["genes"][r] and b.tolist() == t["bins"][r]


def test_bucketing_keeps_padding_small():
    # Census-like lengths (lognormal around 1,500 genes) capped at max_seq_len 1200: padding of
    # the padded batches, measured as 1 - real / (batch x longest), per batch.
    rng = np.random.default_rng(0)
    n = 20000
    idx = synthetic_index(n, 10)
    idx.length[:] = np.clip(rng.lognormal(np.log(1500), 0.6, n), 200, 8000).astype(np.int32)
    cap = 1200
    plan = train_data.rank_plan(idx, seed=0, epoch=0, rank=0, world=1, batch_size=32, bucket_window=32, max_len=cap)
    lens = [np.minimum(idx.length[b], cap) for b in plan]
    pad = 1 - sum(x.sum() for x in lens) / sum(len(x) * x.max() for x in lens)
    unbucketed = train_data.rank_plan(idx, seed=0, epoch=0, rank=0, world=1, batch_size=32, bucket_window=1,
                                      max_len=cap)
    lens_u = [np.minimum(idx.length[b], cap) for b in unbucketed]
    pad_u = 1 - sum(x.sum() for x in lens_u) / sum(len(x) * x.max() for x in lens_u)
    assert pad <= 0.10 < pad_u


def test_validation_plan_is_even_across_ranks(index):
    _, val = index
    plans = [train_data.validation_plan(val, seed=0, rank=r, world=3, batch_size=4, max_cells=1000) for r in range(3)]
    assert len({len(p) for p in plans}) == 1
    ids = np.concatenate([val.joinid[b] for p in plans for b in p])
    assert len(ids) == len(set(ids.tolist())) == len(val) - len(val) % 3


def test_too_few_cells_for_the_workers_is_a_usage_error():
    idx = synthetic_index(5, 2)
    with pytest.raises(TrainUsageError, match="fewer workers"):
        train_data.rank_plan(idx, seed=0, epoch=0, rank=0, world=4, batch_size=1, grad_accum=2)


def test_block_shuffle_mixes_shards_within_a_batch():
    """Cells of a block of shards are permuted together: batches are not single-shard (dataset) runs."""
    idx = synthetic_index(4000, 10, seed=1)
    order = train_data.epoch_order(idx, seed=0, epoch=0, shuffle_shards=5)
    assert np.array_equal(np.sort(order), np.arange(len(idx)))
    # the first 32 cells of the epoch are drawn from the (5 shards of the) first block, not from one shard
    assert len(set(idx.shard[order[:32]].tolist())) >= 4
    plan = train_data.rank_plan(idx, seed=0, epoch=0, rank=0, world=1, batch_size=32, shuffle_shards=5)
    shards_per_batch = [len(set(idx.shard[b].tolist())) for b in plan]
    assert np.median(shards_per_batch) >= 4
    # one shard per block reproduces a shard-local shuffle: every batch then stays within few shards
    local = train_data.rank_plan(idx, seed=0, epoch=0, rank=0, world=1, batch_size=32, shuffle_shards=1,
                                 bucket_window=1)
    assert max(len(set(idx.shard[b].tolist())) for b in local) <= 2
    with pytest.raises(TrainUsageError):
        train_data.epoch_order(idx, seed=0, epoch=0, shuffle_shards=0)
