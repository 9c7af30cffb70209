"""SIGINT / SIGTERM of `train pretrain` and `ingest census`, and the rendezvous of a local run.

Each case is the real command in a subprocess (its own local Ray), signalled once it is working
(after the first step line; after the first finished shard). It must exit 128 + the signal with
one line saying what was kept and how to continue, mark the MLflow run KILLED, and leave none of
its Ray processes behind. While the training run is going, every TCP socket its process tree
listens on must be bound to loopback (the torch.distributed TCPStore included).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.fixtures.ingest import ingest_env
from tests.fixtures.training import FIXTURE_ARGS

REPO = Path(__file__).resolve().parents[1]


def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (::ffff:127.0.0.1, what a dual-stack gRPC server shows)."""
    a = ipaddress.ip_address(ip.split("%")[0])
    return bool(a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback))


@dataclass
class Stopped:
    code: int
    output: str
    descendants: dict[int, str]  # pid -> name, everything the command started while it ran
    listening: set[tuple[str, int, str]] = field(default_factory=set)  # (ip, port, process name)
    signalled_at: int = 0  # length of the output when the signal was sent

    @property
    def after_signal(self) -> str:
        """What the command printed once signalled (Ray may log warnings with tracebacks while it
        starts on a loaded machine: those are not the stop's)."""
        return self.output[self.signalled_at:]


