"""A thin ctypes binding of libcryptsetup's stable API.

No maintained Python binding of libcryptsetup exists, and the daemon needs
only a dozen calls: load a LUKS header, try tokens, a key file or a
passphrase, activate (or only check) the key, deactivate, and the only
header changes the daemon makes: consuming and destroying a one-time
unlock (``arm-reboot``'s marker token, key slot and TPM2 token).  Negative
errno values become the typed errors of ``errors.py`` with a message that
names the device and says what to do.

The library is loaded by full soname (``paths.LIBCRYPTSETUP``) on first use:
``ctypes.util.find_library`` runs ldconfig and gcc, which an initrd lacks,
and importing this module stays cheap.

Key material: passphrases and PINs arrive as ``bytearray`` and are handed to
C through a ctypes view of the caller's buffer, so no immutable ``bytes``
copy is made that could not be zeroed; key files are read by the library
itself.  Nothing here logs key material or puts it in a message.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from . import log as logsetup
from . import paths
from .errors import (
    KeystoreError,
    NoTokenError,
    NoUsableKeyslotError,
    PinRefusedError,
    PinRequiredError,
    WrongKeyError,
)
from .libc import declare
from .ports import Keyslot, MappingState, Token
from .secretbuf import wipe

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .ports import Cryptsetup, LuksDevice, Tpm2Policy, VolumeKeyHook

__all__ = ["LibCryptsetup", "LuksVolume", "set_debug"]

log = logging.getLogger("lczfs_unlockd.cryptsetup")

# Constants from libcryptsetup.h (cryptsetup 2.x, stable API).
CRYPT_LUKS1 = "LUKS1"
CRYPT_LUKS2 = "LUKS2"
CRYPT_ANY_SLOT = -1
CRYPT_ANY_TOKEN = -1
CRYPT_ACTIVATE_READONLY = 1 << 0
CRYPT_DEACTIVATE_DEFERRED = 1 << 0
CRYPT_LOG_NORMAL = 0
CRYPT_LOG_ERROR = 1
CRYPT_LOG_VERBOSE = 2
CRYPT_LOG_DEBUG = -1
CRYPT_LOG_DEBUG_JSON = -2
CRYPT_DEBUG_ALL = -1
CRYPT_DEBUG_NONE = 0
# enum crypt_status_info: CRYPT_INVALID, CRYPT_INACTIVE, CRYPT_ACTIVE, CRYPT_BUSY
# (MappingState uses the same values).
# enum crypt_token_info: the first two mean "no usable token in this slot".
CRYPT_TOKEN_INVALID = 0
CRYPT_TOKEN_INACTIVE = 1
# ... and these two an enrolled token whose type has no handler (no plugin).
CRYPT_TOKEN_INTERNAL_UNKNOWN = 3
CRYPT_TOKEN_EXTERNAL_UNKNOWN = 5
# enum crypt_keyslot_info
CRYPT_SLOT_INVALID = 0
CRYPT_SLOT_INACTIVE = 1
CRYPT_SLOT_ACTIVE = 2
CRYPT_SLOT_ACTIVE_LAST = 3
CRYPT_SLOT_UNBOUND = 4  # LUKS2: holds a key, but not this volume's
# enum crypt_keyslot_priority: CRYPT_ANY_SLOT skips IGNORE slots
CRYPT_SLOT_PRIORITY_INVALID = -1
CRYPT_SLOT_PRIORITY_IGNORE = 0
# crypt_persistent_flags_get(): enum crypt_flags_type and the requirement bits
CRYPT_FLAGS_REQUIREMENTS = 1
CRYPT_REQUIREMENT_OFFLINE_REENCRYPT = 1 << 0
CRYPT_REQUIREMENT_ONLINE_REENCRYPT = 1 << 1
CRYPT_REQUIREMENT_UNKNOWN = 1 << 31  # a requirement this libcryptsetup does not know

_LEVEL_NAMES = {
    CRYPT_LOG_NORMAL: "normal",
    CRYPT_LOG_ERROR: "error",
    CRYPT_LOG_VERBOSE: "verbose",
    CRYPT_LOG_DEBUG: "debug",
    CRYPT_LOG_DEBUG_JSON: "debug-json",
}

# crypt_activate_by_token_pin() return values meaning "no token could be used"
# (libcryptsetup.h): -ENOENT no token (or assigned keyslot) was eligible,
# -EAGAIN the token handler needs hardware that is not present, -EINVAL the
# header has no token support (LUKS1).  -EPERM (the token supplied a key no
# keyslot accepts) and -ENOANO (PIN missing or wrong) have their own errors.
_TOKEN_UNUSABLE = frozenset({errno.ENOENT, errno.EAGAIN, errno.EINVAL})

_c_crypt_device_p = ctypes.c_void_p
TPM2_TOKEN = "systemd-tpm2"
UINT32_MAX = 2**32 - 1


class _Tpm2PluginParams(ctypes.Structure):
    """systemd's ``systemd_tpm2_plugin_params`` (src/shared/tpm2-util.h): the
    ``usrptr`` its TPM2 token plugin takes.  NULL members: its defaults."""

    _fields_ = [
        ("search_pcr_mask", ctypes.c_uint32),  # UINT32_MAX: tokens of any PCR mask
        ("device", ctypes.c_char_p),  # NULL: the first TPM2
        ("signature_path", ctypes.c_char_p),  # signed PCR policy (JSON)
        ("pcrlock_path", ctypes.c_char_p),  # systemd-pcrlock policy (JSON)
    ]


# Key material travels as char* into the caller's bytearray, never c_char_p
# (which would want an immutable bytes object).
_c_key_p = ctypes.POINTER(ctypes.c_char)
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


_last_error = threading.local()

# libcryptsetup's messages quote the header (types, names): at most this many
# characters of one reach a message of ours, escaped.
MAX_REASON = 200


def last_error() -> str:
    """The last error libcryptsetup logged in this thread during the current
    call (it never holds key material)."""
    return str(getattr(_last_error, "text", ""))


def _begin() -> ctypes.CDLL:
    """The library, with the last error of an earlier call forgotten.

    Called before each operation, so that a message built from last_error()
    never carries the text of a previous, unrelated failure.
    """
    lib = _library()
    _last_error.text = ""
    return lib


def _reason(fallback: str = "see the libcryptsetup messages above") -> str:
    """libcryptsetup's last error of this call, bounded and escaped for a message."""
    text = last_error()
    if not text:
        return fallback
    text = _printable(text)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _log_message(level: int, message: bytes | None, _usrptr: int | None) -> None:
    # Called from C: an exception here would only be printed to stderr and
    # lost — BaseException included, so that a SIGTERM arriving here is not
    # swallowed half-way: the unlock sequence re-raises it at its next
    # checkpoint from the signal it recorded.
    try:
        if message:
            text = message.decode("utf-8", "replace").rstrip("\n")
            if level == CRYPT_LOG_ERROR:
                _last_error.text = text
                log.warning("libcryptsetup: %s", text)
            else:
                log.debug("libcryptsetup %s: %s", _LEVEL_NAMES.get(level, str(level)), text)
    except BaseException:  # noqa: S110 - nothing sensible to do inside a C callback
        pass


