"""Errors that carry a message for the user (what is wrong and how to fix it)."""

from __future__ import annotations

USAGE_EXIT_CODE = 2  # bad input / usage errors, as argparse does


class IngestError(ValueError):
    """Bad input to an ingest command. The CLI prints the message and exits with code 2."""

    exit_code = USAGE_EXIT_CODE
