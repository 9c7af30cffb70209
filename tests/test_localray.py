"""A local Ray started by this project stays on loopback (GCS, raylet, workers), and the
environment meant for its workers reaches them."""

from __future__ import annotations

import os

import pytest

from ingest.localray import LOOPBACK, is_loopback, start_local


@pytest.fixture
def ray_down():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    ray.shutdown()


def test_local_ray_is_bound_to_loopback_and_workers_get_their_env(ray_down, monkeypatch):
    ray = ray_down
    monkeypatch.delenv("SCGPT_TEST_WORKER_ENV", raising=False)
    start_local(num_cpus=1, worker_env={"SCGPT_TEST_WORKER_ENV": "yes"})
    assert ray.get_runtime_context().gcs_address.startswith(f"{LOOPBACK}:")
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == [LOOPBACK]

    @ray.remote
    def probe():
        import ray as r

        return r.util.get_node_ip_address(), os.environ.get("SCGPT_TEST_WORKER_ENV")

    assert ray.get(probe.remote()) == (LOOPBACK, "yes")


def test_loopback_addresses():
    assert is_loopback("127.0.0.1:6379") and is_loopback("ray://localhost:10001") and is_loopback("[::1]:6379")
    assert not is_loopback("10.0.0.5:6379") and not is_loopback("head.cluster.local:6379")


def test_a_ray_progress_bar_leaves_print_and_numba_working(ray_down, monkeypatch):
    """Ray's driver-side tqdm_ray bar manager used to replace builtins.print for good; numba then
    failed to compile any kernel reaching `print` (pynndescent's, via numba.get_num_threads)."""
    import builtins
    import time

    import numba

    ray = ray_down
    monkeypatch.delenv("RAY_TQDM_PATCH_PRINT", raising=False)
    original = builtins.print
    start_local(num_cpus=1)

    @ray.remote
    def with_bar():
        from ray.experimental.tqdm_ray import tqdm

        for _ in tqdm(range(2)):
            time.sleep(0.1)

    ray.get(with_bar.remote())
    deadline = time.time() + 10
    while time.time() < deadline and builtins.print is original:
        time.sleep(0.5)  # the bar reaches the driver through the log monitor, asynchronously
    assert builtins.print is original

    @numba.njit
    def threads():
        return numba.get_num_threads()

    assert threads() >= 1
