"""Stateful fakes of everything the unlock sequence touches.

One ``World`` holds the machine's state: which disks are present, whether
the pool is imported (and read-only), its datasets with their real wrapping
keys and key status, the LUKS keystore with its key slots and tokens, the
device-mapper table, the mount table and systemd's masked units.  The fake
adapters change that state the way the real programs would, so tests assert
on the world, not on recorded calls.

The keystore's files are real files: mounting copies them into the (real,
temporary) mount point and unmounting removes them, so the real key-file
reader runs against them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lczfs_unlockd.errors import (
    AmbiguousPoolError,
    KeyAlreadyLoadedError,
    KeyLoadError,
    KeyRejectedError,
    KeystoreError,
    NoSuchDatasetError,
    NoTokenError,
    PinRefusedError,
    PinRequiredError,
    PoolError,
    PromptError,
    TeardownError,
    TpmError,
    UnlockError,
    WrongKeyError,
)
from lczfs_unlockd.ports import (
    DatasetInfo,
    Keyslot,
    MappingState,
    PoolScan,
    Ports,
    Tpm2Policy,
    VolumeKeyHook,
)
from lczfs_unlockd.ports import Token as LuksToken
from lczfs_unlockd.zfskeys import read_key_file

HEX_KEY = "0123456789abcdef" * 4
RAW_KEY = bytes(range(32))
PASSPHRASE_KEY = "correct horse battery"


def wrapping_key_for(keyformat: str, material: bytes, salt: int = 0, iters: int = 0) -> bytes:
    """Independent of lczfs_unlockd.zfskeys: what libzfs would derive."""
    if keyformat == "raw":
        return material
    line = material.split(b"\n", 1)[0]
    if keyformat == "hex":
        return bytes.fromhex(line.decode())
    return hashlib.pbkdf2_hmac(
        "sha1", line.split(b"\0", 1)[0], salt.to_bytes(8, "little"), iters, 32
    )


@dataclass
class Dataset:
    name: str
    keyformat: str = "none"
    keylocation: str = "none"
    encryption_root: str = ""
    salt: int = 0
    iters: int = 0
    wrapping_key: bytes | None = None
    loaded: bool = False

    @property
    def encrypted(self) -> bool:
        return self.keyformat != "none"


@dataclass
class Token:
    pin: str | None = None  # None: no PIN needed
    slot_key: str = "token-secret"
    available_after: float = 0.0  # world time at which its hardware shows up
    plugin: bool = True  # False: libcryptsetup has no plugin for its type (-ENOENT)
    failure: str | None = None  # the plugin fails (a TPM2 unseal after a firmware update)
    type: str = "systemd-tpm2"
    # A wrong PIN: "wrong" (-ENOANO) or "ambiguous" (-ENOTRECOVERABLE, systemd's
    # TPM2 plugin, also returned when the TPM fails whatever the PIN).
    refusal: str = "wrong"
    broken: bool = False  # with a PIN given, refuses even the right one (ambiguously)
    wrong_key: bool = False  # unlocks, but its key opens no key slot (-EPERM)
    # The token's JSON as the header has it; None: {"type": type, "keyslots": []}.
    json: str | None = None
    removed: bool = False  # crypt_token_json_set(NULL): its number stays free


@dataclass
class World:
    mountpoint: str
    pool: str = "rpool"
    disks: dict[str, bool] = field(default_factory=dict)  # path -> present
    mirror: bool = False
    imported: bool = False
    imported_readonly: bool = False
    other_pools_imported: set[str] = field(default_factory=set)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    volume: str = "rpool/volumes/bootsecrets"
    partition: int = 1
    luks_present: bool = True
    luks_valid: bool = True
    luks_passphrases: set[str] = field(default_factory=lambda: {"luks pass"})
    luks_keyfiles: dict[str, bytes] = field(default_factory=dict)  # path -> content (slot key)
    luks_key_slots_for_files: set[bytes] = field(default_factory=set)
    tokens: list[Token] = field(default_factory=list)  # token N = tokens[N]
    keyslots: set[int] = field(default_factory=lambda: {0})  # the header's key slots
    destroy_failure: str | None = None  # crypt_keyslot_destroy fails (read-only zvol)
    remove_failure: str | None = None  # crypt_token_json_set(NULL) fails (read-only zvol)
    # Key slot -> LUKS2 priority (0 ignore, 1 normal: the default) and KDF type
    # (argon2id, cryptsetup's default, unless set).
    keyslot_priority: dict[int, int] = field(default_factory=dict)
    keyslot_kdf: dict[int, str] = field(default_factory=dict)
    wall_time: float = 1_800_000_000.0  # the wall clock when the run starts (Clock.time)
    keystore_files: dict[str, bytes] = field(default_factory=dict)  # relative path -> content
    keystore_symlinks: dict[str, str] = field(default_factory=dict)  # relative path -> target
    mappings: dict[str, bool] = field(default_factory=dict)  # name -> read_only
    mounts: dict[str, str] = field(default_factory=dict)  # target -> source
    masked: dict[str, str] = field(default_factory=dict)  # unit -> state
    stopped: list[str] = field(default_factory=list)
    unit_files: dict[str, str] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)  # what the person types, in order
    prompts: list[tuple[str, bool]] = field(default_factory=list)  # (prompt, accept_cached)
    keynames: list[str | None] = field(default_factory=list)
    idents: list[str] = field(default_factory=list)  # the prompts' --id
    notifications: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    time: float = 0.0
    # Hooks: name -> callable run when the adapter reaches that point; it may
    # raise (to inject failures or SIGTERM) or change the world.
    hooks: dict[str, Callable[[World], None]] = field(default_factory=dict)
    # disk path -> world time at which it appears (hot-plug)
    appear_at: dict[str, float] = field(default_factory=dict)
    zvol_delay: float = 0.2
    imported_at: float | None = None
    scans: int = 0
    scan_timeouts: list[float | None] = field(default_factory=list)
    pool_guid: int = 1111
    # Other importable pools with the same name (a stale disk): their GUIDs.
    duplicate_guids: list[int] = field(default_factory=list)
    zpool_calls: list[tuple[str, tuple[str, ...], float | None]] = field(default_factory=list)
    next_mount_id: int = 100
    mount_ids: dict[str, int] = field(default_factory=dict)  # target -> mount ID
    bootfs: str | None = None
    # The keystore's LUKS header and volume key.
    luks_uuid: str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    volume_key: bytes = bytes(range(64))
    # The TPM2: present or not, its banks, PCR values (bank -> pcr -> value),
    # the measurement log, a failure to inject.
    tpm_present: bool = False
    tpm_banks: list[str] = field(default_factory=lambda: ["sha256"])
    pcrs: dict[str, dict[int, bytes]] = field(default_factory=dict)
    tpm_log: list[tuple[int, dict[str, bytes], str, str]] = field(default_factory=list)
    tpm_failure: str | None = None
    token_policies: list[Tpm2Policy | None] = field(default_factory=list)  # passed per try
    files: dict[str, str] = field(default_factory=dict)  # write_flag: path -> text

    def hook(self, name: str) -> None:
        if name in self.hooks:
            self.hooks[name](self)

    # -- derived state ------------------------------------------------------

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for disk, at in self.appear_at.items():
            if self.time >= at:
                self.disks[disk] = True

    def pool_state(self) -> str | None:
        present = [d for d, ok in self.disks.items() if ok]
        if not present:
            return None
        if len(present) == len(self.disks):
            return "ONLINE"
        return "DEGRADED" if self.mirror else "UNAVAIL"

    def device_nodes(self) -> set[str]:
        nodes = {d for d, ok in self.disks.items() if ok}
        zvols_ready = (
            self.imported
            and self.imported_at is not None
            and self.time - self.imported_at >= self.zvol_delay
            and self.volume in self.datasets
        )
        if zvols_ready:
            nodes.add(f"/dev/zvol/{self.volume}")
            if self.partition:
                nodes.add(f"/dev/zvol/{self.volume}-part{self.partition}")
        for name in self.mappings:
            nodes.add(f"/dev/mapper/{name}")
        return nodes

    @property
    def keystore_device(self) -> str:
        base = f"/dev/zvol/{self.volume}"
        return f"{base}-part{self.partition}" if self.partition else base

    def loaded_keys(self) -> dict[str, bool]:
        return {
            n: d.loaded for n, d in self.datasets.items() if d.encrypted and d.encryption_root == n
        }

    def clean(self) -> bool:
        """Nothing mapped, nothing mounted, no key file left in the mount point."""
        leftovers = os.listdir(self.mountpoint) if os.path.isdir(self.mountpoint) else []
        return not self.mappings and not self.mounts and not leftovers

    # -- construction helpers ----------------------------------------------

    def add_encryption_root(
        self,
        name: str,
        keyformat: str,
        material: bytes,
        *,
        file: str | None = None,
        salt: int = 0x1122334455667788,
        iters: int = 1000,
        keylocation: str | None = None,
    ) -> Dataset:
        file = file or f"{name.replace('/', '_')}.key"
        if keyformat != "passphrase":
            salt, iters = 0, 0
        ds = Dataset(
            name=name,
            keyformat=keyformat,
            keylocation=keylocation or f"file://{self.mountpoint}/{file}",
            encryption_root=name,
            salt=salt,
            iters=iters,
            wrapping_key=wrapping_key_for(keyformat, material, salt, iters),
        )
        self.datasets[name] = ds
        self.keystore_files[file] = material
        return ds

    def add_child(self, name: str, root: str) -> None:
        parent = self.datasets[root]
        self.datasets[name] = Dataset(
            name=name, keyformat=parent.keyformat, keylocation="none", encryption_root=root
        )


def seed_world(mountpoint: str) -> World:
    """The seed's layout: rpool, bootsecrets zvol, rpool/crypt (hex) and children."""
    w = World(mountpoint=mountpoint, disks={"/dev/disk/by-id/nvme-disk-part2": True})
    w.datasets["rpool"] = Dataset(name="rpool")
    w.datasets["rpool/volumes"] = Dataset(name="rpool/volumes")
    w.datasets["rpool/volumes/bootsecrets"] = Dataset(name="rpool/volumes/bootsecrets")
    w.add_encryption_root("rpool/crypt", "hex", (HEX_KEY + "\n").encode(), file="rpoolcrypt.key")
    for child in ("local", "local/root", "local/nix", "safe", "safe/persist"):
        w.add_child(f"rpool/crypt/{child}", "rpool/crypt")
    return w


