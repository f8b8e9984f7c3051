"""sd_notify(3): READY, STATUS, ERRNO, EXTEND_TIMEOUT_USEC — escaped and bounded.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon
can be run by hand.

Two rules of systemd's receiving end shape this module:

- A datagram longer than ``NOTIFY_BUFFER_MAX`` = ``PIPE_BUF`` = 4096 bytes
  is dropped whole, with every field in it ("Received notify message
  exceeded maximum size. Ignoring." in ``manager_dispatch_notify_fd``,
  src/core/manager.c; since v257 ``notify_recv_with_fds``,
  src/shared/notify-recv.c, receives into exactly 4096 bytes and refuses a
  truncated one).  So STATUS= is cut to :data:`STATUS_MAX` bytes and a
  message that would still not fit is sent as several datagrams, whole
  fields each, in order.
- Fields are split on "\\n" *and* "\\r"; a NUL makes systemd ignore the
  datagram.  So every free-text value goes through :func:`text.escape`.

This talks to the socket itself rather than through ``sdnotify``, which
encodes with Latin-1: any other character (an ellipsis, a host name in
Cyrillic) raised ``UnicodeEncodeError`` out of ``notify``, and é was sent as
a byte that is not UTF-8.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator

from .text import bound, escape

log = logging.getLogger("lczfs_unlockd.notify")

NOTIFY_MAX = 4096  # systemd's NOTIFY_BUFFER_MAX (PIPE_BUF): longer datagrams are dropped
# A datagram socket's queue is bounded (net.unix.max_dgram_qlen); if PID 1
# stops reading, a send blocks.  A status must never hold up a teardown.
SEND_TIMEOUT = 10.0
# The STATUS= value, in bytes of UTF-8: a status plus every other field this
# daemon sends (READY=1, ERRNO=, EXTEND_TIMEOUT_USEC=) always fit in one datagram.
STATUS_MAX = 3584

_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# Fields whose whole value the daemon writes itself: the only ones a legacy
# multi-line message may carry besides its one free-text field.
_FIXED = re.compile(r"(?:READY|STOPPING|RELOADING)=1|(?:ERRNO|EXTEND_TIMEOUT_USEC)=[0-9]{1,20}")
_ERRNO = re.compile(r"ERRNO=[0-9]{1,20}")

Field = tuple[str, str]


def parse_message(message: str) -> list[Field]:
    """Fields of a ``KEY=value`` message built by the daemon, free text kept whole.

    Leading fixed fields (``READY=1``, ``ERRNO=22``...), then one free-text
    field (STATUS=) that runs to the end of the message — except a last
    ``ERRNO=<digits>`` line, the form ``STATUS=...\\nERRNO=22`` takes.  A
    newline inside the free text is text, never a new field: ``READY=1`` or
    ``MAINPID=`` in a zpool label stays in the status, escaped.  (A status
    ending in a line ``ERRNO=<digits>`` of its own is the one ambiguity;
    :meth:`SystemdNotifier.send` has none.)
    """
    lines = message.split("\n")
    fields: list[Field] = []
    while lines and _FIXED.fullmatch(lines[0]):
        name, _, value = lines.pop(0).partition("=")
        fields.append((name, value))
    if not lines:
        return fields
    # Only in the STATUS-then-ERRNO form: after READY=1 a trailing ERRNO could
    # only have come from the text.
    trailer = None
    if not fields and len(lines) > 1 and _ERRNO.fullmatch(lines[-1]):
        trailer = lines.pop()
    name, sep, value = "\n".join(lines).partition("=")
    if not sep or not _NAME.fullmatch(name):
        # Free text without a field name of ours: say it as a status.
        name, value = "STATUS", "\n".join(lines)
    fields.append((name, value))
    if trailer is not None:
        name, _, value = trailer.partition("=")
        fields.append((name, value))
    return fields


def _encode(name: str, value: str) -> bytes:
    if _FIXED.fullmatch(f"{name}={value}"):
        return f"{name}={value}".encode()
    limit = STATUS_MAX if name == "STATUS" else NOTIFY_MAX - len(name) - 1
    return f"{name}={bound(escape(value), limit)}".encode()


def datagrams(fields: Iterable[Field]) -> Iterator[bytes]:
    """Encoded datagrams of at most NOTIFY_MAX bytes, whole fields in order."""
    current = b""
    for name, value in fields:
        if not _NAME.fullmatch(name):
            raise ValueError(f"not an sd_notify field name: {escape(name)!r}")
        field = _encode(name, value)
        if current and len(current) + 1 + len(field) > NOTIFY_MAX:
            yield current
            current = b""
        current = current + b"\n" + field if current else field
    if current:
        yield current


class SystemdNotifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        self._warned = False
        if not address:
            return
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace, sd_notify(3)
        elif not address.startswith("/"):
            log.warning("NOTIFY_SOCKET=%s: not a unix socket path; not notifying", escape(address))
            return
        self._address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.settimeout(SEND_TIMEOUT)

    def send(self, **fields: str | int) -> None:
        """Send fields, e.g. ``send(STATUS=text, ERRNO=22)``: each value is one field.

        Free text is escaped and STATUS is bounded; the fields go in order, in
        as few datagrams as the size limit allows.
        """
        self._send([(name, str(value)) for name, value in fields.items()])

    def notify(self, message: str) -> None:
        """Send a ``KEY=value`` message (see :func:`parse_message` for multi-line ones)."""
        self._send(parse_message(message))

    def _send(self, fields: list[Field]) -> None:
        if self._socket is None or self._address is None:
            return
        for datagram in datagrams(fields):
            try:
                self._socket.sendto(datagram, self._address)
            except OSError as exc:
                # Once as a warning: a heartbeat would repeat it every few seconds.
                level = logging.DEBUG if self._warned else logging.WARNING
                log.log(level, "sd_notify to %s failed: %s", escape(self._address), exc)
                self._warned = True
