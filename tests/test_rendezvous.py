"""Issue 14.5 without Ray: the process group's TCPStore listens where it is told.

torch's own store (what Ray Train's ``init_method="env"`` starts on rank 0) listens on every
interface (``::``) even when given 127.0.0.1; ``training.rendezvous`` binds the socket itself.
The end-to-end check (a real local training run) is in test_interrupts.py.
"""

from __future__ import annotations

import os
from datetime import timedelta

import psutil
import torch.distributed as dist


def _listening() -> set[tuple[str, int]]:
    me = os.getpid()
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
            if c.pid == me and c.status == psutil.CONN_LISTEN}


def test_torch_s_default_store_listens_on_every_interface():
    before = _listening()
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    try:
        new = _listening() - before
        assert new and all(ip in ("::", "0.0.0.0") for ip, _ in new), new  # what the rendezvous module avoids
    finally:
        del store


def test_the_bound_store_listens_on_loopback_only_and_serves():
    from training import rendezvous

    before = _listening()
    host, port = rendezvous._start_store("127.0.0.1", world_size=1, timeout_s=10)
    try:
        assert (host, port) in _listening() - before and _listening() - before == {(host, port)}
        rendezvous._store.set("k", "v")
        client = dist.TCPStore(host, port, 1, False, timeout=timedelta(seconds=10))
        assert client.get("k") == b"v"
    finally:
        rendezvous._store = None


def test_a_local_run_rendezvouses_on_loopback_and_a_remote_cluster_on_its_node():
    from training.rendezvous import LOOPBACK, torch_config

    assert torch_config(None, use_gpu=False).host == LOOPBACK
    assert torch_config("127.0.0.1:6379", use_gpu=False).host == LOOPBACK
    assert torch_config("10.0.0.5:6379", use_gpu=True).host is None  # rank 0's node address
    assert torch_config("10.0.0.5:6379", use_gpu=True).backend == "nccl"
