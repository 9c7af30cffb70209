"""Starting and joining Ray the way this project needs it (ingest and training share this).

A local Ray must stay on loopback. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do
that: Ray rewrites a loopback node address to the machine's outward-facing IP (it is meant for
multi-node clusters), so GCS, raylet and workers would advertise and dial e.g. 10.x.y.z. Ray keeps
loopback only when its cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by
``ray._private.ray_constants`` at import and by every Ray process it starts), which is what a
single-machine instance wants anyway. ``start_local`` sets that, in the environment its child
processes inherit and in the already imported module, and checks the result.
"""

from __future__ import annotations

import logging
import os
from typing import Any

LOOPBACK = "127.0.0.1"

# Environment for every Ray process of a local instance (set before they start; setdefault, so a
# user's own value wins).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep node/GCS addresses on loopback (see above)
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MASTER_ADDR": LOOPBACK,
    # Off: the driver's tqdm_ray bar manager otherwise replaces builtins.print for the rest of the
    # process, and numba cannot compile a kernel that reaches `print` (numba.get_num_threads does),
    # so pynndescent / umap / scanpy neighbours failed in any process that had run a Ray job.
    "RAY_TQDM_PATCH_PRINT": "0",
    # Off: Ray Train re-logs each worker `print` through the root logger, which the worker's own
    # log handler prints again, so every training step came out as two identical lines.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Off on a local Ray: the watcher polls for node drains (spot preemption on a cluster) and its
    # actor start logs an error-level core_worker line on every healthy local run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in (LOOPBACK, "localhost", "::1")


def _loopback_mode() -> None:
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")


def start_local(*, num_cpus: int | None = None, worker_env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """A new Ray instance owned by this process, bound to loopback, no dashboard. ``worker_env``
    is exported (setdefault) before the Ray processes start, so every worker inherits it.

    ``address="local"`` always starts a new instance; a plain ``ray.init()`` would attach to any
    Ray another process on this machine started (it reads /tmp/ray's current-cluster file)."""
    import ray

    _loopback_mode()
    for k, v in (worker_env or {}).items():
        os.environ.setdefault(k, v)
    kwargs.setdefault("logging_level", logging.WARNING)
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False, **kwargs)
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(LOOPBACK):
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {gcs}, not on loopback; set "
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before anything imports ray")


def connect(address: str, *, worker_env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Join a running cluster. A cluster started on this machine bound to loopback (``ray start
    --head --node-ip-address 127.0.0.1``) is joined on loopback; ``worker_env`` reaches that
    job's workers through its runtime environment."""
    import ray

    if is_loopback(address):
        _loopback_mode()
        kwargs["_node_ip_address"] = LOOPBACK
    if worker_env:
        kwargs["runtime_env"] = {"env_vars": dict(worker_env)}
    ray.init(address=address, **kwargs)