# ---------------------------------------------------------------------------


class FakeZpool:
    def __init__(self, world: World) -> None:
        self.w = world

    def health(self, pool: str, *, timeout: float | None = None) -> str | None:
        self.w.zpool_calls.append(("health", (), timeout))
        self.w.hook("health")
        if pool == self.w.pool and self.w.imported:
            return self.w.pool_state() or "SUSPENDED"
        return "ONLINE" if pool in self.w.other_pools_imported else None

    def guid(self, pool: str, *, timeout: float | None = None) -> int | None:
        self.w.zpool_calls.append(("guid", (), timeout))
        return self.w.pool_guid if pool == self.w.pool and self.w.imported else None

    def _duplicates(self, state: str | None) -> tuple[str, ...]:
        if not self.w.duplicate_guids:
            return ()
        return (
            f"GUID {self.w.pool_guid} ({state}, devices nvme-disk-part2)",
            *(f"GUID {g} (ONLINE, devices usb-stick)" for g in self.w.duplicate_guids),
        )

    def scan(
        self,
        pool: str,
        sources: Sequence[str],
        *,
        guid: int | None = None,
        timeout: float | None = None,
    ) -> PoolScan:
        self.w.scans += 1
        self.w.scan_timeouts.append(timeout)
        self.w.zpool_calls.append(("scan", tuple(sources), timeout))
        self.w.hook("scan")
        if pool != self.w.pool or self.w.imported:
            return PoolScan(state=None)
        if guid is not None and guid != self.w.pool_guid:
            return PoolScan(state=None)
        state = self.w.pool_state()
        missing = tuple(d.rsplit("/", 1)[-1] for d, ok in self.w.disks.items() if not ok)
        return PoolScan(
            state=state,
            missing=missing if state else (),
            guid=self.w.pool_guid,
            duplicates=self._duplicates(state) if guid is None else (),
        )

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
        self.w.zpool_calls.append(("import", tuple(sources), timeout))
        self.w.hook("import")
        if self.w.imported:
            return False  # imported meanwhile by someone else, as ZpoolCli reports it
        state = self.w.pool_state()
        if guid is None and self.w.duplicate_guids:
            raise AmbiguousPoolError(pool, self._duplicates(state))
        if guid is not None and guid != self.w.pool_guid:
            raise PoolError(f"cannot import '{guid}': no such pool available")
        if pool != self.w.pool or state not in ("ONLINE", "DEGRADED"):
            raise UnlockError(
                f'"zpool import -N {" ".join(sources)} {pool}" returned non-zero exit code 1: '
                "cannot import"
            )
        self.w.imported = True
        self.w.imported_readonly = readonly
        self.w.imported_at = self.w.time
        self.w.events.append(f"import {pool}{' readonly' if readonly else ''}")
        return True

    def bootfs(self, pool: str, *, timeout: float | None = None) -> str | None:
        if not self.w.imported or pool != self.w.pool:
            raise PoolError(f"cannot open '{pool}': no such pool")
        return self.w.bootfs

    def export_pool(self, pool: str, *, timeout: float | None = None) -> None:
        self.w.zpool_calls.append(("export", (), timeout))
        self.w.hook("export")
        if self.w.mappings:
            raise UnlockError(f"cannot export '{pool}': pool is busy")
        self.w.imported = False
        for d in self.w.datasets.values():
            d.loaded = False
        self.w.events.append(f"export {pool}")

    def datasets(
        self, names: Sequence[str], *, recursive: bool, timeout: float | None = None
    ) -> list[DatasetInfo]:
        self.w.zpool_calls.append(("datasets", tuple(names), timeout))
        self.w.hook("datasets")
        if not self.w.imported:
            raise NoSuchDatasetError(f"dataset {names[0]} does not exist")
        out = []
        for name in names:
            if name not in self.w.datasets:
                raise NoSuchDatasetError(f"dataset {name} does not exist")
            for ds in self.w.datasets.values():
                if ds.name == name or (recursive and ds.name.startswith(name + "/")):
                    root = self.w.datasets.get(ds.encryption_root)
                    out.append(
                        DatasetInfo(
                            name=ds.name,
                            encryption="aes-256-gcm" if ds.encrypted else "off",
                            encryption_root=ds.encryption_root or "-",
                            keyformat=ds.keyformat,
                            keylocation=ds.keylocation,
                            keystatus=("available" if root and root.loaded else "unavailable")
                            if ds.encrypted
                            else "-",
                            pbkdf2salt=ds.salt,
                            pbkdf2iters=ds.iters,
                        )
                    )
        return out


