"""GPU path (runs only with CUDA: ``pytest -m gpu``): bf16 ZeRO-2 on NCCL through the real command."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.training import run_train

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_zero2_on_gpu_trains_and_registers(tiny_shards, tmp_path):
    n = torch.cuda.device_count()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_train(["pretrain", "--config", "debug", "--shards", str(tiny_shards), "--use-gpu",
                                "--num-workers", str(min(n, 2)), "--max-steps", "4", "--checkpoint-every", "2",
                                "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs")], tmp_path)
    assert code == 0, out[-3000:] + err[-3000:]
    from training.tracking import client

    c = client(uri)
    (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert run.data.params["deepspeed.precision"] == "auto"
    assert len(c.get_metric_history(run.info.run_id, "mfu")) == 4
