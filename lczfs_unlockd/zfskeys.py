"""ZFS keys on this machine: read a key file from the keystore safely, load keys.

:func:`read_key_file` opens a key file beneath the keystore's mount point
without following any symlink; :class:`PyzfsKeyLoader` hands a wrapping key
to the kernel through OpenZFS's pyzfs (``lzc_load_key``).  How a key file
becomes a wrapping key is :mod:`keyformat`'s.

Key material only ever lives in ``bytearray``s that callers wipe
(``finally``); nothing here logs or formats it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import log as logsetup
from . import paths
from .errors import KeyAlreadyLoadedError, KeyFileError, KeyLoadError, KeyRejectedError
from .secretbuf import read_bounded

log = logging.getLogger("lczfs_unlockd.zfskeys")

KEY_FILE_LIMIT = 4096  # a key file is 32 bytes, 65 or at most 513: anything big is wrong


@contextmanager
def _dirfd(path: str, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def read_key_file(
    mountpoint: str, path: str, *, dataset: str, limit: int = KEY_FILE_LIMIT
) -> bytearray:
    """Read a key file that must lie beneath ``mountpoint``.

    Each path component is opened relative to its parent with ``O_NOFOLLOW``
    so that no symlink (and no ``..``) can lead outside the keystore; the
    file must be a regular file of at most ``limit`` bytes.
    """
    where = f"key file {path} of {dataset}"
    rel = (
        path[len(mountpoint.rstrip("/")) + 1 :]
        if path.startswith(mountpoint.rstrip("/") + "/")
        else None
    )
    if rel is None or not rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise KeyFileError(f"{where} is not beneath the keystore mount point {mountpoint}")
    *dirs, name = rel.split("/")
    try:
        with _dirfd(mountpoint) as root:
            fd = root
            opened: list[int] = []
            try:
                for part in dirs:
                    fd = os.open(
                        part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                    opened.append(fd)
                # O_NONBLOCK: a FIFO planted in the keystore must not hang the boot.
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
                kfd = os.open(name, flags, dir_fd=fd)
            finally:
                for d in opened:
                    os.close(d)
    except FileNotFoundError:
        raise KeyFileError(
            f"{where} does not exist in the keystore: copy the key there or fix keylocation "
            f"(zfs set keylocation=file://... {dataset})",
            errno=errno.ENOENT,
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise KeyFileError(
                f"{where}: a symlink in the path is not allowed; use a regular file"
            ) from None
        raise KeyFileError(
            f"{where}: cannot open: {exc.strerror}", errno=exc.errno or errno.EIO
        ) from None
    try:
        st = os.fstat(kfd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{where} is not a regular file")
        if st.st_size > limit:
            raise KeyFileError(
                f"{where} is {st.st_size} bytes, more than a key can be ({limit}): wrong file?"
            )
        try:
            out = read_bounded(kfd, limit)
        except OSError as exc:
            raise KeyFileError(
                f"{where}: read error: {exc.strerror}", errno=exc.errno or errno.EIO
            ) from None
        if out is None:
            raise KeyFileError(f"{where} is more than {limit} bytes: wrong file?")
        return out
    finally:
        os.close(kfd)


# --- pyzfs -------------------------------------------------------------------


def _pin_pyzfs_libraries() -> Any:
    """Import pyzfs with its libraries loaded by full soname.

    pyzfs dlopen()s "zfs_core" and "nvpair" lazily; cffi resolves such short
    names with ctypes.util.find_library, which runs ldconfig and gcc — an
    initrd has neither.  A name with a dot is passed to dlopen() as is.
    With declarations generated at build time (pyzfs_ffi) no C is parsed.
    """
    from . import pyzfs_ffi

    libraries = {
        "libzfs_core": _first_loadable(paths.LIBZFS_CORE),
        "libnvpair": _first_loadable(paths.LIBNVPAIR),
    }
    if pyzfs_ffi.preload(libraries):
        log.debug("pyzfs: using declarations parsed at build time")
    else:
        from libzfs_core import bindings

        for name, library in libraries.items():
            lazy = getattr(bindings, name).lib
            if getattr(lazy, "_lib", None) is None and hasattr(lazy, "_libname"):
                lazy._libname = library
    import libzfs_core

    return libzfs_core


def _first_loadable(candidates: tuple[str, ...]) -> str:
    for name in candidates:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return name
    raise KeyLoadError(
        f"cannot load {' or '.join(candidates)}: install the ZFS userland libraries in the initrd",
        errno=errno.ENOENT,
    )


class PyzfsKeyLoader:
    """KeyLoader over OpenZFS's pyzfs (``libzfs_core.lzc_load_key``).

    pyzfs's own load-key error messages are swapped upstream (its
    "Failed to load"/"Failed to verify" branches are inverted), so errno is
    translated here.
    """

    def __init__(self) -> None:
        self._lzc: Any = None

    def _module(self) -> Any:
        if self._lzc is None:
            logsetup.mark("pyzfs_import")
            self._lzc = _pin_pyzfs_libraries()
            logsetup.mark("pyzfs_imported")
        return self._lzc

    def read_key_file(self, mountpoint: str, path: str, *, dataset: str) -> bytearray:
        return read_key_file(mountpoint, path, dataset=dataset)

    def load_key(self, dataset: str, wrapping_key: bytearray, *, noop: bool) -> None:
        lzc = self._module()
        logsetup.mark("lzc_load_key")
        try:
            self._load_key(lzc, dataset, wrapping_key, noop=noop)
        finally:
            logsetup.mark("lzc_load_key_done")

    def unload_key(self, dataset: str) -> None:
        lzc = self._module()
        try:
            lzc.lzc_unload_key(dataset.encode())
        except lzc.exceptions.ZFSError as exc:
            code = getattr(exc, "errno", None) or errno.EIO
            hint = {
                errno.EBUSY: "something of it is mounted or in use",
                errno.EACCES: "its key is not loaded",
                errno.ENOENT: "no such dataset",
            }.get(code, os.strerror(code))
            raise KeyLoadError(f"cannot unload the key of {dataset}: {hint}", errno=code) from None

    def _load_key(self, lzc: Any, dataset: str, wrapping_key: bytearray, *, noop: bool) -> None:
        from libzfs_core.bindings.libzfs_core import ffi

        key = ffi.from_buffer("uint8_t[]", wrapping_key)
        action = "verify the key of" if noop else "load the key of"
        try:
            lzc.lzc_load_key(dataset.encode(), noop, key)
        except lzc.exceptions.ZFSInitializationFailed as exc:
            code = getattr(exc, "errno", None) or errno.EIO
            raise KeyLoadError(
                f"cannot {action} {dataset}: libzfs_core cannot open /dev/zfs "
                f"({os.strerror(code)}): is the zfs kernel module loaded?",
                errno=code,
            ) from None
        except lzc.exceptions.ZFSError as exc:
            code = getattr(exc, "errno", None) or errno.EIO
            if code == errno.EACCES:
                raise KeyRejectedError(f"zfs rejected the key for {dataset}: wrong key") from None
            if code == errno.EEXIST:
                raise KeyAlreadyLoadedError(f"the key of {dataset} is already loaded") from None
            if code == errno.ENOENT:
                raise KeyLoadError(
                    f"cannot {action} {dataset}: no such dataset", errno=code
                ) from None
            if code == errno.EINVAL:
                raise KeyLoadError(
                    f"cannot {action} {dataset}: not an encryption root, or the key format "
                    "does not match",
                    errno=code,
                ) from None
            raise KeyLoadError(
                f"cannot {action} {dataset}: {os.strerror(code)}", errno=code
            ) from None
