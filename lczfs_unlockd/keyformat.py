"""ZFS key formats: where a dataset's key file is, and how libzfs turns it into a key.

Pure functions, no I/O.  Derivation follows libzfs_crypto.c
(``get_key_material_raw``, ``validate_key``, ``derive_key``):

* raw: the file holds exactly 32 bytes, used as they are;
* hex: the first line, one trailing newline removed, is exactly 64 hex
  digits, decoded to 32 bytes;
* passphrase: the first line, one trailing newline removed, up to the first
  NUL (libzfs uses ``strlen``), through PBKDF2-HMAC-SHA1 with the dataset's
  ``pbkdf2salt`` as 8 little-endian bytes and ``pbkdf2iters`` rounds, 32
  bytes out.

Key material only ever lives in ``bytearray``s that callers wipe with
:func:`secretbuf.wipe` (``finally``); nothing here logs or formats it.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys

from .errors import KeyFileError
from .secretbuf import wipe

WRAPPING_KEY_LEN = 32  # zio_crypt.h

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
