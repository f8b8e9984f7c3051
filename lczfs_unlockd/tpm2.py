"""The TPM2 through tpm2-tss (ctypes): the PCR banks, and a PCR extend with its log record.

What systemd-cryptsetup's ``tpm2-measure-pcr=yes`` does after an unlock,
minus the HMAC (the caller computes the digests): one TPM2_PCR_Extend with
a digest for each bank, and one record appended to systemd's userspace
measurement log (``/run/log/systemd/tpm2-measure.log``), so that
``systemd-pcrlock`` and remote attestation can replay the PCR.

The TPM is reached through the TSS libraries systemd's own TPM2 code uses:
``libtss2-tctildr`` turns the TCTI string (``device:/dev/tpmrm0``, the
kernel's resource manager, as systemd does; tests use ``swtpm:...``) into
a transport, ``libtss2-esys`` sends the commands.  No TPM command is
encoded here.  The libraries are loaded by full soname (``paths``) on first
use; ``libtss2-rc.so.0``, when present, turns return codes into text.  One
ESYS context per call: the daemon makes two calls per boot.

The log, as systemd's ``tpm2_extend_bytes`` writes it (src/shared/tpm2-util.c):
the file is opened and ``flock(LOCK_EX)``-ed after the TPM context exists
and before the extend, and held until the record is written, so no other
measurement can come between the two; mode 0600 (anyone who can open it
could lock it); its sticky bit is set across extend and write and cleared
once the record is synced — a log found with the bit set was left
half-written by a writer that died, and is not appended to (systemd's
rule).  A log that cannot be used only costs the record, never the
measurement: the extend still happens and a warning says why.  Where this
departs from systemd:

- the open has ``O_NONBLOCK`` (a FIFO at the path fails at once instead of
  blocking the boot until someone reads it) and ``O_APPEND``;
- the lock is waited for at most :data:`LOG_LOCK_TIMEOUT` seconds (systemd
  waits forever); then the PCR is extended without a record: the
  measurement is what stops a second unseal in this boot, the record is
  bookkeeping;
- when the TPM itself refused the extend (a TPM-layer return code: nothing
  was extended) the sticky bit is cleared again; any other failure (the
  transport broke mid-command: it may have been extended) leaves it set,
  as systemd does for every failure;
- the JSON is ASCII (``\\u`` escapes), which every JSON reader decodes to
  the same text systemd's UTF-8 would.

Only digests pass through here — never key material; digests are public
(they are in the log), so they are logged at debug level.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from functools import cache

from . import paths
from .errors import TpmError
from .libc import Signature, declare

__all__ = [
    "BANK_ALGORITHMS",
    "LOG_LOCK_TIMEOUT",
    "TPML_DIGEST_VALUES",
    "TPML_PCR_SELECTION",
    "TPMS_PCR_SELECTION",
    "TPMT_HA",
    "Tpm2Device",
]

log = logging.getLogger("lczfs_unlockd.tpm2")

# <tss2/tss2_tpm2_types.h>, <tss2/tss2_esys.h>
TPM2_ALG_SHA1 = 0x0004
TPM2_ALG_SHA256 = 0x000B
TPM2_ALG_SHA384 = 0x000C
TPM2_ALG_SHA512 = 0x000D
# hashlib name -> (TPM2_ALG_ID, digest size)
BANK_ALGORITHMS: dict[str, tuple[int, int]] = {
    "sha1": (TPM2_ALG_SHA1, 20),
    "sha256": (TPM2_ALG_SHA256, 32),
    "sha384": (TPM2_ALG_SHA384, 48),
    "sha512": (TPM2_ALG_SHA512, 64),
}
_BANK_NAMES = {alg: name for name, (alg, _) in BANK_ALGORITHMS.items()}
TPM2_CAP_PCRS = 5
TPM2_SU_CLEAR = 0x0000
TPM2_RC_INITIALIZE = 0x100  # TPM2_Startup: the TPM was started already
TPM2_NUM_PCR_BANKS = 16
TPM2_PCR_SELECT_MAX = 4  # (TPM2_MAX_PCRS 32 + 7) / 8
TPM2_PCRS = 24  # PCRs 0..23 in every PC client TPM
TPMU_HA_SIZE = 64  # the largest digest (sha512)
ESYS_TR_NONE = 0xFFF
ESYS_TR_PASSWORD = 0x0FF
ESYS_TR_PCR0 = 0
# TSS2_RC: bits 16..23 name the layer that made the code; 0 is the TPM itself.
_RC_LAYER_MASK = 0xFF << 16
TSS2_TPM_RC_LAYER = 0

# How long extend() waits for another writer's (or a quote reader's) lock on the log.
LOG_LOCK_TIMEOUT = 10.0
_LOCK_POLL = 0.05
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# What an open(2) failure of the log means, for the warning.
_OPEN_ERRORS = {
    errno.ELOOP: "it is a symlink (never written through)",
    errno.ENXIO: "it is not a regular file (a FIFO or socket)",
    errno.EISDIR: "it is a directory",
}
LIBTSS2_RC = "libtss2-rc.so.0"  # optional: only for the text of a return code

_WHAT_TO_DO_LIBS = (
    "put tpm2-tss's libraries (libtss2-esys, libtss2-tctildr, libtss2-mu, libtss2-sys and "
    "the TCTI module, libtss2-tcti-device.so.0) into the initrd"
)


class TPMS_PCR_SELECTION(ctypes.Structure):
    _fields_ = [
        ("hash", ctypes.c_uint16),
        ("sizeofSelect", ctypes.c_uint8),
        ("pcrSelect", ctypes.c_uint8 * TPM2_PCR_SELECT_MAX),
    ]


class TPML_PCR_SELECTION(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint32),
        ("pcrSelections", TPMS_PCR_SELECTION * TPM2_NUM_PCR_BANKS),
    ]


class _TPMS_CAPABILITY_DATA_PCRS(ctypes.Structure):
    """TPMS_CAPABILITY_DATA read as its TPM2_CAP_PCRS member: the union
    TPMU_CAPABILITIES (4-byte aligned) follows the UINT32 capability."""

    _fields_ = [("capability", ctypes.c_uint32), ("assignedPCR", TPML_PCR_SELECTION)]


class TPMT_HA(ctypes.Structure):
    # TPMU_HA is a union of byte arrays: 64 bytes, byte aligned.
    _fields_ = [("hashAlg", ctypes.c_uint16), ("digest", ctypes.c_uint8 * TPMU_HA_SIZE)]


class TPML_DIGEST_VALUES(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32), ("digests", TPMT_HA * TPM2_NUM_PCR_BANKS)]


_c = ctypes
_ctx = _c.c_void_p
_ESYS: dict[str, Signature] = {
    # (ESYS_CONTEXT **, TSS2_TCTI_CONTEXT *, TSS2_ABI_VERSION * (NULL: this one))
    "Esys_Initialize": (_c.c_uint32, [_c.POINTER(_ctx), _c.c_void_p, _c.c_void_p]),
    "Esys_Finalize": (None, [_c.POINTER(_ctx)]),
    "Esys_Startup": (_c.c_uint32, [_ctx, _c.c_uint16]),
    # (ctx, 3 sessions, capability, property, count, &moreData, &capabilityData)
    "Esys_GetCapability": (
        _c.c_uint32,
        [_ctx, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.c_uint32,
         _c.POINTER(_c.c_uint8), _c.POINTER(_c.POINTER(_TPMS_CAPABILITY_DATA_PCRS))],
    ),
    "Esys_Free": (None, [_c.c_void_p]),
    # (ctx, pcrHandle, 3 sessions, const TPML_DIGEST_VALUES *)
    "Esys_PCR_Extend": (
        _c.c_uint32,
        [_ctx, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.POINTER(TPML_DIGEST_VALUES)],
    ),
}  # fmt: skip
_TCTILDR: dict[str, Signature] = {
    "Tss2_TctiLdr_Initialize": (_c.c_uint32, [_c.c_char_p, _c.POINTER(_c.c_void_p)]),
    "Tss2_TctiLdr_Finalize": (None, [_c.POINTER(_c.c_void_p)]),
}


def _load(names: tuple[str, ...], signatures: dict[str, Signature]) -> ctypes.CDLL:
    failures = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            failures.append(f"{name} ({e})")
            continue
        try:
            declare(lib, signatures)
        except AttributeError as e:
            failures.append(f"{name} (too old: {e})")
            continue
        return lib
    raise TpmError(
        f"cannot load {' or '.join(names)} for the TPM2 measurement: {'; '.join(failures)}; "
        f"{_WHAT_TO_DO_LIBS}",
        errno=errno.EOPNOTSUPP,
    )


@cache
def _esys_library(names: tuple[str, ...]) -> ctypes.CDLL:
    return _load(names, _ESYS)


@cache
def _tctildr_library(names: tuple[str, ...]) -> ctypes.CDLL:
    return _load(names, _TCTILDR)


@cache
def _rc_decoder() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBTSS2_RC)
        declare(lib, {"Tss2_RC_Decode": (ctypes.c_char_p, [ctypes.c_uint32])})
    except (OSError, AttributeError):
        return None
    return lib


def describe_rc(rc: int) -> str:
    """A TSS2_RC as text: Tss2_RC_Decode's words and the code, or the code alone."""
    lib = _rc_decoder()
    if lib is not None:
        text = lib.Tss2_RC_Decode(rc)
        if text:
            return f"{text.decode('utf-8', 'replace')} (0x{rc:x})"
    return f"TSS2 return code 0x{rc:x}"


