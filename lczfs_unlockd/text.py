"""Text that leaves the daemon for systemd or the journal: escaped and bounded.

Much of what the daemon says quotes what the disk says — zpool's stderr,
a label's host name, dataset names — and whoever holds the disk writes
those.  sd_notify separates fields with a newline *or* a carriage return
(systemd's notify parser splits on "\\n\\r"), and the journal starts a new
entry at every newline, so a crafted host name could otherwise forge
``READY=1``, ``MAINPID=`` or ``ERRNO=`` lines, or a log line of its own.

:func:`escape` turns every such character into visible text: C0 controls
(newline, CR, tab, ...), DEL, C1 controls (NEL among them), the Unicode line
and paragraph separators, and lone surrogates (undecodable bytes kept by
``surrogateescape``), which cannot be encoded to UTF-8 at all.

Pure and self-contained (no import of the package), and done by hand: the
initrd's trimmed standard library has no ``unicode_escape`` codec.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _replacement(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line, every control character written out (``\\n``, ``\\x1b``)."""
    return _SPECIAL.sub(_replacement, text)


def bound(text: str, max_bytes: int) -> str:
    """``text`` cut so that its UTF-8 form takes at most ``max_bytes`` bytes.

    A cut text ends with "… (N more characters)"; it is never cut inside a
    character or inside one of :func:`escape`'s sequences.
    """
    if len(text.encode("utf-8", "surrogatepass")) <= max_bytes:
        return text
    keep = len(text)
    while True:
        marker = f"… ({len(text) - keep} more characters)"
        budget = max_bytes - len(marker.encode())
        if budget < 0:
            return marker.encode()[:max_bytes].decode("utf-8", "ignore")
        head = text.encode("utf-8", "surrogatepass")[:budget].decode("utf-8", "ignore")
        # Do not end in the middle of an escape sequence such as "\x1b".
        tail = head.rfind("\\")
        if tail >= 0 and len(head) - tail <= 6:
            head = head[:tail]
        if len(text) - len(head) == len(text) - keep:
            return head + marker
        keep = len(head)


def is_number(text: str, max_digits: int = 20) -> bool:
    """``text`` is 1 to ``max_digits`` ASCII digits.

    ``str.isdigit`` alone accepts "²" and "٣", which ``int`` then rejects
    (a ValueError where a value from the disk was expected to be checked),
    and any length (``int`` refuses more than 4300 digits).
    """
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()
