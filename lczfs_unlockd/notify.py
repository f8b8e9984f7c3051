"""sd_notify(3) through sdnotify: READY, STATUS, ERRNO, EXTEND_TIMEOUT_USEC.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon
can be run by hand.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lczfs_unlockd.notify")


class SystemdNotifier:
    def __init__(self) -> None:
        self._notifier: object | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            # debug=True makes sdnotify raise instead of swallowing socket errors;
            # we log them ourselves.
            self._notifier = sdnotify.SystemdNotifier(debug=True)

    def notify(self, message: str) -> None:
        if self._notifier is None:
            return
        try:
            self._notifier.notify(message)  # type: ignore[attr-defined]
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