class FakeKeys:
    def __init__(self, world: World) -> None:
        self.w = world
        self.seen: list[bytes] = []

    def read_key_file(self, mountpoint: str, path: str, *, dataset: str) -> bytearray:
        return read_key_file(mountpoint, path, dataset=dataset)  # the real one: files are real

    def load_key(self, dataset: str, wrapping_key: bytearray, *, noop: bool) -> None:
        self.w.hook("load_key")
        ds = self.w.datasets.get(dataset)
        if ds is None or not self.w.imported:
            raise KeyLoadError(
                f"cannot load the key of {dataset}: no such dataset", errno=errno.ENOENT
            )
        if ds.encryption_root != dataset:
            raise KeyLoadError(
                f"cannot load the key of {dataset}: not an encryption root", errno=errno.EINVAL
            )
        if ds.loaded:
            raise KeyAlreadyLoadedError(f"the key of {dataset} is already loaded")
        self.seen.append(bytes(wrapping_key))
        if bytes(wrapping_key) != ds.wrapping_key:
            raise KeyRejectedError(f"zfs rejected the key for {dataset}: wrong key")
        if not noop:
            ds.loaded = True
            self.w.events.append(f"load-key {dataset}")

    def unload_key(self, dataset: str) -> None:
        self.w.hook("unload_key")
        ds = self.w.datasets.get(dataset)
        if ds is None or not ds.loaded:
            raise KeyLoadError(f"cannot unload the key of {dataset}: its key is not loaded")
        ds.loaded = False
        self.w.events.append(f"unload-key {dataset}")