# A module global: the C side keeps only a pointer, and a collected
# trampoline would crash the next log call.
_log_callback = _LOG_CALLBACK(_log_message)


class _PbkdfType(ctypes.Structure):
    """struct crypt_pbkdf_type (libcryptsetup.h): only ``type`` is read."""

    _fields_ = [
        ("type", ctypes.c_char_p),
        ("hash", ctypes.c_char_p),
        ("time_ms", ctypes.c_uint32),
        ("iterations", ctypes.c_uint32),
        ("max_memory_kb", ctypes.c_uint32),
        ("parallel_threads", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_char_p, c_size_t = ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
    c_void_p, c_uint32, cd = ctypes.c_void_p, ctypes.c_uint32, _c_crypt_device_p
    declare(lib, {
        "crypt_init": (c_int, [ctypes.POINTER(cd), c_char_p]),
        "crypt_load": (c_int, [cd, c_char_p, c_void_p]),
        "crypt_get_type": (c_char_p, [cd]),
        "crypt_free": (None, [cd]),
        "crypt_set_log_callback": (None, [cd, _LOG_CALLBACK, c_void_p]),
        "crypt_set_debug_level": (None, [c_int]),
        "crypt_token_max": (c_int, [c_char_p]),
        "crypt_token_status": (c_int, [cd, c_int, ctypes.POINTER(c_char_p)]),
        # (cd, token, JSON out: the library's, valid until the next call)
        "crypt_token_json_get": (c_int, [cd, c_int, ctypes.POINTER(c_char_p)]),
        # (cd, token, JSON (NULL: remove the token)); writes the header
        "crypt_token_json_set": (c_int, [cd, c_int, c_char_p]),
        # (cd, keyslot): wipes the slot's key material and writes the header
        "crypt_keyslot_destroy": (c_int, [cd, c_int]),
        # (cd, name (NULL: check only), token type (NULL: any), token, pin,
        #  pin size, usrptr, flags)
        "crypt_activate_by_token_pin": (
            c_int, [cd, c_char_p, c_char_p, c_int, _c_key_p, c_size_t, c_void_p, c_uint32],
        ),
        # (cd, name, keyslot, passphrase, size, flags)
        "crypt_activate_by_passphrase": (
            c_int, [cd, c_char_p, c_int, _c_key_p, c_size_t, c_uint32],
        ),
        # (cd, name, keyslot, key file path, keyfile_size (0: whole file),
        #  keyfile_offset, flags)
        "crypt_activate_by_keyfile_device_offset": (
            c_int, [cd, c_char_p, c_int, c_char_p, c_size_t, ctypes.c_uint64, c_uint32],
        ),
        "crypt_deactivate_by_name": (c_int, [cd, c_char_p, c_uint32]),
        "crypt_status": (c_int, [cd, c_char_p]),
        "crypt_keyslot_max": (c_int, [c_char_p]),
        "crypt_keyslot_status": (c_int, [cd, c_int]),
        "crypt_keyslot_get_priority": (c_int, [cd, c_int]),
        # (cd, keyslot, pbkdf out: its strings are the library's)
        "crypt_keyslot_get_pbkdf": (c_int, [cd, c_int, ctypes.POINTER(_PbkdfType)]),
        "crypt_persistent_flags_get": (c_int, [cd, c_int, ctypes.POINTER(c_uint32)]),
        # The volume-key path, for measuring the unlock (cryptsetup >= 2.6):
        "crypt_get_uuid": (c_char_p, [cd]),
        "crypt_get_volume_key_size": (c_int, [cd]),
        # (cd, keyslot, volume key out, its size in/out, passphrase, size)
        "crypt_volume_key_get": (
            c_int, [cd, c_int, _c_key_p, ctypes.POINTER(c_size_t), _c_key_p, c_size_t],
        ),
        # (cd, token, token type, pin, pin size, usrptr, context out)
        "crypt_keyslot_context_init_by_token": (
            c_int, [cd, c_int, c_char_p, _c_key_p, c_size_t, c_void_p, ctypes.POINTER(c_void_p)],
        ),
        # (cd, key file, keyfile_size (0: whole file), offset, context out)
        "crypt_keyslot_context_init_by_keyfile": (
            c_int, [cd, c_char_p, c_size_t, ctypes.c_uint64, ctypes.POINTER(c_void_p)],
        ),
        "crypt_keyslot_context_free": (None, [c_void_p]),
        "crypt_volume_key_get_by_keyslot_context": (
            c_int, [cd, c_int, _c_key_p, ctypes.POINTER(c_size_t), c_void_p],
        ),
        # (cd, name, volume key, size, flags)
        "crypt_activate_by_volume_key": (c_int, [cd, c_char_p, _c_key_p, c_size_t, c_uint32]),
    })  # fmt: skip


def _library() -> ctypes.CDLL:
    """Load libcryptsetup once, declare its functions and route its log."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        failures = []
        for name in paths.LIBCRYPTSETUP:
            try:
                lib = ctypes.CDLL(name)
            except OSError as e:
                failures.append(f"{name}: {e}")
                continue
            _declare(lib)
            # The default callback (cd=NULL) also receives the messages of
            # crypt_init(), before a device handle exists.
            lib.crypt_set_log_callback(None, _log_callback, None)
            _set_token_path(lib)
            _lib = lib
            return lib
        raise KeystoreError(
            "cannot load libcryptsetup ("
            + "; ".join(failures)
            + "): include libcryptsetup in the initrd or fix paths.LIBCRYPTSETUP",
            errno=errno.ELIBACC,
        )


def _set_token_path(lib: ctypes.CDLL) -> None:
    """Point libcryptsetup at the token plugins (TPM2, FIDO2, PKCS#11).

    Where the plugins do not live in libcryptsetup's compiled-in directory
    (NixOS: they ship with systemd), packagers set paths.CRYPTSETUP_TOKEN_PATH.
    crypt_token_set_external_path() exists since cryptsetup 2.7.
    """
    path = paths.CRYPTSETUP_TOKEN_PATH
    if path is None:
        return
    try:
        setter = lib.crypt_token_set_external_path
    except AttributeError:
        log.warning("libcryptsetup is older than 2.7: cannot use token plugins from %s", path)
        return
    setter.argtypes = [ctypes.c_char_p]
    setter.restype = ctypes.c_int
    code = setter(path.encode())
    if code < 0:
        log.warning("cannot use token plugins from %s: %s", path, os.strerror(-code))


def _printable(text: str) -> str:
    """text with every non-printable character as \\xNN, \\uNNNN (no codec
    needed: the initrd carries only the encodings the daemon rehearsed)."""
    return "".join(
        c if c.isprintable() and c != "\\" else
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )  # fmt: skip


def _plugin_problem(plugin_dir: str | None, kind: str) -> str:
    """Why libcryptsetup has no handler for an external token type."""
    if not plugin_dir:
        return "this libcryptsetup was built without token plugin support"
    plugin = os.path.join(plugin_dir, f"libcryptsetup-token-{kind}.so")
    if "/" in kind or not os.path.exists(plugin):
        return f"no plugin {plugin}: install it and rebuild the initrd"
    return (
        f"plugin {plugin} is there but could not be loaded (a library it needs "
        "missing from the initrd? rd.lczfs.debug shows libcryptsetup's reason)"
    )


def _token_plugin_dir(lib: ctypes.CDLL) -> str | None:
    """Where libcryptsetup looks for token plugins; None if it cannot load any."""
    try:
        getter = lib.crypt_token_external_path  # since cryptsetup 2.4
    except AttributeError:
        return None
    getter.argtypes = []
    getter.restype = ctypes.c_char_p
    path = getter()
    return None if path is None else os.fsdecode(path)


def shutdown() -> None:
    """Detach the log callback before the interpreter goes away.

    libcryptsetup may log from its destructors while Python tears down
    (seen as a segfault at exit with debug logging on): after this it logs
    nowhere instead of calling into a dying interpreter.
    """
    global _lib
    with _lib_lock:
        if _lib is None:
            return
        _lib.crypt_set_debug_level(CRYPT_DEBUG_NONE)
        _lib.crypt_set_log_callback(None, _LOG_CALLBACK(), None)  # a NULL function pointer
        _lib = None  # a later use sets the library up (and the callback) again


def set_debug(enabled: bool) -> None:
    """Let libcryptsetup send its debug messages to the log (process-wide)."""
    _library().crypt_set_debug_level(CRYPT_DEBUG_ALL if enabled else CRYPT_DEBUG_NONE)


def _strerror(code: int) -> str:
    return os.strerror(code).lower()


def _key_by_context(
    lib: ctypes.CDLL,
    cd: ctypes.c_void_p,
    init: Callable[[object], int],
    buf: ctypes.Array[ctypes.c_char],
    size: ctypes.c_size_t,
) -> int:
    """The volume key through the keyslot context ``init`` makes (given the
    context's out-pointer): the key slot, or -errno.  The context is freed
    before returning; what it points to (a PIN, a key file path, usrptr) is
    kept by pointer, not copied, so ``init`` must hold it alive."""
    kc = ctypes.c_void_p()
    r = int(init(ctypes.byref(kc)))
    if r < 0:
        return r
    try:
        return int(lib.crypt_volume_key_get_by_keyslot_context(
            cd, CRYPT_ANY_SLOT, buf, ctypes.byref(size), kc
        ))  # fmt: skip
    finally:
        lib.crypt_keyslot_context_free(kc)


def _tpm2_params(policy: Tpm2Policy) -> _Tpm2PluginParams:
    def path(value: str | None) -> bytes | None:
        return None if value is None else os.fsencode(value)

    return _Tpm2PluginParams(UINT32_MAX, None, path(policy.signature), path(policy.pcrlock))


def _key_buffer(key: bytearray) -> ctypes.Array[ctypes.c_char]:
    """A ctypes view of ``key`` (no copy).  Never NULL, even for b""."""
    if not key:
        return (ctypes.c_char * 1)()
    return (ctypes.c_char * len(key)).from_buffer(key)


def _slots(slots: list[int]) -> str:
    return ("key slot " if len(slots) == 1 else "key slots ") + ", ".join(map(str, slots))


def _flags(read_only: bool) -> int:
    return CRYPT_ACTIVATE_READONLY if read_only else 0


def _name_arg(name: str | None) -> bytes | None:
    return None if name is None else os.fsencode(name)


class LuksVolume:
    """One loaded LUKS1/LUKS2 header: ``crypt_init`` + ``crypt_load``.

    Implements ``ports.LuksDevice``.  ``name=None`` activates nothing: it only
    checks that the key opens a keyslot.  Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, device: str, handle: ctypes.c_void_p, luks_type: str) -> None:
        self.device = device
        self._cd: ctypes.c_void_p | None = handle
        self._luks_type = luks_type

    def __enter__(self) -> LuksVolume:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._cd is None else "open"
        return f"<LuksVolume {self.device} {self._luks_type} {state}>"

    @property
    def luks_type(self) -> str:
        return self._luks_type

    @property
    def uuid(self) -> str:
        raw = _library().crypt_get_uuid(self._handle())
        # From the header: escaped like every other header string.
        return _printable(raw.decode(errors="replace")) if raw else ""

    def _through_volume_key(
        self,
        method: str,
        name: str | None,
        read_only: bool,
        get_key: Callable[[ctypes.Array[ctypes.c_char], ctypes.c_size_t], int],
        on_volume_key: VolumeKeyHook,
    ) -> int:
        """Get the volume key with ``get_key`` (the key slot's return value,
        or -errno), hand it to ``on_volume_key``, then activate with it.

        Returns what ``get_key`` returned when it failed (the caller maps
        it), the key slot otherwise.  The key lives in one bytearray, zeroed
        whatever happens.
        """
        lib = _library()
        cd = self._handle()
        size = int(lib.crypt_get_volume_key_size(cd))
        if size <= 0:
            raise KeystoreError(
                f"{self.device} reports no volume key size: its header is damaged",
                errno=errno.EINVAL,
            )
        key = bytearray(size)
        buf = (ctypes.c_char * size).from_buffer(key)
        # No SIGTERM between the key's release (a TPM2 unseal, say) and its
        # measurement: the handler would raise right after get_key returns.
        # Held back until the key is wiped; the KDF in get_key was never
        # interruptible anyway (systemd's SIGKILL still is).
        # The mask is read first (a query changes nothing) and blocked inside
        # the try, so that a handler already pending cannot raise between
        # the block and the try and leave the signals blocked for good.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            got = ctypes.c_size_t(size)
            slot = get_key(buf, got)
            if slot < 0:
                return slot
            if got.value != size:
                raise KeystoreError(
                    f"{self.device} gave a volume key of {got.value} bytes, not {size}",
                    errno=errno.EINVAL,
                )
            on_volume_key(key)
            if name is not None:
                r = int(lib.crypt_activate_by_volume_key(cd, _name_arg(name), buf, size,
                                                         _flags(read_only)))  # fmt: skip
                if r < 0:
                    raise self._activation_error(method, name, -r)
            return slot
        finally:
            ctypes.memset(buf, 0, size)
            del buf
            wipe(key)
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def _handle(self) -> ctypes.c_void_p:
        if self._cd is None:
            raise RuntimeError(f"LUKS handle of {self.device} used after close()")
        return self._cd

    def close(self) -> None:
        cd, self._cd = self._cd, None
        if cd is not None:
            _library().crypt_free(cd)

    def tokens(self) -> list[Token]:
        """The enrolled LUKS2 tokens, and whether libcryptsetup can use each type."""
        lib = _begin()
        cd = self._handle()
        if self._luks_type != CRYPT_LUKS2:
            return []  # LUKS1 has no tokens: crypt_token_max() is -EINVAL
        token_max = int(lib.crypt_token_max(self._luks_type.encode()))
        out = []
        for token in range(max(token_max, 0)):
            type_p = ctypes.c_char_p()
            status = int(lib.crypt_token_status(cd, token, ctypes.byref(type_p)))
            if status in (CRYPT_TOKEN_INVALID, CRYPT_TOKEN_INACTIVE):
                continue
            # The type string belongs to libcryptsetup: copied before the next
            # call.  It comes from the header (anyone who can write the zvol
            # sets it): escaped, so that it cannot forge log or sd_notify lines.
            kind = _printable((type_p.value or b"?").decode(errors="replace"))
            why = None
            if status == CRYPT_TOKEN_INTERNAL_UNKNOWN:
                why = "a built-in token type this libcryptsetup does not know: upgrade cryptsetup"
            elif status == CRYPT_TOKEN_EXTERNAL_UNKNOWN:
                why = _plugin_problem(_token_plugin_dir(lib), kind)
            out.append(Token(token, kind, unusable=why))
        return out

    def activate_by_token(
        self,
        name: str | None,
        pin: bytearray | None,
        *,
        read_only: bool,
        policy: Tpm2Policy | None = None,
        on_volume_key: VolumeKeyHook | None = None,
        token: int | None = None,
    ) -> None:
        lib = _begin()
        cd = self._handle()
        which = CRYPT_ANY_TOKEN if token is None else token
        pin_buf = None if pin is None else _key_buffer(pin)
        pin_size = 0 if pin is None else len(pin)
        # With a policy, only systemd-tpm2 tokens: another type's plugin
        # would read the struct as its own parameters.
        kind = None if policy is None else TPM2_TOKEN.encode()
        params = None if policy is None else _tpm2_params(policy)
        usrptr = None if params is None else ctypes.addressof(params)
        logsetup.mark("kdf")  # the key slot's KDF runs in this call: its cost is in the header
        try:
            if on_volume_key is None:
                r = int(lib.crypt_activate_by_token_pin(
                    cd, _name_arg(name), kind, which, pin_buf, pin_size, usrptr,
                    _flags(read_only),
                ))  # fmt: skip
            else:
                init = functools.partial(
                    lib.crypt_keyslot_context_init_by_token,
                    cd,
                    which,
                    kind,
                    pin_buf,
                    pin_size,
                    usrptr,
                )
                r = self._through_volume_key(
                    "a token", name, read_only,
                    functools.partial(_key_by_context, lib, cd, init), on_volume_key,
                )  # fmt: skip
                del init  # it holds the PIN's buffer too
        finally:
            del pin_buf  # release the export so the caller may resize/zero it
            logsetup.mark("kdf_done")
        if r >= 0:
            log.debug("a token of %s unlocked key slot %d", self.device, r)
            return
        raise self._token_error(name, -r, pin_given=pin is not None)

    def token_json(self, token: int) -> str | None:
        """Token ``token``'s JSON; None when the slot holds no token (or LUKS1)."""
        lib = _begin()
        cd = self._handle()
        if self._luks_type != CRYPT_LUKS2:
            return None
        out = ctypes.c_char_p()
        r = int(lib.crypt_token_json_get(cd, token, ctypes.byref(out)))
        if r < 0:
            if -r in (errno.ENOENT, errno.EINVAL):
                return None
            raise KeystoreError(
                f"cannot read token {token} of {self.device}: {_strerror(-r)}: {_reason()}",
                errno=-r,
            )
        # The library's buffer: copied at once.  Undecodable bytes stay
        # visible as replacement characters (the parser refuses them).
        return (out.value or b"").decode(errors="replace")

    def keyslot(self, slot: int) -> Keyslot | None:
        """Key slot ``slot``'s priority and KDF type; None when it is not active."""
        lib = _begin()
        cd = self._handle()
        status = int(lib.crypt_keyslot_status(cd, slot))
        if status not in (CRYPT_SLOT_ACTIVE, CRYPT_SLOT_ACTIVE_LAST):
            return None
        priority = int(lib.crypt_keyslot_get_priority(cd, slot))
        pbkdf = _PbkdfType()
        r = int(lib.crypt_keyslot_get_pbkdf(cd, slot, ctypes.byref(pbkdf)))
        kdf = (pbkdf.type or b"?").decode(errors="replace") if r >= 0 else "?"
        return Keyslot(slot, priority, _printable(kdf)[:32])

    def _write(self, what: str, change: Callable[[], int]) -> None:
        """One header write; again once after re-reading the header when the
        library refuses it (-EINVAL: "concurrent LUKS2 metadata update", the
        header on disk changed since this handle loaded it)."""
        lib = _begin()
        cd = self._handle()
        _last_error.text = ""
        r = change()
        if r == -errno.EINVAL and int(lib.crypt_load(cd, None, None)) >= 0:
            log.debug("re-read the LUKS header of %s to %s", self.device, what)
            _last_error.text = ""
            r = change()
        if r < 0:
            raise KeystoreError(
                f"cannot {what} of {self.device}: {_strerror(-r)}: {_reason()}", errno=-r
            )

    def remove_token(self, token: int) -> None:
        lib = _begin()
        cd = self._handle()
        self._write(f"remove token {token}", lambda: int(lib.crypt_token_json_set(cd, token, None)))

    def destroy_one_time(self, slot: int, tokens: Sequence[int]) -> None:
        """The slot first: without it the tokens open nothing (libcryptsetup
        also drops the slot's number from every token naming it), and a token
        left over (the error below) names no slot, which status shows and
        disarm removes.  No SIGTERM half way (see _through_volume_key)."""
        lib = _begin()
        cd = self._handle()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            self._write(
                f"destroy key slot {slot}", lambda: int(lib.crypt_keyslot_destroy(cd, slot))
            )
            for n, token in enumerate(tokens):
                try:
                    self.remove_token(token)
                except KeystoreError as exc:
                    left = ", ".join(map(str, tokens[n:]))
                    raise KeystoreError(
                        f"destroyed key slot {slot} of {self.device}, but {exc} (left: token "
                        f"{left}, naming no key slot)",
                        errno=exc.errno,
                    ) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        log.debug("destroyed key slot %d and tokens %s of %s", slot, list(tokens), self.device)

    def _token_error(self, name: str | None, code: int, *, pin_given: bool) -> KeystoreError:
        """What a failed crypt_activate_by_token_pin() (-code) means for the operator."""
        if code == errno.EPERM:
            return WrongKeyError(
                f"a token of {self.device} supplied a key that no key slot accepts: "
                "re-enroll the token or use another unlock method",
                errno=code,
            )
        if code == errno.ENOANO and not pin_given:
            return PinRequiredError(f"the token of {self.device} needs a PIN", errno=code)
        if code == errno.ENOANO and pin_given:
            return PinRequiredError(
                f"the token of {self.device} did not accept this PIN: try again", errno=code
            )
        if code == errno.ENOTRECOVERABLE and pin_given:
            # systemd's TPM2 plugin: a wrong PIN (TPM_RC_AUTH_FAIL), but also
            # any other unseal failure, which only shows once a PIN is given.
            return PinRefusedError(
                f"the token of {self.device} refused this PIN or failed ({_strerror(code)}): "
                "a wrong PIN, or the TPM's state changed (PCRs, TPM cleared) or its "
                "libraries are missing from the initrd",
                errno=code,
            )
        if code == errno.ENOLCK:
            return KeystoreError(
                f"the token of {self.device} is locked out ({_strerror(code)}): the TPM's "
                "dictionary-attack protection after wrong PINs; wait for it to expire or "
                "clear it, and use another unlock method meanwhile",
                errno=code,
            )
        # With a name, -ENOTSUP is device-mapper refusing the mapping (it
        # outranks token errors), not a missing token plugin.
        if code in _TOKEN_UNUSABLE or (code == errno.ENOTSUP and name is None):
            return NoTokenError(
                f"no token of {self.device} can be used ({_strerror(code)}): "
                "enroll one, plug in its hardware, or use a key file or passphrase",
                errno=code,
            )
        return self._activation_error("a token", name, code)

    def activate_by_passphrase(
        self,
        name: str | None,
        passphrase: bytearray,
        *,
        read_only: bool,
        on_volume_key: VolumeKeyHook | None = None,
    ) -> None:
        lib = _begin()
        cd = self._handle()
        buf = _key_buffer(passphrase)
        logsetup.mark("kdf")
        try:
            if on_volume_key is None:
                r = int(
                    lib.crypt_activate_by_passphrase(
                        cd, _name_arg(name), CRYPT_ANY_SLOT, buf, len(passphrase),
                        _flags(read_only),
                    )
                )  # fmt: skip
            else:

                def get_key(
                    vk: ctypes.Array[ctypes.c_char], size: ctypes.c_size_t, secret: object = buf
                ) -> int:
                    return int(lib.crypt_volume_key_get(
                        cd, CRYPT_ANY_SLOT, vk, ctypes.byref(size), secret, len(passphrase)
                    ))  # fmt: skip

                r = self._through_volume_key(
                    "a passphrase", name, read_only, get_key, on_volume_key
                )
        finally:
            del buf
            logsetup.mark("kdf_done")
        if r >= 0:
            log.debug("a passphrase unlocked key slot %d of %s", r, self.device)
            return
        unusable = self._unusable_keyslots() if -r == errno.ENOENT else None
        if -r == errno.EPERM or (-r == errno.ENOENT and unusable is None):
            # -ENOENT: libcryptsetup 2.6 says so instead of -EPERM when an
            # unbound or ignored slot sits beside the ones that refused it.
            raise WrongKeyError(
                f"no key slot of {self.device} accepts this passphrase", errno=errno.EPERM
            )
        if unusable is not None:
            raise self._no_usable_keyslot("a passphrase", unusable)
        raise self._activation_error("a passphrase", name, -r)

    def activate_by_keyfile(
        self,
        name: str | None,
        path: str,
        *,
        read_only: bool,
        on_volume_key: VolumeKeyHook | None = None,
    ) -> None:
        lib = _begin()
        cd = self._handle()
        logsetup.mark("kdf")
        try:
            if on_volume_key is None:
                r = int(
                    lib.crypt_activate_by_keyfile_device_offset(
                        cd, _name_arg(name), CRYPT_ANY_SLOT, os.fsencode(path), 0, 0,
                        _flags(read_only),
                    )
                )  # fmt: skip
            else:
                # The partial holds the encoded path for as long as the
                # context needs it (a temporary was freed and reused under it).
                init = functools.partial(
                    lib.crypt_keyslot_context_init_by_keyfile, cd, os.fsencode(path), 0, 0
                )
                r = self._through_volume_key(
                    f"key file {path}", name, read_only,
                    functools.partial(_key_by_context, lib, cd, init), on_volume_key,
                )  # fmt: skip
        finally:
            logsetup.mark("kdf_done")
        if r >= 0:
            log.debug("key file %s unlocked key slot %d of %s", path, r, self.device)
            return
        code = -r
        unusable = self._unusable_keyslots() if code == errno.ENOENT else None
        if code == errno.EPERM or (code == errno.ENOENT and unusable is None):
            raise WrongKeyError(
                f"no key slot of {self.device} accepts the key file {path}: "
                "check keystore.keyfile or add it with cryptsetup luksAddKey",
                errno=errno.EPERM,
            )
        if unusable is not None:
            raise self._no_usable_keyslot(f"the key file {path}", unusable)
        if code == errno.EINVAL and not os.access(path, os.R_OK):
            # libcryptsetup says only "Failed to open key file." with -EINVAL.
            raise KeystoreError(
                f"cannot read key file {path} for {self.device}: check that it exists "
                "and is readable",
                errno=errno.ENOENT if not os.path.lexists(path) else errno.EACCES,
            )
        raise self._activation_error(f"key file {path}", name, code)

    def _unusable_keyslots(self) -> tuple[list[int], list[int]] | None:
        """(unbound, ignored) key slots when no slot can take a passphrase or
        key file; None when one can.

        Asked of libcryptsetup (crypt_keyslot_status, crypt_keyslot_get_priority),
        never parsed from luksDump.
        """
        lib = _library()
        cd = self._handle()
        unbound, ignored = [], []
        for slot in range(max(int(lib.crypt_keyslot_max(self._luks_type.encode())), 0)):
            status = int(lib.crypt_keyslot_status(cd, slot))
            if status == CRYPT_SLOT_UNBOUND:
                unbound.append(slot)
            elif status in (CRYPT_SLOT_ACTIVE, CRYPT_SLOT_ACTIVE_LAST):
                # LUKS1 has no priorities: libcryptsetup says "normal".
                if int(lib.crypt_keyslot_get_priority(cd, slot)) == CRYPT_SLOT_PRIORITY_IGNORE:
                    ignored.append(slot)
                else:
                    return None
        return unbound, ignored

    def _no_usable_keyslot(
        self, method: str, slots: tuple[list[int], list[int]]
    ) -> NoUsableKeyslotError:
        """The error for a header none of whose key slots can take ``method``.

        ``slots``: what _unusable_keyslots() found, (unbound, ignored).
        """
        unbound, ignored = slots
        parts = []
        if ignored:
            parts.append(
                f"{_slots(ignored)} {'has' if len(ignored) == 1 else 'have'} priority ignore"
            )
        if unbound:
            parts.append(
                f"{_slots(unbound)} {'is' if len(unbound) == 1 else 'are'} unbound "
                "(a key, but not this volume's)"
            )
        problem = "; ".join(parts) if parts else "it has no key slots at all"
        if ignored:
            fix = (
                "let the slot be used again with cryptsetup config --priority normal "
                f"--key-slot {ignored[0]} {self.device}"
            )
        else:
            fix = (
                "restore a header backup with cryptsetup luksHeaderRestore, "
                "or use an unlock method whose key slot still exists"
            )
        return NoUsableKeyslotError(
            f"no key slot of {self.device} can take {method}: {problem}: {fix}",
            errno=errno.ENOKEY,
        )

    def _activation_error(self, method: str, name: str | None, code: int) -> KeystoreError:
        if name is None:
            what = f"cannot check {method} against {self.device}"
        else:
            what = f"cannot activate {self.device} as /dev/mapper/{name} with {method}"
        if name is not None and code in (errno.ENOTSUP, errno.ENODEV):
            hint = "device-mapper is not usable: include dm_mod and dm_crypt in the initrd"
        elif code in (errno.EEXIST, errno.EBUSY):
            hint = f"the name is in use: close it with cryptsetup close {name}"
        elif code == errno.ENOMEM:
            hint = "not enough memory for the key derivation: free memory or lower the pbkdf cost"
        else:
            hint = _reason()
        return KeystoreError(f"{what}: {_strerror(code)}: {hint}", errno=code)


class LibCryptsetup:
    """``ports.Cryptsetup`` on the real libcryptsetup."""

    def open(self, device: str) -> LuksVolume:
        """Load the LUKS1/LUKS2 header of ``device``; the caller closes it."""
        lib = _begin()
        cd = _c_crypt_device_p()
        r = int(lib.crypt_init(ctypes.byref(cd), os.fsencode(device)))
        if r < 0:
            raise _open_error(device, -r)
        try:
            # Looked at before crypt_load(), which rewrites a destroyed primary
            # LUKS2 header from the secondary copy when the device is writable.
            probe = _probe_header(device)
            r = int(lib.crypt_load(cd, None, None))  # NULL: any LUKS version
            if r < 0:
                raise _load_error(device, -r, probe)
            raw_type = lib.crypt_get_type(cd)
            luks_type = str(raw_type.decode()) if raw_type else ""
            if luks_type not in (CRYPT_LUKS1, CRYPT_LUKS2):
                raise KeystoreError(
                    f"{device} is a {luks_type or 'unknown'} device, not LUKS: "
                    "check keystore.volume and keystore.partition",
                    errno=errno.EINVAL,
                )
            if luks_type == CRYPT_LUKS2:
                problem = _requirements_error(lib, cd, device)
                if problem is not None:
                    raise problem
        except BaseException:
            lib.crypt_free(cd)
            raise
        log.debug("loaded %s header of %s", luks_type, device)
        if probe.secondary is not None and not probe.primary:
            _report_primary_damage(device, probe.secondary)
        return LuksVolume(device, cd, luks_type)

    def status(self, name: str) -> MappingState:
        """State of ``/dev/mapper/<name>``; INVALID when device-mapper is unusable."""
        return MappingState(int(_begin().crypt_status(None, os.fsencode(name))))

    def deactivate(self, name: str, *, deferred: bool = False) -> None:
        """Remove ``/dev/mapper/<name>``; a mapping that does not exist is fine.

        ``deferred``: if it is still open, let the kernel remove it when the
        last user closes it (CRYPT_DEACTIVATE_DEFERRED).
        """
        lib = _begin()
        if self.status(name) is MappingState.INACTIVE:
            return
        flags = CRYPT_DEACTIVATE_DEFERRED if deferred else 0
        r = int(lib.crypt_deactivate_by_name(None, os.fsencode(name), flags))
        if r >= 0:
            return
        code = -r
        if code == errno.EBUSY:
            hint = "it is still in use: unmount it first (see findmnt, fuser)"
        elif code == errno.ENODEV:
            hint = "device-mapper does not know it or is not usable"
        else:
            hint = _reason()
        raise KeystoreError(
            f"cannot deactivate /dev/mapper/{name}: {_strerror(code)}: {hint}", errno=code
        )


def _open_error(device: str, code: int) -> KeystoreError:
    if code in (errno.ENOTBLK, errno.ENOENT, errno.ENXIO):
        return KeystoreError(
            f"{device} does not exist or is not a block device: "
            "check keystore.volume and keystore.partition, and that the pool is imported",
            errno=code,
        )
    if code in (errno.EACCES, errno.EPERM):
        return KeystoreError(f"cannot open {device}: {_strerror(code)}: run as root", errno=code)
    return KeystoreError(f"cannot open {device}: {_strerror(code)}", errno=code)


# LUKS1/LUKS2 primary header magic, and LUKS2's secondary header magic.
_PRIMARY_MAGIC = b"LUKS\xba\xbe"
_SECONDARY_MAGIC = b"SKUL\xba\xbe"
# Where libcryptsetup looks for LUKS2's secondary header when the primary one
# is unreadable: right after a primary header of each size LUKS2 allows,
# 16 KiB to 4 MiB (lib/luks2/luks2_disk_metadata.c; "Trying to read
# secondary LUKS2 header at offset 0x4000" ... 0x400000 in its debug log).
_SECONDARY_OFFSETS = tuple(16 * 1024 << i for i in range(9))


@dataclass(frozen=True)
class _HeaderProbe:
    primary: bool  # LUKS magic at offset 0
    damaged_mark: bool  # LUKS2's secondary magic at offset 0 (never written there)
    secondary: int | None  # offset of a LUKS2 secondary binary header, when primary is False


def _read_at(fd: int, offset: int) -> bytes:
    try:
        return os.pread(fd, 8, offset)  # magic and big-endian version
    except OSError:
        return b""


def _probe_header(device: str) -> _HeaderProbe:
    """What the device holds where LUKS headers go: at most 10 reads of 8 bytes."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return _HeaderProbe(primary=False, damaged_mark=False, secondary=None)
    try:
        first = _read_at(fd, 0)[:6]
        if first == _PRIMARY_MAGIC:
            return _HeaderProbe(primary=True, damaged_mark=False, secondary=None)
        for offset in _SECONDARY_OFFSETS:
            if _read_at(fd, offset) == _SECONDARY_MAGIC + b"\x00\x02":
                return _HeaderProbe(primary=False, damaged_mark=False, secondary=offset)
        return _HeaderProbe(primary=False, damaged_mark=first == _SECONDARY_MAGIC, secondary=None)
    finally:
        os.close(fd)


def _size(offset: int) -> str:
    return f"{offset // (1024 * 1024)} MiB" if offset >= 1024 * 1024 else f"{offset // 1024} KiB"


def _report_primary_damage(device: str, secondary: int) -> None:
    """libcryptsetup loaded the secondary LUKS2 header: say so, it would not."""
    if _probe_header(device).primary:
        log.warning(
            "the primary LUKS2 header of %s was destroyed; libcryptsetup restored it from "
            "the secondary copy at %s: find out what overwrote it, and renew your header "
            "backup (cryptsetup luksHeaderBackup)",
            device,
            _size(secondary),
        )
    else:
        log.warning(
            "the primary LUKS2 header of %s is destroyed; libcryptsetup uses the secondary "
            "copy at %s: repair it with cryptsetup repair %s where the device is writable",
            device,
            _size(secondary),
            device,
        )


def _requirements_error(lib: ctypes.CDLL, cd: ctypes.c_void_p, device: str) -> KeystoreError | None:
    """Refuse, before anything is asked, a LUKS2 header this daemon must not open.

    libcryptsetup 2.6 loads such headers (and even checks a passphrase
    against them); the requirements only stop some operations later.
    """
    flags = ctypes.c_uint32()
    r = int(lib.crypt_persistent_flags_get(cd, CRYPT_FLAGS_REQUIREMENTS, ctypes.byref(flags)))
    if r < 0:
        log.debug("cannot read the requirements of %s: %s", device, _strerror(-r))
        return None
    reencrypt = CRYPT_REQUIREMENT_OFFLINE_REENCRYPT | CRYPT_REQUIREMENT_ONLINE_REENCRYPT
    if flags.value & reencrypt:
        # Activating it means crash recovery (a write) and a reencryption-aware
        # mapping, and its key slots change under us: not for a read-only keystore.
        return KeystoreError(
            f"{device} is in the middle of a LUKS2 reencryption (interrupted, or only "
            "initialised with --init-only): finish it from a rescue system with "
            f"cryptsetup reencrypt --resume-only {device}, then boot again",
            errno=errno.ETXTBSY,
        )
    if flags.value & CRYPT_REQUIREMENT_UNKNOWN:
        return _unknown_requirement_error(device)
    return None


def _unknown_requirement_error(device: str) -> KeystoreError:
    return KeystoreError(
        f"the LUKS2 header of {device} requires a feature this libcryptsetup does not "
        "know (written by a newer cryptsetup, or tampered with): put a cryptsetup that "
        "knows it in the initrd, or check the header with cryptsetup luksDump",
        errno=errno.ETXTBSY,
    )


def _load_error(device: str, code: int, probe: _HeaderProbe) -> KeystoreError:
    if probe.secondary is not None:
        return KeystoreError(
            f"the primary LUKS2 header of {device} is destroyed and libcryptsetup could not "
            f"use the secondary copy at {_size(probe.secondary)} either "
            f"({_reason('invalid header')}): try cryptsetup repair {device}, or restore a "
            "header backup with cryptsetup luksHeaderRestore",
            errno=code,
        )
    if code == errno.EINVAL and (probe.primary or probe.damaged_mark):
        return KeystoreError(
            f"the LUKS header of {device} is damaged ({_reason('invalid header')}): "
            "restore it from a backup with cryptsetup luksHeaderRestore",
            errno=code,
        )
    if code == errno.ETXTBSY:
        return _unknown_requirement_error(device)
    if code == errno.EINVAL:
        return KeystoreError(
            f"{device} is not a LUKS device: check keystore.volume and keystore.partition",
            errno=code,
        )
    if code == errno.EIO:
        return KeystoreError(
            f"cannot read a LUKS header from {device} (too small or unreadable): "
            "check keystore.volume and keystore.partition",
            errno=code,
        )
    if code == errno.ENOTSUP:
        return KeystoreError(
            f"the LUKS header of {device} needs a feature this libcryptsetup lacks "
            "(unfinished reencryption?): update cryptsetup or repair the header",
            errno=code,
        )
    return KeystoreError(f"cannot load the LUKS header of {device}: {_strerror(code)}", errno=code)


if TYPE_CHECKING:  # mypy proves that the adapters implement the ports

    def _implements(c: LibCryptsetup, v: LuksVolume) -> tuple[Cryptsetup, LuksDevice]:
        return c, v
