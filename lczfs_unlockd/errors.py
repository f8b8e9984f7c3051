"""The one domain error type and its subclasses: every exception the daemon raises.

Imports nothing of the package, so every module can use it.  Every message
is lowercase, names the config key, dataset, device or path involved and
says what to do.  ``errno`` becomes systemd's ``ERRNO=``.
Messages never contain key material.
"""

from __future__ import annotations

import errno as _errno


class UnlockError(Exception):
    """Something the operator must fix; the message says what and how."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        return self.message


class ConfigError(UnlockError):
    errno = _errno.EINVAL


class PoolError(UnlockError):
    errno = _errno.ENODEV


class KeystoreError(UnlockError):
    errno = _errno.EIO


class WrongKeyError(KeystoreError):
    """A passphrase, key file or token PIN did not open any keyslot."""

    errno = _errno.EPERM


class PinRequiredError(KeystoreError):
    """A LUKS2 token needs a PIN (libcryptsetup returned -ENOANO)."""

    errno = _errno.ENOANO


class PinRefusedError(PinRequiredError):
    """A token refused a PIN in a way that need not be the PIN's fault.

    systemd's TPM2 plugin returns -ENOTRECOVERABLE for a wrong PIN and for
    any other unseal failure alike: worth asking again, but not forever.
    """

    errno = _errno.ENOTRECOVERABLE


class NoTokenError(KeystoreError):
    """No LUKS2 token could be used (none enrolled, plugin or device missing)."""

    errno = _errno.ENOENT


class PromptError(KeystoreError):
    """A password prompt was cancelled or timed out."""

    errno = _errno.ECANCELED


class NoSuchDatasetError(PoolError):
    """``zfs get`` named a dataset (or zvol) that the imported pool does not have."""

    errno = _errno.ENOENT


class KeyLoadError(UnlockError):
    errno = _errno.EACCES


class KeyFileError(KeyLoadError):
    """The key file is missing, unsafe or malformed."""

    errno = _errno.EINVAL


class KeyRejectedError(KeyLoadError):
    """ZFS says the wrapping key is wrong (lzc_load_key: EACCES)."""

    errno = _errno.EACCES


class KeyAlreadyLoadedError(KeyLoadError):
    errno = _errno.EEXIST


class TpmError(UnlockError):
    """The TPM2 could not be used: not there, a TSS library missing, a command failed."""

    errno = _errno.ENODEV


class RootRefusedError(UnlockError):
    """The dataset that would be mounted as root is not one this run may vouch for."""

    errno = _errno.EPERM


class TeardownError(UnlockError):
    errno = _errno.EBUSY


class LuksAdminError(UnlockError):
    """A LUKS header change or query of the operations commands failed (stage 2)."""


class OpsError(UnlockError):
    """An operations command (setup, status, enroll, arm-reboot) cannot go on:
    the message says what is wrong and what to do; nothing was left half-done,
    or the message lists the commands that finish or undo it."""


class CommandTimeout(UnlockError):
    """A program did not finish in time (it was killed, and reaped if it could be).

    ``reaped``: False when the child did not exit even after SIGKILL (stuck in
    the kernel): what it asked for may still happen after the caller moved on.
    """

    errno = _errno.ETIMEDOUT

    def __init__(self, message: str, *, reaped: bool = True) -> None:
        super().__init__(message)
        self.reaped = reaped


class CommandError(UnlockError):
    """A program failed; the message holds the pasteable command line and its output."""

    def __init__(self, command: str, returncode: int, detail: str) -> None:
        message = f'"{command}" returned non-zero exit code {returncode}'
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.returncode = returncode


class Interrupted(BaseException):
    """SIGTERM/SIGINT arrived; raised so that every teardown callback runs.

    A BaseException, like KeyboardInterrupt: code that catches Exception
    (logging's handlers, for one) must not swallow it.
    """

    errno: int = _errno.EINTR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NoUsableKeyslotError(KeystoreError):
    """No key slot of the header can take a passphrase or key file at all.

    Every slot is unbound (holds no key of this volume), has priority
    ``ignore``, or there is none: asking again cannot help, another unlock
    method (or a header backup) may.
    """

    errno = _errno.ENOKEY


class AmbiguousPoolError(PoolError):
    """More than one importable pool carries the configured name.

    A reused disk with stale labels, a USB stick with another ``rpool``:
    retrying cannot help, and importing either could boot the wrong one.
    """

    errno = _errno.ENOTUNIQ

    def __init__(self, pool: str, duplicates: tuple[str, ...] | list[str]) -> None:
        listed = "; ".join(duplicates) if duplicates else "zpool import -d lists them"
        super().__init__(
            f"more than one pool named {pool} can be imported: {listed}; set pool_guid to the "
            "GUID of the right one (zpool import shows each pool's id), or list the pool's "
            "disks in devices, or remove the other disk"
        )