class FakeLuks:
    def __init__(self, world: World, device: str) -> None:
        self.w = world
        self.device = device
        self.closed = False

    @property
    def luks_type(self) -> str:
        return "LUKS2"

    def tokens(self) -> list[LuksToken]:
        return [
            LuksToken(
                i, t.type,
                unusable=None if t.plugin else f"no plugin /plugins/libcryptsetup-token-{t.type}.so",
            )
            for i, t in enumerate(self.w.tokens)
            if not t.removed
        ]  # fmt: skip

    def token_json(self, token: int) -> str | None:
        if not 0 <= token < len(self.w.tokens) or self.w.tokens[token].removed:
            return None
        t = self.w.tokens[token]
        return t.json if t.json is not None else json.dumps({"type": t.type, "keyslots": []})

    def keyslot(self, slot: int) -> Keyslot | None:
        if slot not in self.w.keyslots:
            return None
        return Keyslot(
            slot, self.w.keyslot_priority.get(slot, 1), self.w.keyslot_kdf.get(slot, "argon2id")
        )

    def remove_token(self, token: int) -> None:
        self.w.hook("remove_token")
        if self.w.remove_failure:
            raise KeystoreError(self.w.remove_failure, errno=errno.EROFS)
        if self.token_json(token) is None:
            raise KeystoreError(f"cannot remove token {token}: no such token")
        self.w.tokens[token].removed = True
        self.w.events.append(f"remove token {token}")

    def destroy_one_time(self, slot: int, tokens: Sequence[int]) -> None:
        # As the real binding: SIGTERM and SIGINT wait until it is done.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            self._destroy(slot, tokens)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def _destroy(self, slot: int, tokens: Sequence[int]) -> None:
        self.w.hook("destroy")
        if self.w.destroy_failure:
            raise KeystoreError(self.w.destroy_failure, errno=errno.EROFS)
        if slot not in self.w.keyslots:
            raise KeystoreError(f"cannot destroy key slot {slot}: no such slot")
        self.w.keyslots.discard(slot)
        self.w.events.append(f"destroy slot {slot}")
        # libcryptsetup drops the slot's number from every token naming it.
        for t in self.w.tokens:
            fields = json.loads(t.json) if t.json is not None else None
            if isinstance(fields, dict) and str(slot) in fields.get("keyslots", []):
                fields["keyslots"] = [r for r in fields["keyslots"] if r != str(slot)]
                t.json = json.dumps(fields)
        for n in tokens:
            if self.w.remove_failure:
                raise KeystoreError(
                    f"destroyed key slot {slot}, but {self.w.remove_failure}", errno=errno.EROFS
                )
            if self.token_json(n) is None:
                raise KeystoreError(f"cannot remove token {n}: no such token")
            self.w.tokens[n].removed = True
            self.w.events.append(f"remove token {n}")

    def _any_token_may_use(self, t: Token) -> bool:
        """libcryptsetup's CRYPT_ANY_TOKEN passes over a token none of whose key
        slots exists with a priority above ignore (a token with no JSON of its
        own here names no slot in particular: usable)."""
        if t.json is None:
            return True
        refs = json.loads(t.json).get("keyslots", [])
        return any(
            r.isdigit() and int(r) in self.w.keyslots and self.w.keyslot_priority.get(int(r), 1)
            for r in refs
        )

    @property
    def uuid(self) -> str:
        return self.w.luks_uuid

    def _activate(
        self, name: str | None, read_only: bool, on_volume_key: VolumeKeyHook | None = None
    ) -> None:
        if on_volume_key is not None:
            # As the real binding: the volume key first, then activation with it.
            key = bytearray(self.w.volume_key)
            try:
                on_volume_key(key)
            finally:
                key[:] = bytes(len(key))
        self.w.hook("activate")
        if name is None:
            return
        if name in self.w.mappings:
            raise KeystoreError(f"{name} exists already", errno=errno.EEXIST)
        self.w.mappings[name] = read_only
        self.w.events.append(f"activate {name}{' ro' if read_only else ' rw'}")

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
        self.w.hook("token")
        self.w.token_policies.append(policy)
        tokens = [t for t in self.w.tokens if not t.removed and self._any_token_may_use(t)]
        if token is not None:
            self.w.events.append(f"try token {token}")
            tokens = [self.w.tokens[token]] if self.token_json(token) is not None else []
        if policy is not None:
            tokens = [t for t in tokens if t.type == "systemd-tpm2"]
        known = [t for t in tokens if t.plugin]
        if not known:
            raise NoTokenError(f"no token of {self.device} can be used", errno=errno.ENOENT)
        usable = [t for t in known if self.w.time >= t.available_after]
        if not usable:
            raise NoTokenError(f"the token of {self.device} is not present", errno=errno.EAGAIN)
        for tok in usable:
            if tok.failure:
                raise KeystoreError(tok.failure, errno=errno.EIO)
            if tok.pin is None:
                self._activate(name, read_only, on_volume_key)
                return
            if pin is None:
                raise PinRequiredError(f"a token of {self.device} needs a PIN")
            if tok.broken:
                raise PinRefusedError(f"the token of {self.device} refused this PIN or failed")
            if bytes(pin) == tok.pin.encode():
                if tok.wrong_key:
                    raise WrongKeyError(f"a token of {self.device} supplied a key no slot accepts")
                self._activate(name, read_only, on_volume_key)
                return
            if tok.refusal == "ambiguous":
                raise PinRefusedError(f"the token of {self.device} refused this PIN or failed")
        raise PinRequiredError(f"wrong PIN for {self.device}")

    def activate_by_passphrase(
        self,
        name: str | None,
        passphrase: bytearray,
        *,
        read_only: bool,
        on_volume_key: VolumeKeyHook | None = None,
    ) -> None:
        self.w.hook("passphrase")
        if bytes(passphrase).decode(errors="replace") not in self.w.luks_passphrases:
            raise WrongKeyError(f"no key slot of {self.device} accepts this passphrase")
        self._activate(name, read_only, on_volume_key)

    def activate_by_keyfile(
        self,
        name: str | None,
        path: str,
        *,
        read_only: bool,
        on_volume_key: VolumeKeyHook | None = None,
    ) -> None:
        self.w.hook("keyfile")
        if path not in self.w.luks_keyfiles:
            raise KeystoreError(f"cannot read key file {path}", errno=errno.ENOENT)
        if self.w.luks_keyfiles[path] not in self.w.luks_key_slots_for_files:
            raise WrongKeyError(f"no key slot of {self.device} accepts key file {path}")
        self._activate(name, read_only, on_volume_key)

    def close(self) -> None:
        self.closed = True


