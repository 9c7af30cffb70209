"""Sharded Parquet input pipeline: a deterministic, per-epoch shuffled, rank-split batch plan.

Design (decided here, see SPEC §5):

* **Index.** Only two small columns of every shard are read up front (``soma_joinid``,
  ``n_genes``): ~12 bytes per cell, so 10M cells cost ~120 MB once per worker. Cells are split
  into train / validation with ``shardset.Manifest.split_of``, the shard set's own rule.
* **Global block shuffle.** For epoch ``e`` the shard order is a permutation seeded by
  ``(seed, e)``; consecutive groups of ``shuffle_shards`` shards form blocks whose cells are
  permuted together (seeded by ``(seed, e, block)``); the concatenation is the epoch's global
  order. A batch mixes cells of up to ``shuffle_shards`` shards, and a reader keeps that many
  decoded shards in memory. Each rank takes one contiguous slice of it
  (``np.array_split``: sizes differ by at most one), so every training cell is seen exactly once
  per epoch, and a rank reads only about ``n_shards / world`` shards (I/O scales with workers).
  The slice a rank gets, and the shards in it, change every epoch.
* **Equal step counts.** All ranks must run the same number of micro-batches or the DeepSpeed
  collectives hang. ``S = ceil(ceil(N / W) / (B * A)) * A`` micro-batches per rank per epoch
  (``A`` = gradient accumulation, so an epoch ends on an optimizer step); each rank cuts its
  slice into exactly ``S`` near-equal batches (sizes differ by at most one, never empty).
* **Length bucketing, sort-free across the epoch.** Within each window of ``bucket_window``
  consecutive batches the cells are sorted by (capped) length and re-cut with the same batch
  sizes; then the batch order inside the window is shuffled. Padding stays small, the order
  between windows stays random.
* **Resumable.** The plan depends only on (seed, epoch, rank, world, sizes), never on what was
  read, so a resumed run skips the first ``k`` batches of its epoch without reading them.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from scgpt_model.schema import BINS, GENES, N_GENES, SOMA_JOINID
from shardset import Manifest
from training.errors import TrainUsageError

log = logging.getLogger(__name__)


@dataclass
class CellIndex:
    """Flat index over a shard set's cells (one split). Arrays are aligned, shape (N,)."""

    shard_paths: list[Path]
    shard: np.ndarray  # int32 shard number
    row: np.ndarray  # int64 row inside that shard
    joinid: np.ndarray  # int64 soma_joinid
    length: np.ndarray  # int32 number of nonzero genes

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    def take(self, sel: np.ndarray) -> CellIndex:
        return CellIndex(self.shard_paths, self.shard[sel], self.row[sel], self.joinid[sel], self.length[sel])


def build_index(shards_dir: str | Path, manifest: Manifest | None = None) -> tuple[CellIndex, CellIndex]:
    """(train, validation) indexes of a shard set, split by the manifest's own rule."""
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else Manifest.load(shards_dir)
    paths, parts = [], []
    for i, entry in enumerate(manifest.shards):
        p = shards_dir / entry.path
        t = pq.read_table(p, columns=[SOMA_JOINID, N_GENES])
        jid = t.column(SOMA_JOINID).to_numpy().astype(np.int64)
        ng = t.column(N_GENES).to_numpy().astype(np.int32)
        paths.append(p)
        parts.append((np.full(len(jid), i, np.int32), np.arange(len(jid), dtype=np.int64), jid, ng))
    if not parts:
        raise TrainUsageError(f"shard set {shards_dir} lists no shards; re-run `ingest census` into it")
    shard, row, jid, ng = (np.concatenate(x) for x in zip(*parts))
    val = manifest.split_of(jid)
    full = CellIndex(paths, shard, row, jid, ng)
    return full.take(np.flatnonzero(~val)), full.take(np.flatnonzero(val))


def subsample(index: CellIndex, n: int | None, seed: int) -> CellIndex:
    """A fixed random subset of ``n`` cells (the same for every epoch), kept in index order."""
    if n is None or n >= len(index):
        return index
    sel = np.sort(np.random.default_rng([seed, 991]).permutation(len(index))[:n])
    return index.take(sel)


