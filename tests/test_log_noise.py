"""A healthy local run prints no warning a user reads as failure (issue 14 item 13).

Checked where it is decided, not by grepping a run's output (Ray forwards worker logs
asynchronously): every worker process of a local Ray, detached actors included (Ray Train's
PlacementGroupCleaner is one), runs localray.quiet's setup hook. There the cleaner's state-API
query fails with an exception it catches (not the ConnectionError that killed its thread when
another Ray ran on the machine), and its per-poll warning and the autoscaler client's are off.
Step lines printed once and the preemption watcher's error line: tests/test_train_pretrain.py
and localray.LOCAL_ENV."""

from __future__ import annotations

import logging
import logging.config

from localray import quiet, start_local


def test_local_workers_run_the_quiet_hook(ray_down):
    ray = ray_down
    start_local(num_cpus=1)
    gcs = ray.get_runtime_context().gcs_address

    @ray.remote(num_cpus=0)
    class Probe:
        def check(self):
            import os

            from ray.train.v2._internal.state.util import is_actor_alive
            from ray.util.state.exception import RayStateApiException

            try:  # what PlacementGroupCleaner._monitor_loop asks every few seconds
                is_actor_alive(ray.get_runtime_context().get_actor_id(), timeout=2)
                caught = "answered"
            except RayStateApiException:
                caught = "caught by the cleaner"
            except Exception as e:  # noqa: BLE001 - the cleaner's thread would die of it
                caught = f"uncaught {type(e).__name__}"

            def _passes(name, level):  # a copy of the module's: the actor runs where tests/ may not import
                logger = logging.getLogger(name)
                return logger.isEnabledFor(level) and bool(logger.filter(logger.makeRecord(name, level, "", 0, "x",
                                                                                            (), None)))

            # Ray Train's controller and workers reconfigure the "ray.train" loggers after the hook ran
            logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                       "loggers": {"ray.train": {"level": "DEBUG"}}})
            return {"address": os.environ.get("RAY_ADDRESS"), "query": caught,
                    "warns": [n for n in quiet.QUIET_LOGGERS if _passes(n, logging.WARNING)],
                    "errors": [n for n in quiet.QUIET_LOGGERS if _passes(n, logging.ERROR)]}

    got = ray.get(Probe.options(lifetime="detached").remote().check.remote())
    assert got == {"address": gcs, "query": "caught by the cleaner", "warns": [], "errors": list(quiet.QUIET_LOGGERS)}
    # the driver keeps Ray's defaults
    assert all(_passes(n, logging.WARNING) for n in quiet.QUIET_LOGGERS)


def _passes(name: str, level: int) -> bool:
    """Whether a record of ``level`` logged to ``name`` reaches a handler."""
    logger = logging.getLogger(name)
    return logger.isEnabledFor(level) and bool(logger.filter(logger.makeRecord(name, level, "", 0, "x", (), None)))


def test_no_carriage_return_bars_when_stderr_is_a_log_file(tmp_path):
    import subprocess
    import sys

    code = ("import localray.quiet as q; {call}; from tqdm import tqdm\n"
            "for _ in tqdm(range(3), desc='Loading checkpoint shards'): pass")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    for call, bars in (("q.no_progress_bars_unless_terminal()", False), ("None", True)):
        with open(tmp_path / "log", "w+", newline="") as log:  # stderr is a file, as with `train ... 2> log`
            subprocess.run([sys.executable, "-c", code.format(call=call)], stderr=log, env=env, check=True)
            log.seek(0)
            text = log.read()
        assert ("\r" in text) is bars and ("Loading checkpoint shards" in text) is bars, text
