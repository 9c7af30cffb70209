"""Errors that carry a message for the user (what is wrong and how to fix it)."""

from __future__ import annotations

import errno
from pathlib import Path

USAGE_EXIT_CODE = 2  # bad input / usage errors, as argparse does


class IngestError(ValueError):
    """Bad input to an ingest command. The CLI prints the message and exits with code 2."""

    exit_code = USAGE_EXIT_CODE


class DiskFull(IngestError):
    """No space left where ingest writes. Finished shards are kept (the same command resumes);
    exit 1: not bad input."""

    exit_code = 1

    @classmethod
    def at(cls, path: str | Path, out: str | Path) -> DiskFull:
        return cls(f"no space left on the device of --out {out} (writing {path}): free space there or choose "
                   "another --out; finished shards are kept and re-running the same command resumes")


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, as Python raises it or as pyarrow words it (its OSError may carry no errno)."""
    return isinstance(e, OSError) and (e.errno == errno.ENOSPC or "No space left on device" in str(e))
