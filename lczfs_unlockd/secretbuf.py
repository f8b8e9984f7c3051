"""Buffers for key material: read straight into a bytearray, wipe in place.

Passphrases (from systemd-ask-password's pipe) and key files (from the
keystore) are read the same way: into a scratch buffer one byte larger than
the limit, copied into an exact-size bytearray without a temporary, and the
scratch buffer zeroed whatever happens.
"""

from __future__ import annotations

import os
import select
import time


def wipe(buf: bytearray | None) -> None:
    """Overwrite a key buffer in place."""
    if buf is not None:
        buf[:] = bytes(len(buf))


def _wait_readable(fd: int, deadline: float) -> None:
    """Until ``fd`` can be read; TimeoutError once ``deadline`` (time.monotonic()) passed."""
    poller = select.poll()  # not select(): any fd number
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the input did not end in time")
        # At most a day per poll(): it takes a C int of milliseconds.
        if poller.poll(min(left, 86400.0) * 1000):
            return


def read_bounded(fd: int, limit: int, *, deadline: float | None = None) -> bytearray | None:
    """Read ``fd`` to its end; None if it holds more than ``limit`` bytes.

    ``deadline`` (time.monotonic()): TimeoutError if the end has not come by
    then.  OSError propagates; the scratch buffer is wiped in every case.
    """
    scratch = bytearray(limit + 1)
    filled = 0
    try:
        with memoryview(scratch) as view:
            while filled <= limit:
                if deadline is not None:
                    _wait_readable(fd, deadline)
                n = os.readv(fd, [view[filled:]])
                if n == 0:
                    break
                filled += n
            if filled > limit:
                return None
            out = bytearray(filled)
            out[:] = view[:filled]  # no temporary copy
            return out
    finally:
        wipe(scratch)
