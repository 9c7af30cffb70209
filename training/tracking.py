"""MLflow for a training run: tracking URI, reachability check, run setup, per-step metrics.

The driver creates (or re-opens, on ``--resume``) the run and logs config and lineage; rank 0
of the workers logs per-step metrics into that run by id. Nothing here is called per rank > 0.

Failure policy against a tracking server: only the up-front check fails fast (MLflow's HTTP
retries switched off for its duration, ``fail_fast``); everything after it keeps MLflow's own
retries, and per-step metrics (``MetricLogger``) warn and hold their points instead of killing
a long run over one transient error.

Artifacts: with a database (sqlite) store MLflow's default artifact root is ``./mlruns`` of the
current directory. Every experiment we create gets an explicit ``<database folder>/mlartifacts``
instead (``artifact_location``), so a tracking database and its artifacts travel together.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from training.errors import TrainUsageError

log = logging.getLogger(__name__)

ARTIFACT_DIR = "mlartifacts"  # beside a sqlite database: where its experiments keep their artifacts
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every sqlite database file


@contextmanager
def http_retries(max_retries: int, timeout_s: int) -> Iterator[None]:
    """MLflow HTTP calls inside this block retry at most ``max_retries`` times, ``timeout_s`` each.

    MLflow reads these variables at every request; the previous environment is restored after
    the block, so nothing outside it changes (MLflow's default: 7 retries, exponential back-off,
    minutes before an unreachable server gives an answer)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fail_fast() -> AbstractContextManager[None]:
    """No retries, 20 s timeout: the up-front tracking check only (a typo in the URI should be one
    message within seconds; a multi-day run wants MLflow's retries later)."""
    return http_retries(0, 20)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other scheme)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Where new experiments of the store at ``uri`` keep artifacts: ``<db folder>/mlartifacts`` for
    sqlite (None elsewhere: a server or a file store chooses its own)."""
    db = sqlite_path(uri)
    return (db.resolve().parent / ARTIFACT_DIR).as_uri() if db is not None else None


def ensure_experiment(uri: str, name: str) -> str:
    """Id of experiment ``name``, created with ``artifact_location(uri)`` if it does not exist."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location(uri))


def resolve_tracking_uri(cli_value: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if cli_value:
        return cli_value
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> None:
    """Fail fast (TrainUsageError) when the tracking store cannot be reached or written."""
    db = sqlite_path(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise TrainUsageError(f"tracking URI {uri}: folder {db.parent} does not exist; create it or "
                                  "pass --tracking-uri sqlite:///<existing folder>/mlflow.db")
        if db.is_dir():
            raise TrainUsageError(f"tracking URI {uri}: {db} is a folder, not a database file; pass "
                                  f"--tracking-uri sqlite:///{db}/mlflow.db")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrainUsageError(f"tracking URI {uri}: {db} is not writable; pass another --tracking-uri")
        if db.exists() and db.stat().st_size > 0:
            with db.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head != SQLITE_MAGIC:
                raise TrainUsageError(f"tracking URI {uri}: {db} is not an SQLite database (a file of another "
                                      "kind is there); move it away or pass --tracking-uri sqlite:///<path of a "
                                      "new or existing MLflow database>")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status >= 400:
                    raise TrainUsageError(f"tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TrainUsageError(
                f"tracking server {uri} cannot be reached ({e}); start it (see infra/mlflow/README.md), "
                "fix --tracking-uri / MLFLOW_TRACKING_URI, or unset it to use a local sqlite database"
            ) from e
        from mlflow.exceptions import MlflowException

        try:  # /health answers, but does the MLflow API (auth, version)? One call, no retries.
            with fail_fast():
                client(uri).search_experiments(max_results=1)
        except MlflowException as e:
            raise TrainUsageError(f"tracking server {uri} answers /health but not the MLflow API "
                                  f"({str(e).splitlines()[0][:300]}); check the URI, credentials "
                                  "(MLFLOW_TRACKING_USERNAME / _TOKEN) and the server's version") from e
        return
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file:"))
        if not path.parent.exists():
            raise TrainUsageError(f"tracking URI {uri}: folder {path.parent} does not exist")
        return
    raise TrainUsageError(f"tracking URI {uri!r} has an unsupported scheme; use sqlite:///, http(s):// or a folder")


def git_commit() -> str:
    """HEAD of the checkout holding this package ('+dirty' when it has local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, *, params: dict[str, Any], tags: dict[str, str],
              artifacts: dict[str, Any]) -> str:
    """Create a run with params, tags and JSON artifacts; returns its id."""
    c = client(uri)
    run = c.create_run(ensure_experiment(uri, experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[i:i + 100])
    with tempfile.TemporaryDirectory() as d:
        for name, obj in artifacts.items():
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True))
            c.log_artifact(run_id, str(p))
    return run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again (it stays the same run: same id, metrics continue)."""
    c = client(uri)
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


class MetricLogger:
    """Rank 0's per-step metrics into an existing run (one log_batch call per step).

    A failed call (server restarting, network blip, locked database) does not end the run: the
    points are held, one warning says so, and they are sent with a later step once the store
    answers again (tried at most every ``retry_every_s``, so an outage does not stall every step
    on MLflow's retries). At most ``max_pending`` points are held; older ones are dropped with a
    warning. ``flush()`` tries once more (end of training)."""

    MAX_BATCH = 1000  # MLflow's cap on metrics per log_batch call

    def __init__(self, uri: str, run_id: str, *, retry_every_s: float = 60.0, max_pending: int = 100_000,
                 max_retries: int = 3) -> None:
        from mlflow.entities import Metric

        self._metric = Metric
        self.client = client(uri)
        self.run_id = run_id
        self.retry_every_s = retry_every_s
        self.max_pending = max_pending
        self.max_retries = max_retries  # MLflow's HTTP retries per call (a few, quick)
        self.pending: list = []
        self.dropped = 0
        self._next_try = 0.0  # monotonic time before which a failed store is not tried again
        self._failing_since: int | None = None  # step of the first failure of the current outage

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.pending += [self._metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if len(self.pending) > self.max_pending:
            n = len(self.pending) - self.max_pending
            if not self.dropped:
                log.warning("MLflow unreachable for long: more than %d metric points held; the oldest are "
                            "dropped from now on", self.max_pending)
            self.pending, self.dropped = self.pending[n:], self.dropped + n
        if self._failing_since is not None and time.monotonic() < self._next_try:
            return
        self._send(step)

    def flush(self) -> bool:
        """Send what is held; True when nothing is left unsent."""
        if self.pending:
            self._send(None)
        return not self.pending

    def _send(self, step: int | None) -> None:
        try:
            # a few quick retries (back-off 2 + 4 + 8 s at most for 3): a step never stalls for minutes
            with http_retries(self.max_retries, 30):
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:self.MAX_BATCH])
                    del self.pending[:self.MAX_BATCH]
        except Exception as e:  # noqa: BLE001 (any store error: training goes on, the points wait)
            if self._failing_since is None:
                self._failing_since = step if step is not None else -1
                log.warning("MLflow metric logging failed at step %s (%s: %s); training continues, %d points "
                            "held and retried every %.0f s", step, type(e).__name__, str(e).splitlines()[0][:200],
                            len(self.pending), self.retry_every_s)
            self._next_try = time.monotonic() + self.retry_every_s
            return
        if self._failing_since is not None:
            log.warning("MLflow metric logging works again (failing since step %s); held points sent",
                        self._failing_since)
            self._failing_since = None
