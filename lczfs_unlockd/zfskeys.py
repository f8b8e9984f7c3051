"""ZFS wrapping keys: read key files safely, derive keys as libzfs does, load them.

Derivation follows libzfs_crypto.c (``get_key_material_raw``,
``validate_key``, ``derive_key``):

* raw: the file holds exactly 32 bytes, used as they are;
* hex: the first line, one trailing newline removed, is exactly 64 hex
  digits, decoded to 32 bytes;
* passphrase: the first line, one trailing newline removed, up to the first
  NUL (libzfs uses ``strlen``), through PBKDF2-HMAC-SHA1 with the dataset's
  ``pbkdf2salt`` as 8 little-endian bytes and ``pbkdf2iters`` rounds, 32
  bytes out.

Key material only ever lives in ``bytearray``s that callers wipe with
:func:`wipe` (``finally``); nothing here logs or formats it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import paths
from .errors import KeyLoadError
from .secretbuf import read_bounded, wipe

log = logging.getLogger("lczfs_unlockd.zfskeys")

WRAPPING_KEY_LEN = 32  # zio_crypt.h
KEY_FILE_LIMIT = 4096  # a key file is 32 bytes, 65 or at most 513: anything big is wrong


class KeyFileError(KeyLoadError):
    """The key file is missing, unsafe or malformed."""

    errno = errno.EINVAL


class KeyRejectedError(KeyLoadError):
    """ZFS says the wrapping key is wrong (lzc_load_key: EACCES)."""

    errno = errno.EACCES


class KeyAlreadyLoadedError(KeyLoadError):
    errno = errno.EEXIST


# CPython: a bytes object's data starts after its header; sys.getsizeof(b"")
# is header + 1 (the trailing NUL).
_BYTES_DATA_OFFSET = sys.getsizeof(b"") - 1


def _wipe_immutable(data: bytes) -> None:
    """Zero a ``bytes`` object that a library returned (hashlib has no bytearray API).

    Only used on an object this module created and holds the only reference to.
    """
    if data:
        ctypes.memset(id(data) + _BYTES_DATA_OFFSET, 0, len(data))


def key_file_path(keylocation: str, mountpoint: str) -> str | None:
    """The path of a ``file://`` keylocation beneath ``mountpoint``, else None."""
    if not keylocation.startswith("file://"):
        return None
    path = keylocation[len("file://") :]
    if not path.startswith(mountpoint.rstrip("/") + "/"):
        return None
    if ".." in path.split("/") or "//" in path:
        return None
    return path


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


def _first_line(material: bytearray) -> memoryview:
    """libzfs reads non-raw keys with getline() and trims the ending newline."""
    end = material.find(b"\n")
    return memoryview(material)[: len(material) if end < 0 else end]


_HEX = {c: i for i, c in enumerate(b"0123456789abcdef")} | {
    c: i + 10 for i, c in enumerate(b"ABCDEF")
}


def derive_wrapping_key(
    keyformat: str,
    material: bytearray,
    *,
    salt: int,
    iters: int,
    dataset: str,
    path: str,
    max_iters: int = 100_000_000,
) -> bytearray:
    """Turn key-file contents into the 32-byte wrapping key for ``lzc_load_key``.

    ``salt`` and ``iters`` come from the pool, which whoever holds the disk
    can write: ``iters`` above ``max_iters`` is refused before any work (one
    PBKDF2 call cannot be interrupted, and above 2**31 hashlib cannot even
    take it).
    """
    where = f"key file {path} of {dataset} (keyformat={keyformat})"
    if keyformat == "raw":
        if len(material) != WRAPPING_KEY_LEN:
            raise KeyFileError(
                f"{where} holds {len(material)} bytes; a raw key is exactly {WRAPPING_KEY_LEN}"
            )
        key = bytearray(WRAPPING_KEY_LEN)
        key[:] = material
        return key
    if keyformat == "hex":
        with _first_line(material) as line:
            if len(line) != 2 * WRAPPING_KEY_LEN:
                raise KeyFileError(
                    f"{where} holds {len(line)} characters; a hex key is exactly "
                    f"{2 * WRAPPING_KEY_LEN} hex digits"
                )
            key = bytearray(WRAPPING_KEY_LEN)
            for i in range(WRAPPING_KEY_LEN):
                hi, lo = _HEX.get(line[2 * i], -1), _HEX.get(line[2 * i + 1], -1)
                if hi < 0 or lo < 0:
                    wipe(key)
                    raise KeyFileError(f"{where} contains a character that is not a hex digit")
                key[i] = hi << 4 | lo
            return key
    if keyformat == "passphrase":
        if iters <= 0:
            raise KeyFileError(f"{dataset} has pbkdf2iters={iters}: not a passphrase-derived key")
        if iters > max_iters:
            raise KeyFileError(
                f"{dataset} has pbkdf2iters={iters}, more than max_pbkdf2iters = {max_iters}: "
                "refusing to spend that long deriving its key (zfs itself uses 350000; a pool "
                "someone else has written to can hold any value); if you set it yourself, raise "
                "max_pbkdf2iters in the configuration"
            )
        if not 0 <= salt < 2**64:
            raise KeyFileError(f"{dataset} has pbkdf2salt={salt}: not a 64-bit salt")
        with _first_line(material) as line:
            end = len(line)
            for i in range(len(line)):
                if line[i] == 0:
                    end = i
                    break
            if end == 0:
                raise KeyFileError(f"{where} is empty")
            derived = hashlib.pbkdf2_hmac(
                "sha1", line[:end], salt.to_bytes(8, "little"), iters, WRAPPING_KEY_LEN
            )
        key = bytearray(derived)
        _wipe_immutable(derived)
        return key
    raise KeyFileError(
        f"{dataset} has keyformat={keyformat}: only raw, hex and passphrase can be loaded"
    )


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
            self._lzc = _pin_pyzfs_libraries()
        return self._lzc

    def load_key(self, dataset: str, wrapping_key: bytearray, *, noop: bool) -> None:
        lzc = self._module()
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
