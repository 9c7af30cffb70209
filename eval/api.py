"""A small user-level API over a pretrained scGPT (in the style of scvi-tools' model classes).

    >>> m = ScGPTModel.load("models:/scgpt-debug/1")          # or a local checkpoint folder
    >>> emb = m.embed_cells(adata)                            # zero-shot cell embeddings
    >>> genes, gemb = m.embed_genes()                         # gene embeddings
    >>> ann = m.fine_tune(ref, task="annotation", label_key="celltype", epochs=10)
    >>> ann.predict(query)                                    # cell-type labels

The network itself stays in ``scgpt_model``; this class only prepares data, batches it and
calls the model. ``fine_tune`` returns a new object; the pretrained one is left untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import torch

from eval.data import PreparedData, prepare
from eval.errors import EvalError
from eval.finetune import (FineTuneConfig, FineTuneResult, Task, embed_fixed_genes, fine_tune,
                           predict_labels)
from eval.genes import ensembl_table
from scgpt_model.batching import collate_all_genes
from scgpt_model.config import ModelConfig
from scgpt_model.model import ScGPT
from scgpt_model.schema import N_SPECIAL
from scgpt_model.vocab import GeneVocab

log = logging.getLogger(__name__)

# paper §4.7: HVG counts given to every method
DEFAULT_HVG = {"annotation": 3000, "integration": 1200}


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[ScGPT, GeneVocab, ModelConfig, dict]:
    """Resolve a model URI (registry or local folder) -> (model, vocab, config, info).

    Registry URIs go through ``training.registry.load_registered_model``; a failure to resolve
    becomes an ``EvalError`` naming the URI.
    """
    from training.registry import load_registered_model  # a local folder or a registered version

    try:
        model, vocab, cfg, info = load_registered_model(uri, tracking_uri=tracking_uri)
    except ValueError as e:  # training.errors.ModelURIError is a ValueError
        raise EvalError(f"model {uri!r} could not be loaded: {e}") from e
    info = dict(info or {})
    info.setdefault("uri", uri)
    model.eval()
    return model, vocab, cfg, info


def default_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class ScGPTModel:
    """A pretrained (or fine-tuned) scGPT with its vocabulary, ready for AnnData in, arrays out."""

    model: ScGPT
    vocab: GeneVocab
    config: ModelConfig
    info: dict = field(default_factory=dict)
    device: str = "cpu"
    task: Task | None = None  # set on fine-tuned objects
    finetune: FineTuneResult | None = None
    prep_kwargs: dict = field(default_factory=dict)  # how the fine-tuning data was prepared

    # construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, uri: str, tracking_uri: str | None = None, device: str = "auto") -> ScGPTModel:
        model, vocab, cfg, info = load_model(uri, tracking_uri)
        dev = default_device(device)
        return cls(model=model.to(dev), vocab=vocab, config=cfg, info=info, device=dev)

    def random_init(self, seed: int = 0) -> ScGPTModel:
        """The same architecture and vocabulary with fresh weights (the 'what did pretraining
        buy' baseline)."""
        from eval.finetune import RANDOM_INIT_SEED_OFFSET

        torch.manual_seed(seed + RANDOM_INIT_SEED_OFFSET)
        m = ScGPT(self.config).to(self.device)
        return ScGPTModel(model=m, vocab=self.vocab, config=self.config,
                          info={**self.info, "random_init": True}, device=self.device)

    # data -----------------------------------------------------------------------------------
    def prepare(self, adata: ad.AnnData | PreparedData, *, name: str = "adata", label_key: str | None = None,
                batch_key: str | None = None, n_hvg: int = 0, max_cells: int = 0, seed: int = 0,
                require_labels: bool = True) -> PreparedData:
        if isinstance(adata, PreparedData):
            return adata
        return prepare(adata, self.vocab, name=name, label_key=label_key, batch_key=batch_key, n_hvg=n_hvg,
                       max_cells=max_cells, seed=seed, n_bins=self.config.n_bins, require_labels=require_labels)

    # embeddings -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed_cells(self, adata: ad.AnnData | PreparedData, *, batch_size: int = 64, seed: int = 0,
                    batch_key: str | None = None, style: str | None = None) -> np.ndarray:
        """(n_cells, d_model) cell embeddings: the final ``<cls>`` state, or with ``style="avg-pool"``
        the mean final state of the cell's genes (None: the model's ``cell_emb_style``).

        Pretrained model (zero-shot): each cell's expressed genes among the vocabulary with
        their bins, sub-sampled to ``max_seq_len`` with a seeded generator. Fine-tuned model:
        the HVG set it was fine-tuned on, with zeros if it was fine-tuned with them.
        """
        if self.finetune is not None:
            data = self._prepare_like_finetune(adata, batch_key)
            return embed_fixed_genes(self.model, data, batch_names=self.finetune.batches or None,
                                     batch_size=batch_size, device=self.device, style=style,
                                     include_zeros=self.finetune.include_zeros)
        data = self.prepare(adata, require_labels=False)
        self.model.eval()
        rng = np.random.default_rng(seed)
        out = []
        B = data.bins
        for s in range(0, data.n_cells, batch_size):
            rows = range(s, min(s + batch_size, data.n_cells))
            genes = [data.token_ids[B.indices[B.indptr[r]:B.indptr[r + 1]]] for r in rows]
            vals = [B.data[B.indptr[r]:B.indptr[r + 1]] for r in rows]
            batch = collate_all_genes(genes, vals, seed=rng, mask_ratio=0.0, max_seq_len=self.config.max_seq_len,
                                      backend=self.model.collate_backend()).to(self.device)
            out.append(self.model.embed_cells(batch, style=style).float().cpu().numpy())
        return np.concatenate(out)

    def embed_genes(self, genes: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(gene keys, (n_genes, d_model) embeddings). ``genes``: vocabulary keys or symbols;
        None = the whole vocabulary (special tokens excluded)."""
        if genes is None:
            keys = self.vocab.genes
            ids = np.arange(N_SPECIAL, len(self.vocab))
        else:
            keys, ids = [], []
            sym2key = self._symbol_to_key()
            for g in genes:
                k = g if g in self.vocab else sym2key.get(g)
                if k is not None and k in self.vocab:
                    keys.append(g)
                    ids.append(self.vocab[k])
            if not ids:
                raise EvalError(f"none of the {len(genes)} genes is in the model's vocabulary")
            ids = np.asarray(ids)
        emb = self.model.gene_embeddings(torch.as_tensor(ids, device=self.device)).float().cpu().numpy()
        return keys, emb

    def _symbol_to_key(self) -> dict[str, str]:
        if self.vocab.key == "feature_name":
            return {}
        from eval.genes import symbol_table

        return symbol_table()

    def symbols(self, keys: list[str]) -> list[str]:
        """Gene symbols of vocabulary keys ('' when unknown)."""
        if self.vocab.key == "feature_name":
            return list(keys)
        inv = ensembl_table()
        return [inv.get(k, "") for k in keys]

    # fine-tuning ----------------------------------------------------------------------------
    def fine_tune(self, adata: ad.AnnData | PreparedData, task: Task = "annotation", *,
                  label_key: str | None = None, batch_key: str | None = None, n_hvg: int | None = None,
                  epochs: int = 30, batch_size: int = 32, seed: int = 0, from_scratch: bool = False,
                  name: str = "adata", lr: float | None = None) -> ScGPTModel:
        """Fine-tune for ``task`` (paper §4.5, §4.8) and return the fine-tuned model.

        ``from_scratch=True`` trains the same architecture from random weights with the same
        budget (the score tables' 'random init' rows).
        """
        if task not in ("annotation", "integration"):
            raise EvalError(f"fine_tune task must be 'annotation' or 'integration', got {task!r}")
        n_hvg = DEFAULT_HVG[task] if n_hvg is None else n_hvg
        data = self.prepare(adata, name=name, label_key=label_key, batch_key=batch_key, n_hvg=n_hvg, seed=seed)
        if task == "annotation" and data.labels is None:
            raise EvalError("annotation fine-tuning needs cell-type labels; pass label_key")
        if task == "integration" and (data.batches is None or len(set(data.batches)) < 2):
            raise EvalError("integration fine-tuning needs a batch key with at least 2 batches")
        ft = FineTuneConfig(task=task, epochs=epochs, batch_size=batch_size, seed=seed, device=self.device, lr=lr)
        res = fine_tune(None if from_scratch else self.model, self.config, data, ft, name=name)
        return ScGPTModel(model=res.model, vocab=self.vocab, config=res.model.cfg,
                          info={**self.info, "fine_tuned": task, "random_init": from_scratch},
                          device=self.device, task=task, finetune=res,
                          prep_kwargs={"token_ids": data.token_ids, "symbols": data.symbols,
                                       "batch_key": batch_key})

    def _prepare_like_finetune(self, adata: ad.AnnData | PreparedData, batch_key: str | None) -> PreparedData:
        """Cells on exactly the fine-tuning gene set, in the same column order."""
        want = self.prep_kwargs["token_ids"]
        if isinstance(adata, PreparedData):
            data = adata
        else:
            data = self.prepare(adata, batch_key=batch_key or self.prep_kwargs.get("batch_key"),
                                require_labels=False)
        if np.array_equal(data.token_ids, want):
            return data
        from eval.data import align_genes

        return align_genes(data, want, self.prep_kwargs["symbols"])

    def predict(self, adata: ad.AnnData | PreparedData, *, batch_size: int = 64) -> np.ndarray:
        """Cell-type labels from an annotation fine-tuned model."""
        if self.task != "annotation" or self.finetune is None:
            raise EvalError("predict() needs a model fine-tuned with task='annotation'")
        data = self._prepare_like_finetune(adata, None)
        return predict_labels(self.model, data, self.finetune.classes, batch_size=batch_size, device=self.device,
                              include_zeros=self.finetune.include_zeros)
