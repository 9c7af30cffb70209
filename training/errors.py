"""Errors a user can fix. The CLI turns :class:`TrainUsageError` into one message and exit code 2."""

from __future__ import annotations


class TrainUsageError(ValueError):
    """Bad user input to ``train`` (config, shards, cluster, tracking URI); the message names the fix."""


class ModelURIError(ValueError):
    """A model URI (``models:/name/version``, ``models:/name@alias``, a folder) that does not resolve."""