class FakeCryptsetup:
    def __init__(self, world: World) -> None:
        self.w = world
        self.opened: list[FakeLuks] = []

    def open(self, device: str) -> FakeLuks:
        self.w.hook("luks_open")
        if device not in self.w.device_nodes():
            raise KeystoreError(f"{device} does not exist", errno=errno.ENOENT)
        if not self.w.luks_present:
            raise KeystoreError(
                f"{device} is not a LUKS device: check keystore.volume and keystore.partition"
            )
        if not self.w.luks_valid:
            raise KeystoreError(
                f"the LUKS header of {device} is damaged: restore it from a header backup"
            )
        luks = FakeLuks(self.w, device)
        self.opened.append(luks)
        return luks

    def status(self, name: str) -> MappingState:
        return MappingState.ACTIVE if name in self.w.mappings else MappingState.INACTIVE

    def deactivate(self, name: str, *, deferred: bool = False) -> None:
        self.w.hook("deactivate")
        if f"/dev/mapper/{name}" in self.w.mounts.values():
            if deferred:
                self.w.events.append(f"deferred-deactivate {name}")
                return
            raise KeystoreError(f"cannot close {name}: device busy", errno=errno.EBUSY)
        if self.w.mappings.pop(name, None) is not None:
            self.w.events.append(f"deactivate {name}")


