"""MLflow pyfunc wrapper of a pretrained scGPT: ``predict`` returns cell embeddings.

Input: a pandas DataFrame with one row per cell and list columns ``genes`` (vocabulary ids)
and ``bins`` (binned values, aligned). Output: a (n_cells, d_model) float32 array. It imports
only ``scgpt_model``, which is shipped with the model (``code_paths``).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np

from scgpt_model.schema import BINS, GENES


class ScGPTPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from scgpt_model.checkpoint import load_pretrained

        self.model, self.vocab, self.cfg = load_pretrained(context.artifacts["model_dir"])
        self.model.eval()

    def predict(self, context, model_input, params=None):  # noqa: ARG002 (MLflow signature)
        from scgpt_model.batching import collate_generative

        genes = [np.asarray(g, dtype=np.int64) for g in model_input[GENES]]
        bins = [np.asarray(b, dtype=np.float32) for b in model_input[BINS]]
        out = []
        for i in range(0, len(genes), 64):  # (64, L) padded batches keep memory flat
            batch = collate_generative(genes[i:i + 64], bins[i:i + 64], max_seq_len=self.cfg.max_seq_len,
                                       seed=0, unknown_ratios=(0.0,), backend="sdpa")
            out.append(self.model.embed_cells(batch).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.cfg.d_model), np.float32)
