"""`ingest census`: query -> chunks of soma_joinids -> Ray tasks -> shards + manifest, resumable.

Named steps (as the Census builder does): plan (query, vocabulary, chunk list) -> prepare the
output (lock, refuse other arguments, verify finished shards) -> run the missing chunks as Ray
tasks, rewriting the manifest after each -> summary. A kill loses only the chunks in flight.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ingest.errors import DiskFull, IngestError, is_disk_full
from ingest.query import (
    IngestConfig,
    build_filter,
    dataset_refs,
    experiment_of,
    open_census,
    pin_release,
    query_joinids,
    source_of,
    store_identity,
    var_table,
)
from ingest.worker import WORKER_ENV, process_chunk
from scgpt_model.schema import SHARD_SCHEMA
from scgpt_model.vocab import GeneVocab, VocabError
from shardset import (
    MANIFEST_FILE,
    VOCAB_FILE,
    DatasetRef,
    Manifest,
    ManifestError,
    ShardEntry,
    Totals,
    atomic_write_bytes,
    sha256_file,
    split_uniform,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class IngestPlan:
    source: dict
    value_filter: str
    joinids: np.ndarray          # (n,) sorted soma_joinids to ingest
    n_matched: int               # before --max-cells
    vocab: GeneVocab
    var_to_vocab: np.ndarray     # (max var joinid + 1,) int32, -1 = gene not in vocabulary
    merge_duplicates: bool
    genes_dropped: int
    genes_dropped_examples: list[str]
    args: dict                   # the fingerprint a re-run must match
    datasets: list[DatasetRef]   # the source datasets of the planned cells (what a model will have seen)


def project_version() -> str:
    try:
        return metadata.version("scgpt-census")
    except metadata.PackageNotFoundError:
        return "unknown"


def _load_vocab(cfg: IngestConfig) -> GeneVocab | None:
    if not cfg.vocab:
        return None
    try:
        vocab = GeneVocab.load(cfg.vocab)
    except VocabError as e:
        raise IngestError(f"--vocab {cfg.vocab}: {e}") from e
    if cfg.gene_key and cfg.gene_key != vocab.key:
        raise IngestError(f"--gene-key {cfg.gene_key} contradicts --vocab {cfg.vocab}, which is keyed by "
                          f"{vocab.key}; drop --gene-key or pass --gene-key {vocab.key}")
    return vocab


def sample_joinids(joinids: np.ndarray, max_cells: int, seed: int) -> np.ndarray:
    """A seeded sample of ``max_cells`` joinids (the same sample for the same query and seed)."""
    score = split_uniform(joinids, seed + 7919)  # a different stream from the split itself
    return np.sort(joinids[np.argsort(score, kind="stable")[:max_cells]])


def plan(cfg: IngestConfig) -> IngestPlan:
    cfg.check()
    vocab = _load_vocab(cfg)
    gene_key = vocab.key if vocab else (cfg.gene_key or "feature_id")
    source = source_of(cfg)
    where = f"--census-uri {cfg.census_uri}" if cfg.census_uri else f"Census {cfg.census_version}"
    with open_census(source) as census:
        exp = experiment_of(census, cfg.organism, where)
        value_filter = build_filter(cfg, exp)
        joinids = query_joinids(exp, value_filter)
        source = {**pin_release(source, census), **store_identity(census)}
        var = var_table(exp)
        if joinids.size == 0:
            raise IngestError(f"the query matched no cells (filter: {value_filter or 'none'}). Loosen it: check "
                              "--tissue/--disease/--assay/--obs-filter/--min-genes, or add --include-non-primary")
        n_matched = int(joinids.size)
        if cfg.max_cells is not None and cfg.max_cells < joinids.size:
            joinids = sample_joinids(joinids, cfg.max_cells, cfg.seed)
        datasets = [DatasetRef(**d) for d in dataset_refs(census, exp, joinids)]
    keys = [str(k) for k in var.column(gene_key).to_pylist()]
    var_ids = var.column("soma_joinid").to_numpy()
    if vocab is None:
        order = np.argsort(var_ids)
        vocab = GeneVocab.from_genes([keys[i] for i in order], key=gene_key)
    var_to_vocab = np.full(int(var_ids.max()) + 1, -1, dtype=np.int32)
    var_to_vocab[var_ids] = vocab.encode(keys)
    mapped = var_to_vocab[var_to_vocab >= 0]
    if mapped.size == 0:
        raise IngestError(f"no gene of the store is in the vocabulary (matched by {gene_key}); pass a vocabulary "
                          f"keyed like the store, or --gene-key {'feature_name' if gene_key == 'feature_id' else 'feature_id'}")
    dropped = [keys[i] for i in np.flatnonzero(vocab.encode(keys) < 0)]
    if dropped:
        log.warning("%d of %d store genes are not in the vocabulary and are dropped (e.g. %s)", len(dropped),
                    len(keys), ", ".join(dropped[:5]))
    args = {
        "source": source, "organism": cfg.organism, "obs_filter": value_filter, "vocab_hash": vocab.hash(),
        "gene_key": gene_key, "n_bins": cfg.n_bins, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
        "cells_per_shard": cfg.cells_per_shard, "max_cells": cfg.max_cells, "min_genes": cfg.min_genes,
        "n_cells_planned": int(joinids.size),
        "joinids_sha256": hashlib.sha256(joinids.tobytes()).hexdigest(),
    }
    return IngestPlan(source, value_filter, joinids, n_matched, vocab, var_to_vocab,
                bool(np.unique(mapped).size != mapped.size), len(dropped), dropped[:10], args, datasets)


# ---- output directory --------------------------------------------------------------------
class OutputDir:
    """Owns ``--out`` for one run: the lock, the refusal rules, stale temp files, verified shards."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.created = not self.path.exists()
        self._lock_fd: int | None = None

    def open(self, args: dict) -> dict[int, ShardEntry]:
        p = self.path
        if p.exists() and not p.is_dir():
            raise IngestError(f"--out {p} is a file; give a directory path")
        previous = None
        if (p / MANIFEST_FILE).exists():
            try:
                previous = Manifest.load(p)
            except ManifestError as e:
                raise IngestError(f"--out {p}: {e}") from None
            if previous.args != args:
                diff = sorted(k for k in set(args) | set(previous.args) if args.get(k) != previous.args.get(k))
                raise IngestError(f"--out {p} holds shards from other arguments (differs in: {', '.join(diff)}); "
                                  "re-run with the same arguments to resume, or choose a new --out (or delete it)")
        elif p.exists() and any(p.iterdir()):
            raise IngestError(f"--out {p} exists, is not empty and is not a shard set; choose a new --out")
        (p / "shards").mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(p / ".lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestError(f"another `ingest census` is writing into --out {p}; wait for it or choose another --out")
        self.remove_temp_files()
        done: dict[int, ShardEntry] = {}
        for s in previous.shards if previous else []:
            f = p / s.path
            if f.exists() and f.stat().st_size == s.n_bytes and sha256_file(f) == s.sha256:
                done[s.index] = s
            else:
                log.warning("shard %s is missing or does not match the manifest; it will be rewritten", s.path)
        return done

    def remove_temp_files(self) -> None:
        for pattern in ("shards/.part-*.tmp-*", ".*.tmp-*", "*.json.tmp"):
            for f in self.path.glob(pattern):
                f.unlink(missing_ok=True)

    def close(self, *, discard: bool = False) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if discard and self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.exists():
            self.remove_temp_files()


# per-shard worker results that are for the debug log only, not for the manifest
DEBUG_KEYS = ("stages", "pid", "rss_mb", "t_start")


def _manifest(p: IngestPlan, cfg: IngestConfig, shards: dict[int, ShardEntry], complete: bool) -> Manifest:
    entries = [shards[i] for i in sorted(shards)]
    return Manifest(
        project_version=project_version(), source=p.source, organism=cfg.organism, obs_filter=p.value_filter,
        vocab_hash=p.vocab.hash(), vocab_size=len(p.vocab), gene_key=p.vocab.key, n_bins=cfg.n_bins, seed=cfg.seed,
        val_fraction=cfg.val_fraction, columns=list(SHARD_SCHEMA.names), args=p.args,
        n_shards_planned=int(-(-p.joinids.size // cfg.cells_per_shard)), complete=complete,
        totals=Totals.of(entries, cells_matched=p.n_matched, cells_planned=int(p.joinids.size),
                         genes_in_vocab=len(p.vocab.genes), genes_dropped=p.genes_dropped,
                         genes_dropped_examples=p.genes_dropped_examples),
        shards=entries, datasets=p.datasets)


def _init_ray(cfg: IngestConfig) -> bool:
    """Start a local Ray (loopback only) unless one is running or --ray-address is given."""
    import ray

    from localray import connect, start_local

    if ray.is_initialized():
        return False
    if cfg.ray_address:
        connect(cfg.ray_address, worker_env=WORKER_ENV, logging_level=logging.WARNING)
    else:
        start_local(num_cpus=cfg.num_cpus or os.cpu_count(), worker_env=WORKER_ENV, configure_logging=False)
    return True


def _chunk_task(spec: dict, var_to_vocab: np.ndarray) -> dict:
    return process_chunk({**spec, "var_to_vocab": var_to_vocab})


def run_ingest(cfg: IngestConfig) -> Manifest:
    """Run (or resume) an ingest; returns the final manifest."""
    t_start = time.perf_counter()
    p = plan(cfg)
    t_plan = time.perf_counter() - t_start
    t_ray = t_chunks = 0.0
    out = OutputDir(cfg.out)
    shards = out.open(p.args)
    usage_error = False
    started_ray = False
    try:
        vocab_bytes = json.dumps(p.vocab.to_json()).encode()
        vocab_file = out.path / VOCAB_FILE
        if not vocab_file.exists() or vocab_file.read_bytes() != vocab_bytes:  # a resume leaves it untouched
            atomic_write_bytes(vocab_file, vocab_bytes)
        chunks = [p.joinids[i:i + cfg.cells_per_shard] for i in range(0, p.joinids.size, cfg.cells_per_shard)]
        todo = [i for i in range(len(chunks)) if i not in shards]
        manifest = _manifest(p, cfg, shards, complete=not todo)
        manifest.write(out.path)
        n_skip = sum(len(chunks[i]) for i in shards)
        log.info("ingest: %d cells matched, %d to ingest in %d shards (%d already done, resuming) -> %s",
                 p.n_matched, p.joinids.size, len(chunks), len(shards), out.path)
        if todo:
            t0 = time.perf_counter()
            started_ray = _init_ray(cfg)
            t_ray = time.perf_counter() - t0
            _run_chunks(cfg, p, out.path, chunks, todo, shards, n_skip)
            t_chunks = time.perf_counter() - t0 - t_ray
        manifest = _manifest(p, cfg, shards, complete=True)
        manifest_hash = manifest.write(out.path)
    except DiskFull:
        raise  # the finished shards stay: the same command resumes once there is space
    except IngestError:
        usage_error = True  # bad input found by a worker (e.g. non-integer counts)
        raise
    except OSError as e:
        if is_disk_full(e):  # the driver's own writes (manifest, vocabulary)
            raise DiskFull.at(getattr(e, "filename", None) or out.path, out.path) from None
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()  # kills workers still writing, before temp files are removed below
        out.close(discard=usage_error)
    t = manifest.totals
    dt = time.perf_counter() - t_start
    log.info("ingest done: %d cells in %d shards (%d train / %d val), %d nonzeros, %d cells below --min-genes, "
             "%d store genes not in vocab; %.1fs (%.0f cells/s); manifest %s", t.cells, len(manifest.shards),
             t.n_train, t.n_val, t.nonzeros, t.cells_dropped_min_genes, t.genes_dropped, dt,
             t.cells / max(dt, 1e-9), manifest_hash[:16])
    n_new = sum(len(chunks[i]) for i in todo)
    log.info("ingest timing: plan %.2fs, ray start %.2fs, chunks %.2fs (%.0f cells/s over %d new cells)", t_plan,
             t_ray, t_chunks, n_new / max(t_chunks, 1e-9), n_new)
    return manifest


def _run_chunks(cfg: IngestConfig, p: IngestPlan, out: Path, chunks: list[np.ndarray], todo: list[int],
                shards: dict[int, dict], n_skip: int) -> None:
    import ray

    task = ray.remote(num_cpus=1, max_retries=1)(_chunk_task)
    var_ref = ray.put(p.var_to_vocab)
    base = {"source": p.source, "organism": cfg.organism, "out": str(out.resolve()), "n_bins": cfg.n_bins,
            "seed": cfg.seed, "val_fraction": cfg.val_fraction, "min_genes": cfg.min_genes,
            "run_token": uuid.uuid4().hex,  # workers keep the store open for the chunks of this run only
            "merge_duplicates": p.merge_duplicates}
    max_inflight = max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    pending = list(todo)
    inflight: dict = {}
    total, done_cells = int(p.joinids.size), 0
    t0 = last = time.perf_counter()
    try:
        while pending or inflight:
            while pending and len(inflight) < max_inflight:
                i = pending.pop(0)
                ref = task.remote({**base, "index": i, "joinids": chunks[i]}, var_ref)
                inflight[ref] = i
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                i = inflight.pop(ref)
                _record(_result(ref), i, shards, t0)
                done_cells += len(chunks[i])
                _manifest(p, cfg, shards, complete=False).write(out)
                now = time.perf_counter()
                if now - last >= cfg.progress_every_s or not (pending or inflight):
                    rate = done_cells / max(now - t0, 1e-9)
                    left = total - n_skip - done_cells
                    log.info("ingest: %d/%d cells (%.0f%%), %d/%d shards, %.0f cells/s, ETA %.0fs",
                             n_skip + done_cells, total, 100.0 * (n_skip + done_cells) / total, len(shards),
                             len(chunks), rate, left / max(rate, 1e-9))
                    last = now
    except BaseException:  # a signal, a worker's error: let the shards being written finish first
        if _drain(inflight, shards, cfg.stop_grace_s, t0):
            try:
                _manifest(p, cfg, shards, complete=False).write(out)
            except OSError:  # a full disk: the manifest on disk still lists every shard it had
                pass
        raise


def _record(res: dict, i: int, shards: dict[int, dict], t0: float) -> None:
    """Add the finished shard ``i`` (a task's result) to ``shards``; ``t0``: the chunk phase's start."""
    shards[i] = ShardEntry.from_dict({k: v for k, v in res.items() if k not in DEBUG_KEYS}, where=f"shard {i}")
    if log.isEnabledFor(logging.DEBUG):
        stages = res.get("stages", {})
        log.debug("shard %d: %d cells, pid %s (RSS %.0f MB), started %.2fs into the chunk phase; wall/CPU s: %s, "
                  "total %.2f/%.2f", i, res["n_rows"], res.get("pid"), res.get("rss_mb", float("nan")),
                  res.get("t_start", t0) - t0,
                  " ".join(f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in stages.items()),
                  sum(w for w, _ in stages.values()), sum(c for _, c in stages.values()))


def _result(ref):
    """A finished task's result; the task's IngestError (DiskFull included) as itself, not wrapped."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, IngestError):  # one message, not the worker's traceback
            raise type(cause)(str(cause)) from None
        raise


def _drain(inflight: dict, shards: dict[int, dict], grace_s: float, t0: float) -> int:
    """On the way out, wait up to ``grace_s`` for the tasks in flight and keep the shards they finish
    (returns how many).

    Only what is still running after that is cancelled: ``ray.cancel`` racing a task that is just
    finishing trips a RAY_CHECK in the driver's core worker ("Tried to complete task that was not
    pending", ray-project/ray#54798), which kills the process instead of letting it stop cleanly.
    """
    import ray

    if not inflight:
        return 0
    log.info("stopping: waiting up to %.0fs for the %d shard task(s) in flight", grace_s, len(inflight))
    done, left = ray.wait(list(inflight), num_returns=len(inflight), timeout=grace_s, fetch_local=True)
    kept = 0
    for ref in done:
        try:
            _record(_result(ref), inflight[ref], shards, t0)
            kept += 1
        except Exception:  # noqa: BLE001 - the error that stops the run is already on its way out
            pass
    for ref in left:
        ray.cancel(ref, force=True)
    return kept
