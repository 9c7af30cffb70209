"""Errors the evaluation raises for bad user input; the CLI turns them into exit code 2."""

from __future__ import annotations


class EvalError(ValueError):
    """Input the evaluation cannot use (dataset, keys, model URI); the message names the fix."""
