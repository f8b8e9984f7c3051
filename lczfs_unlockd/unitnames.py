"""systemd unit names: ``systemd-escape`` and the names of the units we mask.

Pure functions, no I/O: the same names are computed by the daemon (what to
mask), its configuration check and the tests.
"""

from __future__ import annotations

import string

# systemd-escape(1): these pass through; "/" becomes "-", the rest \xNN.
_VALID = set(string.ascii_letters + string.digits + ":_.")


def escape(text: str) -> str:
    """``systemd-escape TEXT``."""
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif ch in _VALID and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def escape_path(path: str) -> str:
    """``systemd-escape --path PATH``."""
    trimmed = "/".join(p for p in path.split("/") if p)
    return escape(trimmed) if trimmed else "-"


def mount_unit(path: str) -> str:
    return f"{escape_path(path)}.mount"


def cryptsetup_unit(name: str) -> str:
    return f"systemd-cryptsetup@{escape(name)}.service"
