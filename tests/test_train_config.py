"""Typed configuration: every YAML / command-line value coerced to its field's type or refused
naming the dotted key and the expected type (no Ray: the loader is called directly, plus one
`train` subprocess for the exit code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig, check_config, load_config
from training.errors import TrainUsageError

ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path: Path, text: str) -> TrainConfig:
    y = tmp_path / "cfg.yaml"
    y.write_text(text)
    return load_config(str(y))


def _refused(tmp_path: Path, text: str, *needles: str) -> str:
    with pytest.raises(TrainUsageError) as e:
        check_config(_load(tmp_path, text))
    for n in needles:
        assert n in str(e.value), str(e.value)
    return str(e.value)


def test_yaml_written_the_usual_way_is_coerced(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 and 1e-8 as strings; quoted numbers and lists for tuples too
    cfg = _load(tmp_path, "optim: {lr: 1e-4, eps: 1e-8, betas: [0.9, '0.95'], warmup_steps: '10'}\n"
                          "data: {unknown_ratios: [0.5], max_train_cells: null}\n"
                          "model: {overrides: {dropout: '0.1', n_layers: 2, objectives: {ecs: true, ecs_beta: '0.5'}}}\n")
    check_config(cfg)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.eps == 1e-8
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.warmup_steps == 10
    assert cfg.data.unknown_ratios == (0.5,) and cfg.data.max_train_cells is None
    assert cfg.model.overrides == {"dropout": 0.1, "n_layers": 2, "objectives": {"ecs": True, "ecs_beta": 0.5}}
    # a run's saved config (tuples written as lists) loads back equal
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_values_of_the_wrong_type_name_the_key_and_the_type(tmp_path):
    _refused(tmp_path, "data: {unknown_ratios: 0.1}\n", "'data.unknown_ratios'", "a list of numbers", "0.1")
    _refused(tmp_path, "optim: {lr: fast}\n", "'optim.lr'", "a number", "'fast'")
    _refused(tmp_path, "optim: {betas: [0.9]}\n", "'optim.betas'", "a list of 2 numbers")
    _refused(tmp_path, "optim: {lr: .nan}\n", "'optim.lr'", "a number")
    _refused(tmp_path, "data: {batch_size: 2.5}\n", "'data.batch_size'", "an integer")
    _refused(tmp_path, "data: {batch_size: true}\n", "'data.batch_size'", "an integer")
    _refused(tmp_path, "tracking: {register: maybe}\n", "'tracking.register'", "true or false")
    _refused(tmp_path, "deepspeed: {precision: fp16}\n", "'deepspeed.precision'", "one of auto, fp32, bf16")
    _refused(tmp_path, "schedule: {max_steps: lots}\n", "'schedule.max_steps'", "an integer or null")
    # model.overrides: a string instead of a mapping, then values typed by ModelConfig's fields
    _refused(tmp_path, "model: {overrides: 'dropout=0.1'}\n", "'model.overrides'", "mapping of ModelConfig")
    _refused(tmp_path, "model: {overrides: {dropout: none}}\n", "'model.overrides.dropout'", "a number")
    _refused(tmp_path, "model: {overrides: {objectives: {gep_loss: l1}}}\n",
             "'model.overrides.objectives.gep_loss'", "one of mse, ce")
    _refused(tmp_path, "model: {overrides: {vocab_size: 10}}\n", "unknown key 'model.overrides.vocab_size'")


def test_out_of_range_values_are_refused(tmp_path):
    _refused(tmp_path, "data: {val_max_cells: -3}\n", "data.val_max_cells must be a positive integer", "-3")
    _refused(tmp_path, "data: {max_train_cells: 0}\n", "data.max_train_cells must be >= 1")
    _refused(tmp_path, "optim: {min_lr_ratio: 2}\n", "optim.min_lr_ratio must be in [0, 1]")
    _refused(tmp_path, "optim: {weight_decay: -0.1}\n", "optim.weight_decay must be >= 0")
    _refused(tmp_path, "data: {unknown_ratios: []}\n", "data.unknown_ratios must lie in (0, 1)")


def test_train_cli_exits_2_on_a_badly_typed_config(tmp_path):
    y = tmp_path / "cfg.yaml"
    y.write_text("preset: debug\ndata: {unknown_ratios: 0.1}\n")
    p = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", str(y),
                        "--shards", str(tmp_path / "nowhere")], check=False, cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
    assert p.returncode == 2, p.stderr
    assert "'data.unknown_ratios' must be a list of numbers" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
