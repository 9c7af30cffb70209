"""The torch.distributed process group of a training run, with its rendezvous bound to one address.

Ray Train's ``TorchConfig`` starts the process group with ``init_method="env"``: rank 0 then
starts the TCPStore every rank rendezvouses on (an unauthenticated key-value store), and torch's
libuv store server listens on every interface (``::`` and ``0.0.0.0``) whatever ``MASTER_ADDR``
says; ``MASTER_ADDR`` only sets what the clients dial. gloo's own connections bind the address
the host name resolves to, again not loopback.

:class:`BoundTorchConfig` replaces that start-up: rank 0 binds a listening socket to ``host``
itself and hands its file descriptor to the TCPStore (``master_listen_fd``), the other ranks
connect to it, and the process group is created from that store. ``host`` is loopback for a local
run (and for a cluster on this machine's loopback), and rank 0's node address when
``--ray-address`` names a cluster. For a loopback run gloo (and NCCL's bootstrap) are pinned to
the loopback interface too.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from ray.train.torch import TorchConfig

# private in ray 2.60: reused for its on_shutdown (destroy the group) and on_training_start
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"

# this worker process's store (rank 0: the server) for the life of the process group
_store: dist.TCPStore | None = None


def loopback_interface() -> str:
    """The name of the network interface holding 127.0.0.1 ('lo' on Linux, 'lo0' on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
            return name
    return "lo"


def _start_store(host: str | None, world_size: int, timeout_s: int) -> tuple[str, int]:
    """Rank 0: a TCPStore server listening on ``host`` only (None: this node's address). Returns
    (host, port) for the other ranks."""
    global _store
    import ray

    host = host or ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))  # port 0: the kernel picks a free one (no find-then-bind race)
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    # the store takes over the socket's descriptor; detach so Python never closes it under it
    _store = dist.TCPStore(host, port, world_size, True, timeout=timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=True)
    return host, port


def _init_group(backend: str, world_rank: int, world_size: int, host: str, port: int, timeout_s: int,
                pin_loopback: bool) -> None:
    """Every rank: the process group from rank 0's store. (Not ``rank``: the worker group's
    ``execute_single_async(rank, fn, **kwargs)`` takes that name.)"""
    global _store
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)  # for anything that reads them
    if pin_loopback:  # gloo pairs and NCCL's bootstrap otherwise bind the host name's address
        iface = loopback_interface()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a hung collective fails (as Ray does)
    timeout = timedelta(seconds=timeout_s)
    if world_rank != 0:
        _store = dist.TCPStore(host, port, world_size, False, timeout=timeout)
    assert _store is not None, "rank 0 starts its store before the group"
    dist.init_process_group(backend=backend, store=_store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        import ray

        backend = backend_config.backend or "gloo"
        n = len(worker_group)
        host, port = worker_group.execute_single(0, _start_store, host=backend_config.host, world_size=n,
                                                 timeout_s=backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE, ...
        ray.get([worker_group.execute_single_async(i, _init_group, backend=backend, world_rank=i, world_size=n, host=host,
                                                   port=port, timeout_s=backend_config.timeout_s,
                                                   pin_loopback=host == LOOPBACK)
                 for i in range(n)])


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous listens on ``host`` only (None: rank 0's node address)."""

    host: str | None = LOOPBACK

    @property
    def backend_cls(self):
        return _BoundTorchBackend


def torch_config(ray_address: str | None, *, use_gpu: bool) -> BoundTorchConfig:
    """The process-group config of a run: loopback unless ``ray_address`` names a remote cluster."""
    from localray import is_loopback

    local = not ray_address or ray_address == "local" or is_loopback(ray_address)
    return BoundTorchConfig(backend="nccl" if use_gpu else "gloo", host=LOOPBACK if local else None)
