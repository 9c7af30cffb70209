"""The setup hook of every worker process of a local Ray (``runtime_env`` ``worker_process_setup_hook``).

A local instance runs without a dashboard (``localray.start_local``), so Ray's state API has no
server there. Two Ray Train helpers rely on it or on an autoscaler that a fixed local instance
does not have, and on a healthy run they only print noise a user reads as failure:

* the ``PlacementGroupCleaner`` actor asks the state API whether the train controller is alive
  every few seconds and logs "Failed to query Ray Train Controller actor state" each time (126
  lines in one main job). Its job, removing the workers' placement group when the controller dies
  ungracefully, is done on a local run by the ``ray.shutdown`` that ends it. With another Ray on
  the machine its query also fails to pick an instance ("Found multiple active Ray instances")
  and its thread dies with a traceback: ``RAY_ADDRESS`` names this instance, so it does not.
* the train controller's autoscaling-coordinator client warns, with a traceback, when its
  resource request times out on a loaded machine; a local instance has no autoscaler to ask.

Only those two loggers are limited to ERROR records, only in the processes of a local instance; a cluster
(``localray.connect``) keeps Ray's defaults.
"""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)
HOOK = "localray.quiet.local_worker_setup"


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def local_worker_setup() -> None:
    import ray

    for name in QUIET_LOGGERS:
        # a filter, not a level: Ray Train's controller and workers configure the "ray.train" loggers
        # with logging.config.dictConfig after this hook, which resets the level of every child logger
        # (but keeps its filters)
        logger = logging.getLogger(name)
        if _errors_only not in logger.filters:
            logger.addFilter(_errors_only)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def no_progress_bars_unless_terminal() -> None:
    """Progress bars off when stderr is not a terminal (a log file, a pipe): tqdm's carriage-return
    redraws (DeepSpeed's "Loading checkpoint shards", MLflow's "Downloading artifacts" while a model
    is registered) turn a log into run-on lines. tqdm reads ``TQDM_*`` when it is first imported,
    so a command calls this before anything imports tqdm; Ray's processes inherit it."""
    import sys

    if sys.stderr.isatty():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # any value disables (tqdm casts it to bool)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
