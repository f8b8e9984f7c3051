"""The small interfaces the boot steps depend on, and :class:`Ports`, the set of them.

The steps (``pool.py``, ``keystore.py``, ``mount.py``, ``keys.py``,
``teardown.py``) only talk to these protocols.  The real adapters live in
``zpool.py``, ``zfskeys.py``, ``cryptsetup.py``, ``filesystem.py``,
``units.py``, ``askpass.py`` and ``notify.py``, and only ``cli.py`` builds
them; the unit tests inject stateful fakes (``tests/fakes.py``).  Imports
nothing of the package.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PoolScan:
    """What ``zpool import -d DIR`` says about one pool that is not imported."""

    state: str | None  # ONLINE, DEGRADED, UNAVAIL, FAULTED ...; None: not found
    missing: tuple[str, ...] = ()  # vdevs reported UNAVAIL/FAULTED/REMOVED
    detail: str = ""  # zpool's own status/action text, for the error message
    guid: int | None = None  # the pool's GUID (zpool import's "id:")
    # When more than one importable pool carries the name (a reused disk, a
    # USB stick with another rpool): one line about each (GUID, state,
    # devices), for an error message.  Empty otherwise.
    duplicates: tuple[str, ...] = ()


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
    """The zpool/zfs programs.  Every call has a deadline (``timeout`` seconds;
    None: the adapter's default bound) and raises PoolError (ETIMEDOUT when
    it was overrun; NoSuchDatasetError when ``datasets`` names one that is
    not there)."""

    def health(self, pool: str, *, timeout: float | None = None) -> str | None:
        """Health of an imported pool, or None when it is not imported."""

    def guid(self, pool: str, *, timeout: float | None = None) -> int | None:
        """GUID of an imported pool, or None when it is not imported."""

    def scan(
        self,
        pool: str,
        sources: Sequence[str],
        *,
        guid: int | None = None,
        timeout: float | None = None,
    ) -> PoolScan:
        """Look for the pool (the one with ``guid``, if given) in ``sources``
        (``zpool import -d`` arguments: a directory or devices) without importing it."""

    def import_pool(
        self,
        pool: str,
        sources: Sequence[str],
        *,
        guid: int | None = None,
        force: bool,
        readonly: bool,
        timeout: float | None = None,
    ) -> bool:
        """Import the pool; False when it failed because someone else (zfs-import-scan,
        an admin) imported it meanwhile: then it is not ours to export."""

    def export_pool(self, pool: str, *, timeout: float | None = None) -> None: ...

    def bootfs(self, pool: str, *, timeout: float | None = None) -> str | None:
        """The imported pool's ``bootfs`` property; None when it is not set."""

    def datasets(
        self, names: Sequence[str], *, recursive: bool, timeout: float | None = None
    ) -> list[DatasetInfo]: ...


class KeyLoader(Protocol):
    """The ZFS keys: read a key file from the keystore, hand a wrapping key to ZFS."""

    def read_key_file(self, mountpoint: str, path: str, *, dataset: str) -> bytearray:
        """The contents of the key file ``path`` beneath ``mountpoint`` (the caller
        wipes them); ``KeyFileError`` when it is missing, unsafe or too big."""

    def load_key(self, dataset: str, wrapping_key: bytearray, *, noop: bool) -> None:
        """``noop``: only check the key.  ``KeyRejectedError`` for a wrong key,
        ``KeyAlreadyLoadedError``, else ``KeyLoadError``."""

    def unload_key(self, dataset: str) -> None:
        """Unload the key of an encryption root (nothing of it may be mounted);
        ``KeyLoadError`` when ZFS refuses."""


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


@dataclass(frozen=True)
class Keyslot:
    """One active key slot, as libcryptsetup describes it."""

    id: int
    priority: int  # 0 ignore (only an explicitly named token opens it), 1 normal, 2 prefer
    kdf: str  # "pbkdf2", "argon2id", ...


@dataclass(frozen=True)
class Tpm2Policy:
    """Where systemd's TPM2 token plugin finds a signed PCR policy and a
    pcrlock policy; None: the plugin's own default location."""

    signature: str | None = None
    pcrlock: str | None = None


# Called with the volume key once a key has opened a key slot, before the
# mapping is activated with it; the key is wiped afterwards.  An exception
# from it stops the activation and propagates.
VolumeKeyHook = Callable[[bytearray], None]