def epoch_order(index: CellIndex, seed: int, epoch: int, shuffle_shards: int = 8) -> np.ndarray:
    """Positions into ``index`` in the epoch's global order: permuted shards, cells permuted
    together within each block of ``shuffle_shards`` consecutive (permuted) shards."""
    if shuffle_shards < 1:
        raise TrainUsageError(f"data.shuffle_shards must be >= 1, got {shuffle_shards}")
    n_shards = len(index.shard_paths)
    shard_perm = np.random.default_rng([seed, epoch, 0]).permutation(n_shards)
    by_shard = np.argsort(index.shard, kind="stable")
    bounds = np.searchsorted(index.shard[by_shard], np.arange(n_shards + 1))
    out = []
    for blk, b0 in enumerate(range(0, n_shards, shuffle_shards)):
        members = np.concatenate([by_shard[bounds[s]:bounds[s + 1]] for s in shard_perm[b0:b0 + shuffle_shards]])
        out.append(members[np.random.default_rng([seed, epoch, 1, blk]).permutation(len(members))])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def batches_per_epoch(n_cells: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Micro-batches each rank runs per epoch (the same on every rank; a multiple of grad_accum)."""
    per_rank = math.ceil(n_cells / world)
    return math.ceil(per_rank / (batch_size * grad_accum)) * grad_accum


def rank_plan(index: CellIndex, *, seed: int, epoch: int, rank: int, world: int, batch_size: int,
              grad_accum: int = 1, bucket_window: int = 32, max_len: int | None = None,
              shuffle_shards: int = 8) -> list[np.ndarray]:
    """This rank's micro-batches for one epoch: a list of S arrays of positions into ``index``."""
    n = len(index)
    n_batches = batches_per_epoch(n, world, batch_size, grad_accum)
    mine = np.array_split(epoch_order(index, seed, epoch, shuffle_shards), world)[rank]
    if n // world < n_batches:
        raise TrainUsageError(
            f"{n} training cells cannot fill {n_batches} micro-batches on each of {world} workers; "
            "use fewer workers, a smaller --grad-accum, or more cells"
        )
    sizes = np.full(n_batches, len(mine) // n_batches)
    sizes[: len(mine) % n_batches] += 1  # np.array_split's sizes
    starts = np.concatenate([[0], np.cumsum(sizes)])
    lengths = index.length if max_len is None else np.minimum(index.length, max_len)
    plan: list[np.ndarray] = []
    for w, b0 in enumerate(range(0, n_batches, bucket_window)):
        b1 = min(b0 + bucket_window, n_batches)
        cells = mine[starts[b0]:starts[b1]]
        cells = cells[np.argsort(lengths[cells], kind="stable")]
        window = np.split(cells, np.cumsum(sizes[b0:b1])[:-1])  # same sizes, similar lengths
        order = np.random.default_rng([seed, epoch, 2, rank, w]).permutation(len(window))
        plan.extend(window[i] for i in order)
    assert len(plan) == n_batches and all(len(b) > 0 for b in plan)
    return plan


def validation_plan(index: CellIndex, *, seed: int, rank: int, world: int, batch_size: int,
                    max_cells: int) -> list[np.ndarray]:
    """A fixed validation subset split evenly over ranks (same batch count on each), length-sorted."""
    n = min(len(index), max_cells)
    n -= n % world  # equal shares: every rank runs the same number of forward passes (ZeRO-3)
    if n == 0:
        return []
    sel = np.random.default_rng([seed, 5]).permutation(len(index))[:n]
    sel = sel[np.argsort(index.length[sel], kind="stable")]
    mine = sel[rank::world]
    return [b for b in np.array_split(mine, math.ceil(len(mine) / batch_size))]


class ShardStore:
    """Reads cells' genes and bins by (shard, row), keeping a few decoded shards in memory."""

    def __init__(self, index: CellIndex, cache_shards: int = 4) -> None:
        self.index = index
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_shards = cache_shards

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if s in self.cache:
            self.cache.move_to_end(s)
            return self.cache[s]
        t = pq.read_table(self.index.shard_paths[s], columns=[GENES, BINS])
        g = t.column(GENES).combine_chunks()
        b = t.column(BINS).combine_chunks()
        # offsets (n_rows+1,), flat gene ids and bins aligned with them
        entry = (g.offsets.to_numpy().astype(np.int64), g.values.to_numpy(), b.values.to_numpy())
        self.cache[s] = entry
        if len(self.cache) > self.cache_shards:
            self.cache.popitem(last=False)
        return entry

    def cells(self, positions: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """genes (int64 arrays), bins (int64 arrays), soma_joinids for the given index positions."""
        genes, bins = [], []
        shards, rows = self.index.shard[positions], self.index.row[positions]
        for s, r in zip(shards.tolist(), rows.tolist()):
            off, g, b = self._shard(s)
            genes.append(g[off[r]:off[r + 1]].astype(np.int64))
            bins.append(b[off[r]:off[r + 1]].astype(np.int64))
        return genes, bins, self.index.joinid[positions]


@dataclass
class LoadedBatch:
    batch: object  # scgpt_model.batching.ModelBatch
    joinids: np.ndarray
    index: int  # micro-batch number inside the epoch


def iterate(plan: list[np.ndarray], store: ShardStore, collate: Callable[[list, list, int], object], *,
            start: int = 0, prefetch: int = 4) -> Iterator[LoadedBatch]:
    """Collated batches ``plan[start:]`` in order, produced ahead by a background thread.

    ``collate(genes, bins, batch_number)`` must be deterministic in its arguments (it seeds
    masking from the batch number), so a resumed epoch yields the same batches.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def produce() -> None:
        try:
            for i in range(start, len(plan)):
                genes, bins, jid = store.cells(plan[i])
                item = LoadedBatch(collate(genes, bins, i), jid, i)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # surface reader errors in the training thread
            q.put(e)

    th = threading.Thread(target=produce, daemon=True, name="batch-prefetch")
    th.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def write_seen(path: Path, epoch: int, rank: int, joinids: list[np.ndarray]) -> None:
    """Audit log: the soma_joinids this rank trained on in this epoch (one JSON file)."""
    path.mkdir(parents=True, exist_ok=True)
    ids = np.concatenate(joinids).tolist() if joinids else []
    (path / f"epoch{epoch:03d}-rank{rank:03d}.json").write_text(json.dumps(ids))


def preflight(shards_dir: str | Path, manifest: Manifest) -> None:
    """The cheap checks ``train`` runs before step 1 (and on every ``--resume``): the shard set is
    complete and every shard the manifest lists is there with the size it recorded.

    Nothing is decoded or hashed: at Census scale that means reading the whole data set on the
    driver before the first step. The manifest's own hash is checked when it is loaded and the
    vocabulary's against it by the caller; checksums and the data contract are ``ingest validate``
    (or ``train pretrain --verify-shards``). Raises TrainUsageError listing every problem.
    """
    shards_dir = Path(shards_dir)
    if not manifest.complete or len(manifest.shards) != manifest.n_shards_planned:
        raise TrainUsageError(
            f"--shards {shards_dir}: the shard set is incomplete ({len(manifest.shards)} of "
            f"{manifest.n_shards_planned} shards; an ingest was interrupted): re-run the same `ingest census` "
            "command to finish it, then train")
    errs = []
    for entry in manifest.shards:
        f = shards_dir / entry.path
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            errs.append(f"{entry.path}: missing")
            continue
        if size != entry.n_bytes:
            errs.append(f"{entry.path}: {size} bytes, the manifest says {entry.n_bytes}")
    if errs:
        shown = errs[:10] + ([f"... and {len(errs) - 10} more"] if len(errs) > 10 else [])
        raise TrainUsageError(
            f"--shards {shards_dir}: {len(errs)} shard file(s) differ from the manifest (changed or removed after "
            "ingest):\n  - " + "\n  - ".join(shown) + "\nRe-ingest into a fresh --out folder (`ingest validate "
            f"{shards_dir}` lists every problem)")
