"""Journal-friendly logging.

Under systemd, stdout/stderr are journal streams (``$JOURNAL_STREAM``): each
line gets an sd-daemon priority prefix (``<3>`` error ... ``<7>`` debug) so
``journalctl -u lczfs-unlockd -p warning`` works, and journald strips it
before the console sees the line.  On a terminal the prefix is left out.

Nothing logged here ever contains key material: callers pass names, paths
and numbers only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

log = logging.getLogger("lczfs_unlockd")

# sd-daemon(3) priorities for Python's levels.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _is_journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd gave us (systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _Formatter(logging.Formatter):
    def __init__(self, prefix: bool) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and log.isEnabledFor(logging.DEBUG):
            message += "\n" + self.formatException(record.exc_info)
        if self.prefix:
            priority = _PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{priority}>{line}" for line in message.splitlines() or [""])
        return message


def setup(*, debug: bool, stream: TextIO | None = None) -> None:
    """Configure the package logger; ``SYSTEMD_LOG_LEVEL=debug`` also enables debug."""
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("SYSTEMD_LOG_LEVEL", "").lower() in ("debug", "7"):
        debug = True
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(prefix=_is_journal_stream(stream)))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)


@contextlib.contextmanager
def step(
    what: str,
    status: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """Log the start and the end of one step with its duration.

    ``status`` receives the step's text (systemd's ``STATUS=``).
    """
    start = clock()
    log.info("%s ...", what)
    if status is not None:
        status(what)
    try:
        yield
    except BaseException:
        log.debug("%s: failed after %.2f s", what, clock() - start)
        raise
    log.info("%s: done in %.2f s", what, clock() - start)
