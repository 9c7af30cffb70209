"""Pretraining on Ray Train + DeepSpeed, tracked and registered in MLflow.

``train pretrain`` (``training.cli``) -> driver (``training.launch``: checks, MLflow run,
TorchTrainer, export + registration) -> workers (``training.worker``: the sharded Parquet
pipeline of ``training.data``, the DeepSpeed engine of ``training.parallelize``).
``training.registry.load_registered_model`` loads a registered version back for ``eval/``.
"""
