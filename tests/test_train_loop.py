"""The training loop's parts without Ray or DeepSpeed: a fake engine behind the train step.

The train step accumulates micro-batches into one optimizer step; the metrics accumulator turns
a step's loss record into floats with one host sync (one ``.tolist()``, no ``.item()`` or
``float()`` per term); MFU comes from ``scgpt_model.flops``; each part decides when it is due.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from training import data as D
from training.worker import Checkpointer, MetricsAccumulator, TrainStep, Validator


@dataclass
class FakeBatch:
    n_cells: int
    n_tokens: int
    genes: torch.Tensor
    unknown_count: int = 0

    def to(self, device, non_blocking=False):
        return self


class FakeEngine:
    """Stands in for a DeepSpeed engine: losses from the batch, counts backward/step calls."""

    def __init__(self) -> None:
        self.backward_calls = self.step_calls = 0

    def __call__(self, batch):
        x = torch.tensor(float(batch.n_cells))
        return x * 2.0, {"gep": x, "gepc": x + 1.0}

    def backward(self, total):
        self.backward_calls += 1

    def get_lr(self):
        return [1e-3 * (1 + self.step_calls // 2)]

    def step(self):
        self.step_calls += 1


class HostSyncs:
    """Counts device-to-host conversions of tensors (``.tolist()``, ``.item()``, ``float()``)."""

    def __init__(self, monkeypatch) -> None:
        self.counts = {"tolist": 0, "item": 0, "__float__": 0}
        for name in self.counts:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                self.counts[_name] += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)

    def total(self) -> int:
        return sum(self.counts.values())


def _batches(sizes: list[int]):
    for i, n in enumerate(sizes):
        yield D.LoadedBatch(FakeBatch(n, 10 * n, torch.zeros(n, 12), unknown_count=4 * n), np.arange(n) + 100 * i, i)


def _debug_cfg():
    from scgpt_model.presets import get_preset

    return get_preset("debug", 100)


def test_train_step_accumulates_and_crosses_to_the_host_once(monkeypatch):
    engine = FakeEngine()
    step = TrainStep(engine, _debug_cfg(), device=torch.device("cpu"), bf16=False, grad_accum=2, seed=0, rank=0,
                     count_flops=False)
    meter = MetricsAccumulator(world=1, rank=0, device=torch.device("cpu"), total_steps=2, peak_flops_per_device=None)
    batches = _batches([3, 5, 2, 6])
    syncs = HostSyncs(monkeypatch)
    rec = step(batches, epoch=0)
    assert syncs.total() == 0, "the step's loss record stays on the device"
    assert engine.backward_calls == engine.step_calls == 2 and rec.last_index == 1
    assert (rec.cells, rec.tokens, rec.slots) == (8, 80, 96)
    assert [len(j) for j in rec.joinids] == [3, 5]
    m = meter.reduce(rec, grad_norm=torch.tensor(0.5), started=0.0, epoch=0)
    assert syncs.counts == {"tolist": 1, "item": 0, "__float__": 0}, syncs.counts
    assert m["loss"] == pytest.approx((6 + 10) / 2) and m["loss_gep"] == pytest.approx(4.0)
    assert m["loss_gepc"] == pytest.approx(5.0) and m["grad_norm"] == 0.5
    assert list(m)[:3] == ["loss", "loss_gep", "loss_gepc"] and "mfu" not in m
    assert m["padding_fraction"] == pytest.approx(1 - 80 / 96)

    rec2 = step(batches, epoch=0)
    assert rec2.last_index == 3 and engine.step_calls == 4
    assert step(batches, epoch=0) is None, "an exhausted epoch ends the loop"
    with pytest.raises(RuntimeError, match="accumulation window"):
        step(_batches([1]), epoch=1)


def test_mfu_comes_from_scgpt_model_flops(monkeypatch):
    import scgpt_model.flops as F

    cfg = _debug_cfg()
    calls = []
    monkeypatch.setattr(F, "mfu", lambda done, sec, peak: calls.append((done, sec, peak)) or 0.25)
    step = TrainStep(FakeEngine(), cfg, device=torch.device("cpu"), bf16=False, grad_accum=1, seed=0, rank=0,
                     count_flops=True)
    meter = MetricsAccumulator(world=2, rank=0, device=torch.device("cpu"), total_steps=1, peak_flops_per_device=1e12)
    rec = step(_batches([4]), epoch=0)
    assert rec.flops == F.batch_flops(cfg, 4, 40, 16) == 4 * F.estimate_flops(cfg, 10, 6)
    m = meter.reduce(rec, grad_norm=None, started=0.0, epoch=0)
    assert m["mfu"] == 0.25 and calls[0][0] == rec.flops and calls[0][2] == 2e12
    assert np.isnan(m["grad_norm"])


def test_flops_mfu_is_achieved_over_peak():
    from scgpt_model.flops import mfu

    assert mfu(4e12, 2.0, 4e12) == pytest.approx(0.5)


def test_each_part_decides_when_it_is_due():
    meter = MetricsAccumulator(world=1, rank=0, device=torch.device("cpu"), total_steps=10,
                               peak_flops_per_device=None, log_every=3)
    assert [s for s in range(1, 11) if meter.should_log(s, s == 10)] == [3, 6, 9, 10]
    ck = Checkpointer(None, every=4, base_state={}, rank=0)
    assert [s for s in range(1, 11) if ck.should_save(s, s == 10)] == [4, 8, 10]
    assert ck.load(None) == {"epoch": 0, "next_batch": 0, "step": 0} and ck.last_saved == 0

    from training.config import TrainConfig

    cfg = TrainConfig()
    cfg.schedule.val_every = 5
    v = Validator(None, cfg, _debug_cfg(), None, [], device=torch.device("cpu"), bf16=False, rank=0)
    assert [s for s in range(1, 11) if v.should_run(s, s == 10)] == [5, 10]


class ListLogger:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.pending: list = []

    def log(self, metrics, step):
        self.steps.append(step)

    def flush(self):
        return True


def test_a_resumed_run_does_not_log_a_replayed_step_again(capsys):
    logger = ListLogger()
    meter = MetricsAccumulator(world=1, rank=0, device=torch.device("cpu"), total_steps=8, peak_flops_per_device=None,
                               mlflow_logger=logger, logged_through=5)
    for s in range(5, 9):  # resumed from the step-4 checkpoint; step 5 was logged before the interrupt
        meter.log(s, 0, {"loss": 1.0})
    assert logger.steps == [6, 7, 8]
    assert capsys.readouterr().out.count("step ") == 4, "every step still prints its line"


def _ckpt(tmp_path, step):
    import json

    import ray.train

    from training.worker import STATE_FILE

    d = tmp_path / f"checkpoint_{step}"
    d.mkdir()
    (d / STATE_FILE).write_text(json.dumps({"step": step}))
    return d, ray.train.Checkpoint(str(d))


def test_the_driver_s_checkpoint_wins_over_an_older_ray_snapshot(tmp_path):
    from training.worker import checkpoint_step, start_checkpoint

    _, c2 = _ckpt(tmp_path, 2)
    d4, _ = _ckpt(tmp_path, 4)
    _, c6 = _ckpt(tmp_path, 6)
    # --resume found step 4 on disk; Ray's snapshot of the earlier fit still names step 2
    assert checkpoint_step(start_checkpoint(str(d4), c2)) == 4
    assert checkpoint_step(start_checkpoint(str(d4), None)) == 4
    # a worker restart inside this fit after step 6: Ray's newer checkpoint
    assert checkpoint_step(start_checkpoint(str(d4), c6)) == 6
    # a new run: whatever Ray restored (None on a fresh run)
    assert start_checkpoint(None, None) is None and start_checkpoint(None, c2) is c2