def _tpm_answered(rc: int) -> bool:
    """The TPM itself returned the code: the command was received and not executed."""
    return rc & _RC_LAYER_MASK == TSS2_TPM_RC_LAYER


def digest_values(digests: Mapping[str, bytes]) -> TPML_DIGEST_VALUES:
    """The TPML_DIGEST_VALUES of ``digests`` (bank -> digest), in their order.

    ValueError for a caller's mistake: no digest, an unknown bank, a digest
    of the wrong size.
    """
    if not digests:
        raise ValueError("extend needs at least one digest")
    if len(digests) > TPM2_NUM_PCR_BANKS:
        raise ValueError(f"at most {TPM2_NUM_PCR_BANKS} digests")
    values = TPML_DIGEST_VALUES()
    for i, (bank, digest) in enumerate(digests.items()):
        if bank not in BANK_ALGORITHMS:
            raise ValueError(f"unknown PCR bank {bank!r} (one of {', '.join(BANK_ALGORITHMS)})")
        alg, size = BANK_ALGORITHMS[bank]
        if len(digest) != size:
            raise ValueError(f"a {bank} digest has {size} bytes, not {len(digest)}")
        values.digests[i].hashAlg = alg
        ctypes.memmove(values.digests[i].digest, bytes(digest), size)
    values.count = len(digests)
    return values


