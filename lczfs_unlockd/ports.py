"""The small interfaces the unlock sequence depends on.

``unlock.py`` only talks to these protocols.  The real adapters live in
``zpool.py``, ``zfskeys.py``, ``cryptsetup.py``, ``mounts.py``, ``units.py``,
``askpass.py`` and ``notify.py``; the unit tests inject stateful fakes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PoolScan:
    """What ``zpool import -d DIR`` says about one pool that is not imported."""

    state: str | None  # ONLINE, DEGRADED, UNAVAIL, FAULTED ...; None: not found
    missing: tuple[str, ...] = ()  # vdevs reported UNAVAIL/FAULTED/REMOVED
    detail: str = ""  # zpool's own status/action text, for the error message


@dataclass(frozen=True)
class DatasetInfo:
    """Encryption properties of one dataset, as ``zfs get -p`` reports them."""

    name: str
    encryption: str  # "off", "aes-256-gcm", ...
    encryption_root: str  # "" or "-" when not encrypted
    keyformat: str  # raw, hex, passphrase, none
    keylocation: str  # prompt, file:///..., none
    keystatus: str  # available, unavailable, -
    pbkdf2salt: int = 0
    pbkdf2iters: int = 0


class Zpool(Protocol):
    def health(self, pool: str) -> str | None:
        """Health of an imported pool, or None when it is not imported."""

    def scan(self, pool: str, dev_nodes: str, *, timeout: float | None = None) -> PoolScan:
        """Scan ``dev_nodes`` for the pool without importing it, within ``timeout`` s."""

    def import_pool(self, pool: str, dev_nodes: str, *, force: bool, readonly: bool) -> None: ...

    def export_pool(self, pool: str) -> None: ...

    def datasets(self, names: Sequence[str], *, recursive: bool) -> list[DatasetInfo]: ...


class KeyLoader(Protocol):
    def load_key(self, dataset: str, wrapping_key: bytearray, *, noop: bool) -> None:
        """Raise ``WrongKeyError``-like ``KeyLoadError`` subclasses on failure."""


class MappingState(enum.Enum):
    INVALID = 0
    INACTIVE = 1
    ACTIVE = 2
    BUSY = 3


@dataclass(frozen=True)
class Token:
    """One enrolled LUKS2 token, as crypt_token_status() describes it."""

    id: int
    type: str  # "systemd-tpm2", "systemd-fido2", ...
    # Set when libcryptsetup has no handler for the type: why, naming the
    # plugin file it would need.
    unusable: str | None = None

    def describe(self) -> str:
        return f"token {self.id} ({self.type})"


class LuksDevice(Protocol):
    """One loaded LUKS header (``crypt_init`` + ``crypt_load``)."""

    @property
    def luks_type(self) -> str: ...

    def tokens(self) -> list[Token]: ...

    def activate_by_token(
        self, name: str | None, pin: bytearray | None, *, read_only: bool
    ) -> None: ...

    def activate_by_passphrase(
        self, name: str | None, passphrase: bytearray, *, read_only: bool
    ) -> None: ...

    def activate_by_keyfile(self, name: str | None, path: str, *, read_only: bool) -> None: ...

    def close(self) -> None: ...


class Cryptsetup(Protocol):
    def open(self, device: str) -> LuksDevice: ...

    def status(self, name: str) -> MappingState: ...

    def deactivate(self, name: str, *, deferred: bool = False) -> None: ...


class Mounts(Protocol):
    def mount(self, source: str, target: str, fstype: str) -> None:
        """Mount read-only, nodev, nosuid, noexec."""

    def unmount(self, target: str, *, lazy: bool = False) -> None: ...

    def is_mounted(self, target: str) -> bool: ...


class Units(Protocol):
    def stop_and_mask(self, units: Sequence[str]) -> None:
        """Stop each unit and mask it in /run (runtime)."""

    def unit_file_state(self, unit: str) -> str: ...


class AskPassword(Protocol):
    def ask(
        self, prompt: str, *, ident: str, timeout: float, keyname: str | None, accept_cached: bool
    ) -> bytearray:
        """Ask through systemd's password agents; raise PromptError on cancel/timeout.

        ``keyname``: the kernel keyring entry to share the answer through
        (``cryptsetup`` for passphrases), None to keep it private (PINs).
        """


class Notifier(Protocol):
    def notify(self, message: str) -> None:
        """Send one sd_notify datagram (``KEY=value`` lines)."""


class Filesystem(Protocol):
    def exists(self, path: str) -> bool: ...

    def listing(self, path: str) -> tuple[str, ...]:
        """Sorted names in a directory; () when it does not exist (yet)."""

    def make_dir(self, path: str, mode: int) -> bool:
        """Create ``path`` with ``mode`` (or tighten it); True if it was created."""

    def remove_dir(self, path: str) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...
