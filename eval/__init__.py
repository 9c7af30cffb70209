"""Evaluation of scGPT checkpoints: fine-tune or embed, score with the paper's metrics, log to MLflow.

Modules: ``data`` / ``genes`` (count checks, vocabulary matching, HVGs, binning), ``metrics``
(annotation and scib integration scores), ``baselines`` (logistic regression, PCA, Harmony,
co-expression), ``genenet`` (gene networks vs Reactome), ``finetune`` (CLS and integration
objectives), ``api`` (``ScGPTModel``, the user-level object), ``tasks`` / ``runner`` (the four
tasks and the suite as MLflow runs), ``tracking``, ``plots``, ``report``, ``cli`` (``evaluate``).
"""
