"""Configs, presets, parameter counts, FLOPs, and the package's import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scgpt_model.config import ModelConfig
from scgpt_model.flops import estimate_flops, model_flops_per_cell
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset


def test_presets_and_paper_base_size():
    base = get_preset("base", 60_000)
    assert (base.d_model, base.n_layers, base.n_heads, base.d_ffn, base.dropout, base.n_bins, base.max_seq_len) == \
        (512, 12, 8, 512, 0.2, 51, 1200)
    n = ScGPT(base).num_parameters()
    assert 49e6 < n < 53e6, n  # paper: ~51M with a 60k-gene vocabulary
    assert get_preset("debug", 100).d_model < get_preset("small", 100).d_model < base.d_model
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("huge", 100)


def test_config_round_trip_and_validation():
    cfg = get_preset("small", 1000, n_batches=3, objectives={"ecs": True, "dar": True})
    assert cfg.objectives.ecs and cfg.objectives.ecs_beta == 0.6 and cfg.objectives.ecs_weight == 10.0
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "d_modle": 3})
    with pytest.raises(ValueError, match="divisible"):
        get_preset("debug", 100, n_heads=5)
    with pytest.raises(ValueError, match="n_batches"):
        get_preset("debug", 100, objectives={"dar": True})
    with pytest.raises(ValueError, match="n_cell_types"):
        get_preset("debug", 100, objectives={"cls": True})
    with pytest.raises(ValueError, match="norm_scheme"):
        get_preset("debug", 100, norm_scheme="sandwich")


def test_flops_counts():
    cfg = get_preset("base", 60_000)
    dense = model_flops_per_cell(cfg, unknown_ratio=None)
    gen = model_flops_per_cell(cfg)  # ratio 0.5
    assert gen < dense
    # the non-attention part is ~6 * (non-embedding params) per token for training
    n = ScGPT(cfg).num_parameters(exclude_embeddings=True)
    per_token_no_attn = estimate_flops(cfg, 1, 0) - 3 * cfg.n_layers * 4 * cfg.d_model  # minus the self key term
    assert 0.8 < per_token_no_attn / (6 * n) < 1.2
    assert estimate_flops(cfg, 100, training=False) * 3 == estimate_flops(cfg, 100)


def test_package_imports_no_ray_deepspeed_mlflow():
    code = ("import sys, scgpt_model, scgpt_model.model, scgpt_model.batching, scgpt_model.checkpoint, "
            "scgpt_model.generation, scgpt_model.flops, scgpt_model.presets, scgpt_model.attention\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'mlflow'))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
