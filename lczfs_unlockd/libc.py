"""The C library through ctypes: mount(2), umount2(2), prctl(2).

Declared once, loaded by full soname (``paths.LIBC``) on first use; a
failing call returns -1 and leaves errno for ``ctypes.get_errno()``.
"""

from __future__ import annotations

import ctypes
from functools import cache

from . import paths
from .errors import UnlockError

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


@cache
def libc() -> ctypes.CDLL:
    for name in paths.LIBC:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.mount.argtypes = (
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
        )  # fmt: skip
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
        lib.umount2.restype = ctypes.c_int
        lib.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        lib.prctl.restype = ctypes.c_int
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
