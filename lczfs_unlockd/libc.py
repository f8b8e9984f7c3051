"""The C library through ctypes: mount(2), umount2(2), prctl(2).

Declared once, loaded by full soname (``paths.LIBC``) on first use; a
failing call returns -1 and leaves errno for ``ctypes.get_errno()``.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

from . import paths
from .errors import UnlockError

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


Signature = tuple[Any, list[Any]]  # (restype, argtypes)


def declare(lib: ctypes.CDLL, signatures: dict[str, Signature]) -> None:
    """Give each function its C signature: one table per library, no call unchecked."""
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


_c = ctypes
_SIGNATURES: dict[str, Signature] = {
    "mount": (_c.c_int, [_c.c_char_p, _c.c_char_p, _c.c_char_p, _c.c_ulong, _c.c_char_p]),
    "umount2": (_c.c_int, [_c.c_char_p, _c.c_int]),
    "prctl": (_c.c_int, [_c.c_int, _c.c_ulong, _c.c_ulong, _c.c_ulong]),
}


@cache
def libc() -> ctypes.CDLL:
    for name in paths.LIBC:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        declare(lib, _SIGNATURES)
        return lib
    raise UnlockError(f"cannot load the C library ({', '.join(paths.LIBC)})")


def forbid_core_dumps() -> None:
    """No core dump (nor ptrace by another uid) of a process that will hold keys.

    systemd's ``LimitCORE=0`` stops the dump file; this also keeps
    /proc/PID/mem and coredump helpers away, whoever starts the daemon.
    """
    if libc().prctl(PR_SET_DUMPABLE, 0, 0, 0) != 0:
        raise UnlockError(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")


def dumpable() -> int:
    return int(libc().prctl(PR_GET_DUMPABLE, 0, 0, 0))
