"""SIGINT and SIGTERM of a command that runs a Ray job: stop cleanly instead of dying mid-call.

``stop_on_signals()`` (the entry points wrap their work in it) makes either signal raise
:class:`Interrupted` in the main thread, wherever the command is waiting (``ray.get``,
``trainer.fit``, a file write). The command's own ``finally`` blocks then run as usual: Ray is shut
down by the process that started it (so no raylet, GCS or worker is left behind), temporary files
are removed, and the entry point prints one line saying what was kept and how to continue, and
exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell does.

The handler is installed even where SIGINT arrived ignored (a job started with ``&`` by a
non-interactive shell): Ray's own handlers would otherwise meet the signal half-way (a segfault,
exit 139, in the fault study). A second signal while the first is being handled is noted and
otherwise ignored, so that the clean-up itself is not cut short; SIGKILL still ends everything.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first signal of this process, once one came
_active = False  # inside stop_on_signals()


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException (like KeyboardInterrupt), so that ``except
    Exception`` clean-ups let it through; ``exit_code`` is what the command exits with."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.kept: str | None = None  # what the command kept and how to continue, filled in on the way out
        super().__init__(f"interrupted by {self.name}")


def received() -> int | None:
    """The signal number that interrupted this process, or None."""
    return _received


def _handler(signum: int, frame) -> None:
    global _received
    if _received is not None:  # already stopping: let the clean-up finish
        print(f"({signal.Signals(signum).name} again: still stopping cleanly; SIGKILL ends it at once)",
              file=sys.stderr, flush=True)
        return
    _received = signum
    raise Interrupted(signum)


def reinstall() -> None:
    """Take the signals back after a library replaced their handlers (``ray.init`` installs its own
    SIGTERM handler, which exits at once with code 1); a no-op outside :func:`stop_on_signals`."""
    if _active:
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block (main thread only), SIGINT / SIGTERM raise :class:`Interrupted`."""
    global _received, _active
    _received = None
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _active = True
    try:
        yield
    finally:
        _active = False
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
