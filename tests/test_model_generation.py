"""K-step generation: every requested gene filled in exactly K steps, reproducible under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgpt_model.generation import generate
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from tests.fixtures.model import random_cells

V = 300


def _model(**kw):
    torch.manual_seed(0)
    return ScGPT(get_preset("debug", V, **kw))


@pytest.mark.parametrize("head", ["ce", "mse"])
def test_gene_prompt_fills_every_gene_in_exactly_k_steps(head, monkeypatch):
    model = _model(objectives={"gep_loss": head})
    rng = np.random.default_rng(0)
    prompt_g, prompt_v = random_cells(rng, 3, V, min_len=5, max_len=20)
    targets = [rng.choice(np.setdiff1d(np.arange(3, V), pg), size=n, replace=False)
               for pg, n in zip(prompt_g, (10, 7, 3))]
    calls = []
    real_forward = ScGPT.forward
    monkeypatch.setattr(ScGPT, "forward", lambda self, *a, **k: calls.append(1) or real_forward(self, *a, **k))
    k = 4
    res = generate(model, targets, n_steps=k, prompt_genes=prompt_g, prompt_values=prompt_v)
    assert res.n_steps == k and len(calls) == k
    for g, t, v, st in zip(res.genes, targets, res.values, res.step):
        assert np.array_equal(g, t)
        assert ((v >= 0) & (v <= model.cfg.n_bins - 1)).all() and np.array_equal(v, np.round(v))
        assert set(st.tolist()) <= set(range(k)) and (st >= 0).all()
        counts = np.bincount(st, minlength=k)
        expected = [len(a) for a in np.array_split(np.arange(len(t)), k)]
        assert counts.tolist() == expected  # the most confident 1/K each step
    assert model.training  # mode restored


def test_generation_is_reproducible_and_seed_controls_sampling():
    model = _model(objectives={"gep_loss": "ce"})
    rng = np.random.default_rng(1)
    targets = [rng.choice(np.arange(3, V), size=12, replace=False) for _ in range(2)]
    prompt = torch.randn(2, model.cfg.d_model)  # cell prompt at <cls>
    a = generate(model, targets, n_steps=3, cell_prompt=prompt, seed=5, sample=True)
    b = generate(model, targets, n_steps=3, cell_prompt=prompt, seed=5, sample=True)
    c = generate(model, targets, n_steps=3, cell_prompt=prompt, seed=6, sample=True, temperature=5.0)
    for x, y in zip(a.values, b.values):
        assert np.array_equal(x, y)
    for x, y in zip(a.step, b.step):
        assert np.array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.values, c.values))
    g1 = generate(model, targets, n_steps=3, cell_prompt=prompt)
    g2 = generate(model, targets, n_steps=3, cell_prompt=prompt)
    assert all(np.array_equal(x, y) for x, y in zip(g1.values, g2.values))
    # a different cell prompt gives a different generation (the prompt is used)
    g3 = generate(model, targets, n_steps=3, cell_prompt=prompt * 5 + 1)
    assert any(not np.array_equal(x, y) for x, y in zip(g1.values, g3.values))


def test_more_steps_than_genes_and_bad_arguments():
    model = _model()
    res = generate(model, [np.array([5, 6])], n_steps=4)
    assert res.n_steps == 4 and sorted(res.step[0].tolist()) == [0, 1]
    with pytest.raises(ValueError, match="n_steps"):
        generate(model, [np.array([5])], n_steps=0)
    with pytest.raises(ValueError, match="cross-entropy"):
        generate(model, [np.array([5])], n_steps=1, sample=True)
    with pytest.raises(ValueError, match="cell_prompt"):
        generate(model, [np.array([5])], n_steps=1, cell_prompt=torch.zeros(2, 3))
