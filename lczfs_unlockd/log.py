"""Journal-friendly logging.

Under systemd, stdout/stderr are journal streams (``$JOURNAL_STREAM``): each
line gets an sd-daemon priority prefix (``<3>`` error ... ``<7>`` debug) so
``journalctl -u lczfs-unlockd -p warning`` works, and journald strips it
before the console sees the line.  On a terminal the prefix is left out.

Every message is escaped (:func:`text.escape`): it often quotes what the
disk says (zpool's stderr, label fields), and a newline in it would start a
journal entry of its own; a record is always one line, a traceback (only
with --debug) one line per frame.

Nothing logged here ever contains key material: callers pass names, paths
and numbers only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TextIO

from .text import escape

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


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def traceback_lines(exc_info: ExcInfo) -> list[str]:
    """A traceback as lines, each exception's text escaped onto its own line.

    ``formatException`` would put an exception message's newlines (zpool's
    stderr) into the output as they are.
    """
    lines: list[str] = []

    def add(te: traceback.TracebackException) -> None:
        if te.__cause__ is not None:
            add(te.__cause__)
            lines.append("The above exception was the direct cause of the following exception:")
        elif te.__context__ is not None and not te.__suppress_context__:
            add(te.__context__)
            lines.append("During handling of the above exception, another exception occurred:")
        if te.stack:
            lines.append("Traceback (most recent call last):")
            for chunk in te.stack.format():
                lines.extend(escape(line) for line in chunk.rstrip("\n").split("\n"))
        lines.extend(escape(chunk.rstrip("\n")) for chunk in te.format_exception_only())

    add(traceback.TracebackException(*exc_info))
    return lines


class _Formatter(logging.Formatter):
    def __init__(self, prefix: bool) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        lines = [escape(record.getMessage())]
        if record.exc_info and record.exc_info[0] is not None and log.isEnabledFor(logging.DEBUG):
            lines += traceback_lines(record.exc_info)
        if self.prefix:
            priority = _PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{priority}>{line}" for line in lines)
        return "\n".join(lines)


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


# --- timings (--timings PATH) ---------------------------------------------------
# When each stage of the run first happened, on CLOCK_MONOTONIC (systemd's
# clock, so they line up with the unit's ExecMainStartTimestampMonotonic),
# with the resident set size at that moment: what bench/ measures.  Off
# unless asked for; names and numbers only.

_timings: dict[str, dict[str, int | float]] | None = None


def record_timings() -> None:
    """From now on, :func:`mark` records (``--timings``)."""
    global _timings
    _timings = {}


def memory(*fields: str) -> dict[str, int]:
    """Those ``Vm*`` fields of /proc/self/status, in bytes (left out if it cannot tell)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def mark(event: str) -> None:
    """The first time ``event`` happens in this run (later ones are not recorded)."""
    if _timings is not None and event not in _timings:
        _timings[event] = {"t": time.monotonic(), "rss": memory("VmRSS").get("VmRSS", 0)}


def timings() -> dict[str, dict[str, int | float]] | None:
    """What :func:`mark` recorded, None when not recording."""
    return None if _timings is None else dict(_timings)
