"""The evaluation on CUDA (runs only with `pytest -m gpu` where a GPU is present): the same
API calls as on CPU, with the model's own attention backend (flash when installed)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embed_and_fine_tune_on_cuda(eval_debug_model_dir, symphony_small):
    import anndata as ad

    from eval.api import ScGPTModel

    m = ScGPTModel.load(str(eval_debug_model_dir), device="cuda")
    a = ad.read_h5ad(symphony_small)
    emb = m.embed_cells(a)
    assert emb.shape == (a.n_obs, m.config.d_model) and np.isfinite(emb).all()
    ann = m.fine_tune(a[a.obs["batch"] != "5p"].copy(), task="annotation", label_key="celltype", n_hvg=100, epochs=1)
    assert ann.predict(a[a.obs["batch"] == "5p"].copy()).shape == ((a.obs["batch"] == "5p").sum(),)
    integ = m.fine_tune(a, task="integration", label_key="celltype", batch_key="batch", n_hvg=100, epochs=1)
    assert np.isfinite(integ.embed_cells(a)).all()