def _boot_id() -> str:
    """The boot ID the way systemd writes an ID128 in JSON: 32 lowercase hex digits."""
    with open(BOOT_ID, encoding="ascii") as f:
        text = f.read(64).strip().replace("-", "").lower()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise OSError(errno.EINVAL, f"{BOOT_ID} holds no boot ID")
    return text


def log_record(
    pcr: int, digests: Mapping[str, bytes], *, event_type: str, description: str
) -> bytes:
    """One RFC 7464 JSON-SEQ record of systemd's userspace measurement log."""
    content: dict[str, object] = {}
    if description:
        content["string"] = description
    content["bootId"] = _boot_id()
    content["timestamp"] = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000
    if event_type:
        content["eventType"] = event_type
    record = {
        "pcr": pcr,
        "digests": [{"hashAlg": bank, "digest": bytes(d).hex()} for bank, d in digests.items()],
        "content_type": "systemd",
        "content": content,
    }
    return b"\x1e" + json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def _make_parents(directory: str) -> None:
    """Create ``directory`` and its missing parents, each 0755 (as systemd's mkdir_parents)."""
    if not directory or os.path.isdir(directory):
        return
    _make_parents(os.path.dirname(directory.rstrip("/")))
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o755)


class Tpm2Device:
    """``ports.Tpm`` on the TPM2 that ``tcti`` names, logging to ``log_path``."""

    def __init__(self, tcti: str = paths.TPM2_TCTI, log_path: str = paths.TPM2_MEASURE_LOG) -> None:
        self.tcti = tcti
        self.log_path = log_path

    def available(self) -> bool:
        """For the ``device`` TCTI, whether its node exists (no library is
        loaded); any other TCTI (swtpm, mssim) is assumed reachable."""
        driver, _, conf = self.tcti.partition(":")
        if driver == "device":
            return os.path.exists(conf or "/dev/tpm0")  # tcti-device's default
        return True

    def banks(self) -> list[str]:
        """The banks with at least one PCR allocated (a TPM lists every bank
        it implements, allocated or not), in the TPM's order."""
        with self._context() as (lib, ctx):
            more = ctypes.c_uint8()
            data = ctypes.POINTER(_TPMS_CAPABILITY_DATA_PCRS)()
            rc = lib.Esys_GetCapability(
                ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                TPM2_CAP_PCRS, 0, 1, ctypes.byref(more), ctypes.byref(data),
            )  # fmt: skip
            if rc != 0:
                raise self._failed("reading the PCR banks of", rc)
            try:
                return self._parse_banks(data.contents)
            finally:
                lib.Esys_Free(data)

    def _parse_banks(self, data: _TPMS_CAPABILITY_DATA_PCRS) -> list[str]:
        selection = data.assignedPCR
        if data.capability != TPM2_CAP_PCRS or selection.count > TPM2_NUM_PCR_BANKS:
            raise TpmError(
                f"the TPM2 at {self.tcti} answered the PCR bank query with nonsense "
                f"(capability {data.capability}, {selection.count} banks); is it a TPM2?",
                errno=errno.EIO,
            )
        banks = []
        for entry in selection.pcrSelections[: selection.count]:
            if entry.sizeofSelect > TPM2_PCR_SELECT_MAX:
                raise TpmError(
                    f"the TPM2 at {self.tcti} reports a PCR selection of {entry.sizeofSelect} "
                    f"bytes (at most {TPM2_PCR_SELECT_MAX}); is it a TPM2?",
                    errno=errno.EIO,
                )
            name = _BANK_NAMES.get(entry.hash)
            if name is None:
                log.debug("TPM2 bank 0x%04x left out: not a hash measured with", entry.hash)
                continue
            if not any(entry.pcrSelect[: entry.sizeofSelect]):
                log.debug("TPM2 bank %s left out: no PCR allocated in it", name)
                continue
            banks.append(name)
        return banks

    def extend(
        self, pcr: int, digests: Mapping[str, bytes], *, event_type: str, description: str
    ) -> None:
        """One TPM2_PCR_Extend of ``pcr`` with ``digests``, and its log record
        (see the module's docstring for the log's rules)."""
        if not 0 <= pcr < TPM2_PCRS:
            raise ValueError(f"PCR {pcr} is not one of 0..{TPM2_PCRS - 1}")
        values = digest_values(digests)
        try:
            with self._context() as (lib, ctx), self._locked_log() as log_fd:
                for bank, digest in digests.items():
                    log.debug("extending PCR %d, %s bank, with %s", pcr, bank, bytes(digest).hex())
                rc = lib.Esys_PCR_Extend(
                    ctx, ESYS_TR_PCR0 + pcr, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                    ctypes.byref(values),
                )  # fmt: skip
                if rc != 0:
                    if log_fd is not None:
                        self._after_failed_extend(log_fd, rc)
                    raise self._failed(f"extending PCR {pcr} of", rc)
                if log_fd is not None:
                    self._append(log_fd, pcr, digests, event_type, description)
        finally:
            ctypes.memset(ctypes.byref(values), 0, ctypes.sizeof(values))

    # --- the TSS context ------------------------------------------------------------

    @contextlib.contextmanager
    def _context(self) -> Iterator[tuple[ctypes.CDLL, ctypes.c_void_p]]:
        """A TCTI and an ESYS context on it, both finalized on the way out."""
        esys = _esys_library(paths.LIBTSS2_ESYS)
        tctildr = _tctildr_library(paths.LIBTSS2_TCTILDR)
        tcti = ctypes.c_void_p()
        rc = tctildr.Tss2_TctiLdr_Initialize(self.tcti.encode(), ctypes.byref(tcti))
        if rc != 0 or not tcti:
            raise TpmError(
                f"cannot reach the TPM2 through TCTI {self.tcti}: {describe_rc(rc)}; check that "
                "the TPM is there and enabled in the firmware, that its driver is in the initrd "
                f"and that the TCTI's module (libtss2-tcti-{self.tcti.partition(':')[0]}.so.0) "
                "is in the initrd too",
                errno=errno.ENODEV,
            )
        try:
            ctx = ctypes.c_void_p()
            try:
                rc = esys.Esys_Initialize(ctypes.byref(ctx), tcti, None)
                if rc != 0:
                    raise self._failed("setting up a TSS context for", rc, errno.ENODEV)
                # As systemd does: a TPM the firmware left unstarted is started.
                rc = esys.Esys_Startup(ctx, TPM2_SU_CLEAR)
                if rc not in (0, TPM2_RC_INITIALIZE):
                    raise self._failed("starting up", rc, errno.ENODEV)
                yield esys, ctx
            finally:
                if ctx:
                    esys.Esys_Finalize(ctypes.byref(ctx))
        finally:
            tctildr.Tss2_TctiLdr_Finalize(ctypes.byref(tcti))

    def _failed(self, doing: str, rc: int, errno_: int = errno.EIO) -> TpmError:
        return TpmError(
            f"{doing} the TPM2 at {self.tcti} failed: {describe_rc(rc)}; check the TPM with "
            "tpm2_selftest and tpm2_getcap properties-variable (failure mode, lockout, disabled "
            "in the firmware settings)",
            errno=errno_,
        )

    # --- the measurement log --------------------------------------------------------

    @contextlib.contextmanager
    def _locked_log(self) -> Iterator[int | None]:
        """The log, opened, locked and marked in progress; None when it cannot be used."""
        fd = self._open_log()
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)  # drops the lock

    def _open_log(self) -> int | None:
        path = self.log_path
        try:
            _make_parents(os.path.dirname(path))
            fd = os.open(
                path,
                os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
                | os.O_NOCTTY | os.O_NONBLOCK,
                0o600,
            )  # fmt: skip
        except OSError as e:
            reason = _OPEN_ERRORS.get(e.errno or 0) or f"cannot open it ({e.strerror or e})"
            self._no_record(reason)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._no_record("it is not a regular file")
                os.close(fd)
                return None
            if not self._lock(fd):
                self._no_record(f"another process held its lock for {LOG_LOCK_TIMEOUT:g} s")
                os.close(fd)
                return None
            st = os.fstat(fd)
            if st.st_mode & stat.S_ISVTX:
                self._no_record(
                    "it is marked incomplete (sticky bit: an earlier writer died between a "
                    "measurement and its record), so it is not appended to"
                )
                os.close(fd)
                return None
            os.fchmod(fd, 0o600 | stat.S_ISVTX)
        except OSError as e:
            self._no_record(f"cannot lock or mark it ({e.strerror or e})")
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _lock(fd: int) -> bool:
        deadline = time.monotonic() + LOG_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(_LOCK_POLL)

    def _no_record(self, reason: str) -> None:
        log.warning(
            "TPM2 measurement log %s: %s; measuring without a record there, so "
            "systemd-pcrlock cannot replay the PCR in this boot",
            self.log_path, reason,
        )  # fmt: skip

    def _append(
        self, fd: int, pcr: int, digests: Mapping[str, bytes], event_type: str, description: str
    ) -> None:
        """Write the record, sync, clear the in-progress mark, sync (as systemd does)."""
        try:
            record = log_record(pcr, digests, event_type=event_type, description=description)
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, 0o600)
            os.fsync(fd)
        except OSError as e:
            log.warning(
                "TPM2 measurement log %s: the PCR was extended but its record could not be "
                "written (%s); the log stays marked incomplete",
                self.log_path, e.strerror or e,
            )  # fmt: skip

    def _after_failed_extend(self, fd: int, rc: int) -> None:
        if not _tpm_answered(rc):
            log.warning(
                "TPM2 measurement log %s: the extend may or may not have reached the TPM "
                "(%s); the log stays marked incomplete", self.log_path, describe_rc(rc),
            )  # fmt: skip
            return
        with contextlib.suppress(OSError):  # the TPM refused: nothing to record
            os.fchmod(fd, 0o600)