class LuksDevice(Protocol):
    """One loaded LUKS header (``crypt_init`` + ``crypt_load``).

    Each ``activate_by_*`` with ``on_volume_key`` goes through the volume
    key (got with that key, then ``crypt_activate_by_volume_key``), so that
    the caller can measure it; without, libcryptsetup activates directly.
    """

    @property
    def luks_type(self) -> str: ...

    @property
    def uuid(self) -> str:
        """The LUKS header's UUID ("" when it has none)."""

    def tokens(self) -> list[Token]: ...

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
        """Any enrolled token (``token``: only that one); with ``policy``, only
        systemd-tpm2 tokens, given it."""

    def activate_by_passphrase(
        self,
        name: str | None,
        passphrase: bytearray,
        *,
        read_only: bool,
        on_volume_key: VolumeKeyHook | None = None,
    ) -> None: ...

    def activate_by_keyfile(
        self,
        name: str | None,
        path: str,
        *,
        read_only: bool,
        on_volume_key: VolumeKeyHook | None = None,
    ) -> None: ...

    def token_json(self, token: int) -> str | None:
        """The JSON text of token ``token`` as the header has it (hostile input:
        whoever can write the zvol wrote it); None when there is no such token."""

    def keyslot(self, slot: int) -> Keyslot | None:
        """Key slot ``slot`` if it is active; None when it is not."""

    def remove_token(self, token: int) -> None:
        """Remove token ``token`` from the header on disk (``KeystoreError``
        when the header cannot be written)."""

    def destroy_one_time(self, slot: int, tokens: Sequence[int]) -> None:
        """Destroy key slot ``slot``, then remove ``tokens`` in their order, in
        the header on disk, with SIGTERM and SIGINT held back (no handler can
        stop it half way).  ``KeystoreError`` at the first failure, saying what
        is left."""

    def close(self) -> None: ...


class Cryptsetup(Protocol):
    def open(self, device: str) -> LuksDevice: ...

    def status(self, name: str) -> MappingState: ...

    def deactivate(self, name: str, *, deferred: bool = False) -> None: ...


class Mounts(Protocol):
    def mount(self, source: str, target: str, fstype: str) -> int | None:
        """Mount read-only, nodev, nosuid, noexec; return the new mount's ID
        (mountinfo's first field), None if it cannot be told."""

    def unmount(self, target: str, *, lazy: bool = False) -> None: ...

    def is_mounted(self, target: str) -> bool:
        """Something is mounted on ``target`` (compared by its real path)."""

    def mount_exists(self, mount_id: int) -> bool:
        """The mount this adapter made with this ID is still there (the ID
        and the mount point it was made on: IDs are reused)."""


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
    def send(self, **fields: str | int) -> None:
        """Send sd_notify fields, e.g. ``send(STATUS=text, ERRNO=5)``; each value
        is one field (free text escaped, so it can never become another)."""


class Filesystem(Protocol):
    def exists(self, path: str) -> bool: ...

    def listing(self, path: str) -> tuple[str, ...]:
        """Sorted names in a directory; () when it does not exist (yet)."""

    def make_dirs(self, path: str, mode: int) -> list[str]:
        """Create ``path`` and missing parents with ``mode`` (or tighten an
        existing ``path``); return the directories created, outermost first."""

    def remove_dir(self, path: str) -> None: ...

    def real_path(self, path: str) -> str:
        """``path`` with every symlink resolved (os.path.realpath)."""

    def write_flag(self, path: str, text: str) -> None:
        """Create (or replace) the small root-only file ``path`` holding
        ``text``, and its directory (0755) if missing; never through a symlink."""

    def remove_flag(self, path: str) -> None:
        """Remove ``path`` if it is there."""


class Tpm(Protocol):
    """The TPM2, through the TSS libraries libcryptsetup's TPM2 token plugin
    uses.  Every failure is a ``TpmError``."""

    def available(self) -> bool:
        """A TPM2 device is there to talk to (its device node exists)."""

    def banks(self) -> list[str]:
        """The PCR banks the TPM has allocated, as hashlib names ("sha1",
        "sha256", "sha384", "sha512"), in the TPM's order; banks of other
        algorithms (SM3) are left out."""

    def extend(
        self, pcr: int, digests: Mapping[str, bytes], *, event_type: str, description: str
    ) -> None:
        """Extend ``pcr`` in each bank of ``digests`` (bank name -> digest of that
        bank's size) in one TPM2_PCR_Extend, and append the event to systemd's
        userspace measurement log the way systemd does (locked across both)."""


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float:
        """Wall-clock time, seconds since the epoch (an armed unlock's expiry)."""

    def sleep(self, seconds: float) -> None: ...


@dataclass
class Ports:
    """Everything the steps talk to: built by ``cli.real_ports``, or fakes."""

    zpool: Zpool
    keys: KeyLoader
    crypt: Cryptsetup
    mounts: Mounts
    units: Units
    askpass: AskPassword
    notifier: Notifier
    fs: Filesystem
    clock: Clock
    tpm: Tpm
