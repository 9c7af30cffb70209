"""MLflow failure policy and layout (issue 14, items 7, 9, 11, 12), on real sqlite stores.

- importing the tracking helpers changes no MLflow setting for the process; only the up-front
  check fails fast (``fail_fast``), and it restores the environment;
- per-step metrics survive an unreachable store and are sent once it answers again;
- experiments keep their artifacts beside the database (``<db folder>/mlartifacts``), never in
  ``./mlruns`` of the current directory, for training and evaluation runs alike;
- a tracking URI naming a file that is not a database is one message (train and evaluate);
- a registry load reuses one downloaded folder per version and leaves none behind; a models:/
  URI against a missing database says so and creates no empty database;
- a failed evaluation run is kept and marked FAILED, not deleted.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training import tracking
from training.errors import TrainUsageError

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:  # a loopback port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_import_leaves_mlflow_retries_alone():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    code = ("import os, training.tracking, eval.tracking, training.registry; "
            "print(os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES'), os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["None", "None"]
    os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    with tracking.fail_fast():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_metric_logger_survives_an_unreachable_store(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "r", params={}, tags={}, artifacts={})
    ml = tracking.MetricLogger(uri, run_id, retry_every_s=0.0, max_retries=0)
    ml.log({"loss": 3.0}, 1)
    good = ml.client
    ml.client = tracking.client(f"http://127.0.0.1:{_closed_port()}")  # the server goes away
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        for step in (2, 3, 4):
            ml.log({"loss": 3.0 - step / 10, "lr": 1e-4}, step)  # no exception: training goes on
        assert len(ml.pending) == 6
        failed = [r for r in caplog.records if "metric logging failed" in r.getMessage()]
        assert len(failed) == 1 and "step 2" in failed[0].getMessage()  # one warning per outage
        ml.client = good  # ... and comes back
        ml.log({"loss": 2.5}, 5)
    assert ml.pending == [] and ml.flush()
    assert any("works again" in r.getMessage() for r in caplog.records)
    hist = tracking.client(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5]
    assert [m.step for m in tracking.client(uri).get_metric_history(run_id, "lr")] == [2, 3, 4]


def test_artifacts_go_beside_the_database_not_to_the_cwd(tmp_path, monkeypatch):
    import mlflow

    from eval.tracking import eval_run

    cwd, dbdir = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    dbdir.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{dbdir / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "scgpt-pretrain", "r", params={"a": 1}, tags={},
                                artifacts={"config.json": {"a": 1}})
    art = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.json", tracking_uri=uri,
                                                   dst_path=str(tmp_path / "dl")))
    assert art.read_text().strip().startswith("{")
    exp = tracking.client(uri).get_experiment_by_name("scgpt-pretrain")
    assert exp.artifact_location == (dbdir / tracking.ARTIFACT_DIR).as_uri()
    assert list((dbdir / tracking.ARTIFACT_DIR).rglob("config.json"))
    with eval_run(uri, "zero-shot:x", {}) as eval_id:  # the evaluation experiment follows the same rule
        mlflow.log_text("scores", "scores.md")
    assert tracking.client(uri).get_run(eval_id).info.artifact_uri.startswith((dbdir / tracking.ARTIFACT_DIR).as_uri())
    assert list((dbdir / tracking.ARTIFACT_DIR).rglob("scores.md"))
    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())


def test_tracking_uri_that_is_not_a_database(tmp_path, tiny_shards, capsys):
    bad = tmp_path / "notes.db"
    bad.write_text("these are my notes, not a database\n")
    uri = f"sqlite:///{bad}"
    with pytest.raises(TrainUsageError, match="not an SQLite database"):
        tracking.check_tracking_uri(uri)
    tracking.check_tracking_uri(f"sqlite:///{tmp_path / 'new.db'}")  # a new database is fine
    from tests.fixtures.training import run_train

    code, _, err = run_train(["pretrain", "--shards", str(tiny_shards), "--tracking-uri", uri,
                              "--storage-path", str(tmp_path / "runs")], tmp_path)
    assert code == 2 and "not an SQLite database" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    from eval.cli import main

    code = main(["--model", str(tmp_path), "--task", "zero-shot", "--dataset", "pbmc3k", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and err.count("evaluate: error:") == 1 and "not an SQLite database" in err, err
    assert bad.read_text().startswith("these are my notes")


@pytest.fixture(scope="module")
def registered_tiny_model(tmp_path_factory, eval_debug_model_dir) -> tuple[str, str]:
    """The debug model logged and registered the way ``export_and_register`` does (minus DeepSpeed)."""
    import mlflow

    from training.pyfunc_model import ScGPTPyfunc
    from training.registry import ARTIFACT_KEY

    import shutil

    work = tmp_path_factory.mktemp("registry")
    model_dir = shutil.copytree(eval_debug_model_dir, work / ARTIFACT_KEY)  # MLflow keeps the folder's name
    uri = f"sqlite:///{work / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "scgpt-pretrain", "tiny", params={}, tags={}, artifacts={})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=tracking.client(uri).get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=ScGPTPyfunc(),
                                       artifacts={ARTIFACT_KEY: str(model_dir)}, pip_requirements=["torch"])
    mv = mlflow.register_model(info.model_uri, "tiny-model")
    return uri, f"models:/tiny-model/{mv.version}"


def test_registry_loads_leave_no_folder_behind(registered_tiny_model, tmp_path, monkeypatch):
    import tempfile

    from training import registry

    uri, model_uri = registered_tiny_model
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts downloads
    registry.remove_downloads()
    paths = [registry.load_registered_model(model_uri, uri)[3]["path"] for _ in range(3)]
    assert len(set(paths)) == 1 and Path(paths[0]).is_dir()  # one folder, reused by every load
    assert len(list(tmp_path.glob("scgpt-model-*"))) == 1
    registry.remove_downloads()  # also registered with atexit
    assert not list(tmp_path.glob("scgpt-model-*"))


def test_models_uri_against_a_missing_database_creates_nothing(registered_tiny_model, tmp_path, monkeypatch):
    from training.errors import ModelURIError
    from training.registry import load_registered_model

    _, model_uri = registered_tiny_model
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelURIError, match="no MLflow database at") as e:
        load_registered_model(model_uri)  # default: ./mlflow.db, which does not exist
    assert "MLFLOW_TRACKING_URI" in str(e.value) and "--tracking-uri" in str(e.value)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_failed_evaluation_run_is_kept_and_marked_failed(tmp_path, eval_debug_model_dir, symphony_small):
    from eval import tasks
    from eval.api import ScGPTModel
    from eval.runner import evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = ScGPTModel.load(str(eval_debug_model_dir), device="cpu")
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should go\n")  # the run fails when it writes its scores
    opts = tasks.EvalOptions(max_cells=60, plots=False, random_init=False, label_key="celltype")
    with pytest.raises(OSError):
        evaluate(model, "zero-shot", str(symphony_small), opts, tracking_uri=uri, out=blocker)
    c = tracking.client(uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 1, runs  # kept, not deleted: the evidence stays
    assert runs[0].info.status == "FAILED" and runs[0].info.lifecycle_stage == "active"
    assert runs[0].data.tags["eval_task"] == "zero-shot" and "Error" in runs[0].data.tags["error"]
