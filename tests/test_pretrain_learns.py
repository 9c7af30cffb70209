"""Pretraining learns: a CI-sized `train pretrain` of the `cpu` preset on the demo atlas's blood
shards predicts held-out cells' expression better than each gene's mean bin over the training
cells (and far better than its own random init), on cells it never trained on."""

from __future__ import annotations

from eval.api import ScGPTModel
from eval.gep import cells_from_shards, heldout_gep, training_gene_means
from tests.fixtures.training import run_train

CI_STEPS = "160"


def test_pretraining_beats_the_per_gene_mean_on_held_out_cells(demo_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_train(["pretrain", "--config", "cpu", "--shards", str(demo_shards), "--max-steps", CI_STEPS,
                                "--val-every", CI_STEPS, "--checkpoint-every", CI_STEPS, "--tracking-uri", uri,
                                "--storage-path", str(tmp_path / "runs"), "--model-name", "scgpt-cpu-ci"], tmp_path)
    assert code == 0, f"train pretrain failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
    model_uri = [ln for ln in out.splitlines() if ln.startswith("model: ")][-1].split()[1]
    model = ScGPTModel.load(model_uri, tracking_uri=uri, device="cpu")

    gene_mean = training_gene_means(demo_shards, len(model.vocab))
    genes, bins = cells_from_shards(demo_shards)  # the validation split: never trained on
    assert len(genes) >= 100
    trained = heldout_gep(model.model, genes, bins, gene_mean)
    untrained = heldout_gep(model.random_init().model, genes, bins, gene_mean)
    assert trained.n_tokens > 10_000
    # the trivial predictors are what they claim: the per-gene mean beats the cell's own mean
    assert trained.per_gene_mean < trained.cell_mean
    assert trained.model < trained.per_gene_mean, trained.to_dict()
    assert trained.model < 0.8 * untrained.model, (trained.to_dict(), untrained.to_dict())