def _tree(pid: int) -> dict[int, str]:
    try:
        return {p.pid: p.name() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def _listening(pids: set[int]) -> set[tuple[str, int, str]]:
    out = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            out.add((c.laddr.ip, c.laddr.port, name))
    return out


def _run_and_signal(args: list[str], cwd: Path, sig: int, ready, *, log_file: Path, timeout: float = 600,
                    watch_sockets: bool = False) -> Stopped:
    """Start ``args`` in its own session, wait until ``ready(output_so_far)``, send ``sig`` (SIGINT to
    the process group, as a terminal's Ctrl-C does; SIGTERM to the command alone), wait for the exit."""
    log = open(log_file, "w")
    proc = subprocess.Popen(args, cwd=cwd, env=ingest_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: dict[int, str] = {}
    listening: set = set()
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            seen.update(_tree(proc.pid))
            if ready(log_file.read_text()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the command ended before the signal:\n{log_file.read_text()[-3000:]}"
        assert ready(log_file.read_text()), f"not ready in time:\n{log_file.read_text()[-3000:]}"
        seen.update(_tree(proc.pid))
        if watch_sockets:
            listening = _listening(set(seen) | {proc.pid})
        at = len(log_file.read_text())
        if sig == signal.SIGINT:  # Ctrl-C in a terminal: the whole foreground process group gets it
            os.killpg(proc.pid, sig)
        else:  # `kill PID`, a scheduler's stop: the command alone
            proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # it hung: do not leave it behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()
    return Stopped(proc.returncode, log_file.read_text(), seen, listening, at)


def _left_behind(descendants: dict[int, str]) -> list[str]:
    """Processes the command started that are still alive (after a bounded wait for the exits
    already under way: a worker the raylet killed can take a moment to be reaped)."""
    for _ in range(60):
        alive = []
        for pid, name in descendants.items():
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and p.name() == name:
                    alive.append(f"{pid} {name}")
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return []
        time.sleep(0.5)
    return alive


# ---------------------------------------------------------------------------------------------
# train pretrain
# ---------------------------------------------------------------------------------------------
def _train(tmp_path: Path, shards: Path, sig: int) -> tuple[Stopped, str, Path]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    args = [sys.executable, "-m", "training.cli", "pretrain", *FIXTURE_ARGS, "--shards", str(shards),
            "--tracking-uri", uri, "--storage-path", str(storage), "--run-name", "stopped",
            "--model-name", "scgpt-debug-stopped", "--step-sleep", "1.0", "--no-register"]
    res = _run_and_signal(args, tmp_path, sig, lambda out: "step 1/" in out, log_file=tmp_path / "train.log",
                          watch_sockets=True)
    return res, uri, storage / "stopped"


def _assert_train_stopped(res: Stopped, uri: str, run_dir: Path, sig: int) -> None:
    from training.tracking import client

    name = signal.Signals(sig).name
    assert res.code == 128 + sig, res.output[-3000:]
    lines = [ln for ln in res.output.splitlines() if ln.startswith(f"interrupted by {name}: ")]
    assert len(lines) == 1, res.output[-3000:]
    assert "marked KILLED" in lines[0] and (f"--resume {run_dir}" in lines[0] or "start it again" in lines[0])
    assert "Traceback" not in res.after_signal, res.after_signal[-3000:]
    c = client(uri)
    (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert run.info.status == "KILLED"
    assert any("raylet" in n for n in res.descendants.values()), res.descendants  # it did start a Ray
    assert _left_behind(res.descendants) == []


def test_sigint_of_train_pretrain_stops_cleanly_and_listens_on_loopback_only(demo_shards, tmp_path):
    res, uri, run_dir = _train(tmp_path, demo_shards, signal.SIGINT)
    # issue 14.5: while the run went, nothing listened beyond loopback (the TCPStore of the
    # process group included: rank 0's Ray Train worker)
    assert res.listening, "no listening socket found: the check looked at the wrong processes"
    _assert_train_stopped(res, uri, run_dir, signal.SIGINT)
    wild = sorted(s for s in res.listening if not _is_loopback(s[0]))
    assert not wild, f"listening beyond loopback: {wild}"


@pytest.mark.slow
def test_sigterm_of_train_pretrain_stops_cleanly(demo_shards, tmp_path):
    res, uri, run_dir = _train(tmp_path, demo_shards, signal.SIGTERM)
    _assert_train_stopped(res, uri, run_dir, signal.SIGTERM)


# ---------------------------------------------------------------------------------------------
# ingest census
# ---------------------------------------------------------------------------------------------
def _ingest(tmp_path: Path, census: Path, sig: int) -> tuple[Stopped, Path]:
    from shardset import MANIFEST_FILE

    out = tmp_path / "shards"
    args = [sys.executable, "-m", "ingest.cli", "census", "--census-uri", str(census), "--tissue", "blood",
            "--cells-per-shard", "50", "--num-cpus", "2", "--out", str(out)]

    def ready(_: str) -> bool:  # the first shard is in the manifest
        try:
            import json

            return len(json.loads((out / MANIFEST_FILE).read_text())["shards"]) >= 1
        except (OSError, ValueError):
            return False

    return _run_and_signal(args, REPO, sig, ready, log_file=tmp_path / "ingest.log"), out


def _assert_ingest_stopped(res: Stopped, out: Path, sig: int) -> None:
    from shardset import Manifest

    name = signal.Signals(sig).name
    assert res.code == 128 + sig, res.output[-3000:]
    lines = [ln for ln in res.output.splitlines() if ln.startswith(f"ingest census: interrupted by {name}: ")]
    assert len(lines) == 1, res.output[-3000:]
    m = Manifest.load(out)
    assert not m.complete and 1 <= len(m.shards) < m.n_shards_planned
    assert f"kept {len(m.shards)} of {m.n_shards_planned} shards" in lines[0] and "re-run the same" in lines[0]
    assert "Traceback" not in res.after_signal and "Check failed" not in res.after_signal, res.after_signal[-3000:]
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    assert any("raylet" in n for n in res.descendants.values()), res.descendants
    assert _left_behind(res.descendants) == []


def test_sigterm_of_ingest_census_stops_cleanly(demo_census, tmp_path):
    res, out = _ingest(tmp_path, demo_census, signal.SIGTERM)
    _assert_ingest_stopped(res, out, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_of_ingest_census_stops_cleanly(demo_census, tmp_path):
    res, out = _ingest(tmp_path, demo_census, signal.SIGINT)
    _assert_ingest_stopped(res, out, signal.SIGINT)
