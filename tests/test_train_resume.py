"""Kill -9 mid-epoch, `--resume`, and end with the weights of the run that never stopped.

The uninterrupted reference is the shared fixture run (same arguments, same shards). The
interrupted run is a real ``train`` process (its own local Ray) killed with SIGKILL, process
group and all, after its step-4 checkpoint and before the end of epoch 0; the resumed run must
continue the same MLflow run at the same step with the same data order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.fixtures.training import FIXTURE_ARGS

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", MASTER_ADDR="127.0.0.1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _complete_steps(run_dir: Path) -> list[int]:
    from training.launch import _complete

    out = []
    for c in run_dir.glob("checkpoint_*"):
        if _complete(c, 2):
            out.append(json.loads((c / "train_state.json").read_text())["step"])
    return out


def test_sigkill_then_resume_matches_uninterrupted(pretrain_run, tmp_path):
    from training.launch import find_checkpoint
    from training.registry import consolidated_state_dict, load_registered_model
    from training.tracking import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    run_dir = storage / "killed"
    args = [sys.executable, "-m", "training.cli", "pretrain", *FIXTURE_ARGS, "--shards", str(pretrain_run.shards),
            "--tracking-uri", uri, "--storage-path", str(storage), "--run-name", "killed",
            "--model-name", "scgpt-debug-resumed", "--step-sleep", "0.8", "--no-register"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: we kill it all
    deadline = time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None and 4 not in _complete_steps(run_dir):
            time.sleep(0.3)
        assert proc.poll() is None, f"run ended before the kill:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        assert 4 in _complete_steps(run_dir), "no step-4 checkpoint in time"
        time.sleep(1.2)  # into step 5 or 6: mid-epoch (6 steps per epoch), past the checkpoint
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it already ended (the assertion above says why)
            pass
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert max(_complete_steps(run_dir)) < 12
    c = client(uri)
    assert not c.search_registered_models(), "a killed run registers nothing"
    assert "done: run" not in (tmp_path / "killed.log").read_text()
    (run_id,) = [r.info.run_id for r in c.search_runs([e.experiment_id for e in c.search_experiments()])]

    resumed = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--resume", str(run_dir),
                              "--storage-path", str(storage), "--step-sleep", "0"],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # one source of truth: the step the driver announces is the step the workers load
    assert "resuming from step 4" in resumed.stdout
    assert "resumed at step 4" in resumed.stdout + resumed.stderr
    assert "not registered" in resumed.stdout  # --no-register came back with the run's saved config
    # the same MLflow run, continued at the same step: one run, every step logged once
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert "resumed_at" in runs[0].data.tags
    steps = sorted(m.step for m in c.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, 13)), "a step logged twice (or missing) after the resume"
    ck = find_checkpoint(storage, str(run_dir))
    assert json.loads((ck / "train_state.json").read_text())["step"] == 12
    # same weights as the run that never stopped (its registered fp32 export vs our final ZeRO checkpoint)
    m_ref, _, _, _ = load_registered_model(pretrain_run.model_uri, pretrain_run.tracking_uri)
    ref, res = m_ref.state_dict(), consolidated_state_dict(ck)
    assert set(res) <= set(ref) and len(res) > 10
    for k in res:
        torch.testing.assert_close(res[k], ref[k], rtol=1e-5, atol=1e-6)
    # and the same loss curve after the resume point
    ref_loss = [m.value for m in sorted(client(pretrain_run.tracking_uri).get_metric_history(
        pretrain_run.run_id, "loss"), key=lambda m: m.step)]
    res_loss = {m.step: m.value for m in c.get_metric_history(run_id, "loss")}
    for step in range(5, 13):
        assert abs(res_loss[step] - ref_loss[step - 1]) <= 1e-4 * abs(ref_loss[step - 1])