class FakeMounts:
    def __init__(self, world: World) -> None:
        self.w = world
        self.made: dict[int, str] = {}  # mount ID -> target, as LibcMounts keeps them

    def mount(self, source: str, target: str, fstype: str) -> int | None:
        self.w.hook("mount")
        name = source.removeprefix("/dev/mapper/")
        if name not in self.w.mappings:
            raise KeystoreError(
                f"cannot mount {source} on {target}: No such device", errno=errno.ENODEV
            )
        for rel, content in self.w.keystore_files.items():
            path = os.path.join(target, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        for rel, dest in self.w.keystore_symlinks.items():
            os.symlink(dest, os.path.join(target, rel))
        self.w.mounts[target] = source
        self.w.next_mount_id += 1
        self.w.mount_ids[target] = self.w.next_mount_id
        self.made[self.w.next_mount_id] = target
        self.w.events.append(f"mount {target}")
        return self.w.next_mount_id

    def unmount(self, target: str, *, lazy: bool = False) -> None:
        self.w.hook("unmount_lazy" if lazy else "unmount")
        if target not in self.w.mounts:
            raise TeardownError(f"cannot unmount {target}: Invalid argument")
        for entry in os.listdir(target):
            path = os.path.join(target, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        del self.w.mounts[target]
        self.w.mount_ids.pop(target, None)
        self.w.events.append(f"unmount {target}{' lazily' if lazy else ''}")

    def is_mounted(self, target: str) -> bool:
        return target in self.w.mounts or os.path.realpath(target) in self.w.mounts

    def mount_exists(self, mount_id: int) -> bool:
        point = self.made.get(mount_id)
        return point is not None and self.w.mount_ids.get(point) == mount_id


class FakeUnits:
    def __init__(self, world: World) -> None:
        self.w = world

    def stop_and_mask(self, units: Sequence[str]) -> None:
        self.w.hook("mask")
        for unit in units:
            self.w.stopped.append(unit)
            self.w.masked[unit] = "masked-runtime"
        self.w.events.append("mask " + " ".join(units))

    def unit_file_state(self, unit: str) -> str:
        return self.w.masked.get(unit) or self.w.unit_files.get(unit, "static")


class FakeAskPassword:
    def __init__(self, world: World) -> None:
        self.w = world

    def ask(
        self, prompt: str, *, ident: str, timeout: float, keyname: str | None, accept_cached: bool
    ) -> bytearray:
        self.w.prompts.append((prompt, accept_cached))
        self.w.keynames.append(keyname)
        self.w.idents.append(ident)
        self.w.hook("ask")
        if not self.w.answers:
            raise PromptError("no passphrase was entered (Timer expired)")
        return bytearray(self.w.answers.pop(0).encode())


class FakeNotifier:
    def __init__(self, world: World) -> None:
        self.w = world

    def send(self, **fields: str | int) -> None:
        self.w.notifications.append("\n".join(f"{k}={v}" for k, v in fields.items()))


class FakeFilesystem:
    def __init__(self, world: World) -> None:
        self.w = world

    def exists(self, path: str) -> bool:
        if path.startswith("/dev/"):
            return path in self.w.device_nodes()
        return os.path.exists(path)

    def listing(self, path: str) -> tuple[str, ...]:
        prefix = path.rstrip("/") + "/"
        return tuple(
            sorted(
                d[len(prefix) :] for d, ok in self.w.disks.items() if ok and d.startswith(prefix)
            )
        )

    def make_dirs(self, path: str, mode: int) -> list[str]:
        from lczfs_unlockd.filesystem import HostFilesystem

        return HostFilesystem().make_dirs(path, mode)

    def real_path(self, path: str) -> str:
        return os.path.realpath(path)

    def remove_dir(self, path: str) -> None:
        os.rmdir(path)

    def remove_flag(self, path: str) -> None:
        self.w.files.pop(path, None)

    def write_flag(self, path: str, text: str) -> None:
        self.w.hook("write_flag")
        self.w.files[path] = text


class FakeTpm:
    """A TPM2's PCRs: extend() hashes as the TPM does (old value || digest)."""

    def __init__(self, world: World) -> None:
        self.w = world

    def available(self) -> bool:
        return self.w.tpm_present

    def _check(self) -> None:
        if not self.w.tpm_present:
            raise TpmError("cannot open the TPM2 /dev/tpmrm0: no such file or directory")
        if self.w.tpm_failure:
            raise TpmError(self.w.tpm_failure)

    def banks(self) -> list[str]:
        self._check()
        return list(self.w.tpm_banks)

    def extend(
        self, pcr: int, digests: Mapping[str, bytes], *, event_type: str, description: str
    ) -> None:
        self.w.hook("extend")
        self._check()
        for bank, digest in digests.items():
            size = hashlib.new(bank).digest_size
            assert len(digest) == size, (bank, len(digest))
            old = self.w.pcrs.setdefault(bank, {}).get(pcr, bytes(size))
            self.w.pcrs[bank][pcr] = hashlib.new(bank, old + digest).digest()
        self.w.tpm_log.append((pcr, dict(digests), event_type, description))
        self.w.events.append(f"extend PCR {pcr}")


class FakeClock:
    def __init__(self, world: World) -> None:
        self.w = world

    def monotonic(self) -> float:
        return self.w.time

    def time(self) -> float:
        return self.w.wall_time + self.w.time

    def sleep(self, seconds: float) -> None:
        self.w.hook("sleep")
        self.w.advance(seconds)


def fake_ports(world: World) -> Ports:
    return Ports(
        zpool=FakeZpool(world),
        keys=FakeKeys(world),
        crypt=FakeCryptsetup(world),
        mounts=FakeMounts(world),
        units=FakeUnits(world),
        askpass=FakeAskPassword(world),
        notifier=FakeNotifier(world),
        fs=FakeFilesystem(world),
        clock=FakeClock(world),
        tpm=FakeTpm(world),
    )
