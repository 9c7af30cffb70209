"""Starting and joining Ray the way this project needs it: the one place ingest and training do it.

Ray reads its settings from the environment, some of them when ray is imported. ``prepare(address)``
puts this project's defaults (``setdefault``: a user's own value wins) into ``os.environ`` once, and
the entry points (``ingest``, ``train``, the test session) call it before anything imports ray, so
the driver and every Ray process started later see them. ``start_local`` / ``connect`` call it too.

A local Ray must stay on loopback. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do
that: Ray rewrites a loopback node address to the machine's outward-facing IP (it is meant for
multi-node clusters), so GCS, raylet and workers would advertise and dial e.g. 10.x.y.z. Ray keeps
loopback only when its cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ray
is imported and by every Ray process it starts), which is what a single-machine instance wants and
what a driver joining a remote cluster must not have: so ``prepare`` needs to know the address.

Under load (2 busy cores, a test session) a local start-up can miss Ray's own waits for the GCS
and the raylet (30 s each). ``start_local`` then stops what the failed attempt started and tries
once more with a longer GCS wait, or raises ``LocalRayError`` with one message saying what to do.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from localray import quiet, signals

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Environment of every run (driver and the Ray processes it starts).
ENV = {
    "RAY_AUTH_MODE": "disabled",  # local instances and the project's clusters run without Ray tokens
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report sent from our runs
    "MASTER_ADDR": LOOPBACK,  # what torch.distributed clients dial on a local run
    # Off: the driver's tqdm_ray bar manager otherwise replaces builtins.print for the rest of the
    # process, and numba cannot compile a kernel that reaches `print` (numba.get_num_threads does),
    # so pynndescent / umap / scanpy neighbours failed in any process that had run a Ray job.
    "RAY_TQDM_PATCH_PRINT": "0",
    # Off: Ray Train re-logs each worker `print` through the root logger, which the worker's own
    # log handler prints again, so every training step came out as two identical lines.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Added for a local instance, or a cluster on this machine's loopback.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep node/GCS addresses on loopback (see above)
    # Off: the watcher polls for node drains (spot preemption on a cluster) and its actor start
    # logs an error-level core_worker line on every healthy local run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# Ray's wait for the GCS to publish its port (RAY_gcs_server_port_wait_time_s, default 30 s) on the
# second attempt. The raylet's 30 s wait is fixed in ray/_private/node.py (2.60): the retry gives it
# a second window rather than a longer one.
RETRY_GCS_WAIT_S = 120
_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"


class LocalRayError(RuntimeError):
    """A local Ray could not be started; the message says what to do."""


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in (LOOPBACK, "localhost", "::1")


def prepare(address: str | None = None) -> None:
    """This project's Ray environment into ``os.environ`` (where not set), for a run on ``address``
    (None: a local instance). Call it before importing ray; calling it again is harmless."""
    local = not address or address == "local" or is_loopback(address)
    for k, v in {**ENV, **(LOCAL_ENV if local else {})}.items():
        os.environ.setdefault(k, v)
    if local:
        _driver_cluster_mode_off()


def _driver_cluster_mode_off() -> None:
    """Only where ray was imported before ``prepare`` (a notebook, a library caller): the driver's
    ray read cluster mode at import, so the environment alone cannot turn it off any more; set the
    constant it read. Entry points call ``prepare`` first and never get here."""
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is None or not consts.ENABLE_RAY_CLUSTER:
        return
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] in ("0", "false", "False"):
        log.debug("ray was imported before localray.prepare(); turning its cluster mode off for a local run")
        consts.ENABLE_RAY_CLUSTER = False


def _ray_children() -> dict[int, "psutil.Process"]:  # noqa: F821 - psutil imported lazily
    """This process's descendants that run Ray's own programs (GCS, raylet, log monitor, ...)."""
    import psutil
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if any(ray_dir in arg for arg in p.cmdline()):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop_new_ray_processes(before: set[int]) -> None:
    """Stop what a failed ``ray.init`` left running: it fails while building its node, so
    ``ray.shutdown`` never learns of the GCS / raylet it had started."""
    import psutil

    procs = [p for pid, p in _ray_children().items() if pid not in before]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    for p in psutil.wait_procs(procs, timeout=10)[1]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def start_local(*, num_cpus: int | None = None, worker_env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """A new Ray instance owned by this process, bound to loopback, no dashboard. ``worker_env``
    is exported (setdefault) before the Ray processes start, so every worker inherits it.

    ``address="local"`` always starts a new instance; a plain ``ray.init()`` would attach to any
    Ray another process on this machine started (it reads /tmp/ray's current-cluster file).
    A start-up that fails (a missed GCS or raylet wait under load) is retried once, with the GCS
    wait raised to ``RETRY_GCS_WAIT_S``; a second failure raises ``LocalRayError``."""
    prepare(None)
    import ray

    for k, v in (worker_env or {}).items():
        os.environ.setdefault(k, v)
    kwargs.setdefault("logging_level", logging.WARNING)
    # every worker process: Ray Train's state-API and autoscaler warnings off (localray/quiet.py)
    kwargs["runtime_env"] = {"worker_process_setup_hook": quiet.HOOK, **kwargs.get("runtime_env", {})}
    init = dict(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False, **kwargs)
    before = set(_ray_children())
    try:
        ray.init(**init)
    except Exception as first:  # noqa: BLE001 - any start-up failure gets one retry, then one message
        ray.shutdown()
        _stop_new_ray_processes(before)
        wait = max(int(os.environ.get(_GCS_WAIT_ENV) or 30), RETRY_GCS_WAIT_S)
        log.warning("local Ray start-up failed (%s); retrying once with a %d s GCS wait", first, wait)
        saved = os.environ.get(_GCS_WAIT_ENV)
        os.environ[_GCS_WAIT_ENV] = str(wait)
        try:
            ray.init(**init)
        except Exception as second:  # noqa: BLE001
            ray.shutdown()
            _stop_new_ray_processes(before)
            raise LocalRayError(
                f"could not start a local Ray, twice (first: {first}; then, with a {wait} s GCS wait: {second}). "
                "The machine is probably overloaded: run again when it is less busy, or start Ray yourself "
                f"(`ray start --head --node-ip-address {LOOPBACK} --port 6379`) and pass "
                f"--ray-address {LOOPBACK}:6379") from second
        finally:
            if saved is None:
                os.environ.pop(_GCS_WAIT_ENV, None)
            else:
                os.environ[_GCS_WAIT_ENV] = saved
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(LOOPBACK):
        ray.shutdown()
        raise LocalRayError(f"the local Ray came up on {gcs}, not on loopback; export "
                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before anything imports ray")
    signals.reinstall()  # ray.init replaced the SIGTERM handler of a command that stops cleanly


def connect(address: str, *, worker_env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Join a running cluster. A cluster started on this machine bound to loopback (``ray start
    --head --node-ip-address 127.0.0.1``) is joined on loopback; ``worker_env`` reaches that
    job's workers through its runtime environment."""
    prepare(address)
    import ray

    if is_loopback(address):
        kwargs["_node_ip_address"] = LOOPBACK
    if worker_env:
        kwargs["runtime_env"] = {"env_vars": dict(worker_env)}
    ray.init(address=address, **kwargs)
    signals.reinstall()
