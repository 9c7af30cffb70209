"""A local Ray started by this project stays on loopback (GCS, raylet, workers), the environment
meant for its workers reaches them, and a start-up that fails under load is retried once."""

from __future__ import annotations

import os

import pytest

import localray
from localray import LOOPBACK, LocalRayError, is_loopback, start_local


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


def test_a_failed_start_up_is_retried_once_with_a_longer_gcs_wait(ray_down, monkeypatch):
    """A real failed start: a 0 s GCS wait cannot see the GCS publish its port (as a 30 s wait
    could not on a loaded machine). The GCS that attempt started is stopped; the retry comes up."""
    ray = ray_down
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "0")
    attempts = []
    real_init = ray.init

    def counting_init(**kw):
        attempts.append(os.environ["RAY_gcs_server_port_wait_time_s"])
        return real_init(**kw)

    monkeypatch.setattr(ray, "init", counting_init)
    start_local(num_cpus=1)
    assert attempts == ["0", str(localray.RETRY_GCS_WAIT_S)]
    assert os.environ["RAY_gcs_server_port_wait_time_s"] == "0"  # the caller's value is back
    assert ray.get_runtime_context().gcs_address.startswith(f"{LOOPBACK}:")
    gcs_servers = [p for p in localray._ray_children().values() if "gcs_server" in p.cmdline()[0]]
    assert len(gcs_servers) == 1, "the first attempt's GCS was left running"


def test_a_second_failed_start_up_raises_one_message_naming_what_to_do(ray_down, monkeypatch):
    ray = ray_down

    def failing_init(**kw):
        raise RuntimeError("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", failing_init)
    with pytest.raises(LocalRayError) as e:
        start_local(num_cpus=1)
    msg = str(e.value)
    assert "twice" in msg and "timed out during startup" in msg
    assert f"--ray-address {LOOPBACK}:6379" in msg and "ray start --head" in msg
    assert not ray.is_initialized()


def test_prepare_keeps_cluster_mode_for_a_remote_cluster(monkeypatch):
    for k in (*localray.ENV, *localray.LOCAL_ENV):
        monkeypatch.delenv(k, raising=False)
    localray.prepare("10.0.0.5:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a user's own value wins
    localray.prepare(None)
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and os.environ["RAY_AUTH_MODE"] == "token"
