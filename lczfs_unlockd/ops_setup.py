"""``lczfs-unlockd setup``: from a pool whose encryption roots use a passphrase
prompt (or key files elsewhere) to the keystore scheme, without losing a key.

The order of the steps is what makes every stopping point safe, a SIGKILL
included:

1. everything that can be undone without a trace comes first: the zvol, its
   partition, LUKS2, ext4, the recovery key and any TPM2/FIDO2 token.  A
   failure there destroys the zvol again;
2. each encryption root then gets a key file that is durable (fsync of the
   file and of every directory above it, which ext4 turns into a flush that
   dm-crypt and the zvol pass on to the pool) and read back with the
   daemon's own reader and derivation *before* ``zfs change-key`` is run for
   it.  ``zfs change-key`` is one ZFS sync task: the dataset has its old key
   or its new one, never neither;
3. once one key has changed the keystore holds a live key and is never
   destroyed: a failure stops with, per encryption root, which key it uses
   now and the exact commands to finish or undo.

``zfs change-key`` reads the new key from the ``keylocation`` it is given, and
the configured mount point (``/bootsecrets``: an initrd path) has nothing
mounted on it in the running system.  The keystore is therefore bind-mounted
on it while the keys change, so that one atomic ``zfs change-key -o
keylocation=file://<mountpoint>/...`` sets the key and its final location
together.  The alternative -- change-key with the private mount's path, then
``zfs set keylocation`` -- leaves a window in which a killed run leaves a
dataset whose keylocation names a temporary directory that is gone at the
next boot.

After a failure, which key a started change left is asked of ZFS itself
(``zpool sync``, then a no-op load of the new key), never guessed from a
property read: a killed change-key can land a txg later.  All mounts are made
in a private mount namespace, so none outlives the process.

Every program runs through :class:`Machine`, the one object the tests fake.
Key material is only ever in ``bytearray``\\ s that are wiped; the one
exception printed is the recovery key, once.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hmac
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from . import config, cryptsetup, luksadmin, paths, process, zfskeys, zpool
from .context import Signals
from .errors import (
    CommandTimeout,
    ConfigError,
    Interrupted,
    KeyLoadError,
    KeyRejectedError,
    OpsError,
    UnlockError,
)
from .keyformat import derive_wrapping_key
from .ops_common import (
    EXIT_FAILURE,
    EXIT_NOTCONFIGURED,
    EXIT_OK,
    ask_secret,
    confirmed,
    err,
    say,
    show_plan,
)
from .ports import DatasetInfo, MappingState
from .secretbuf import wipe
from .text import bound, escape

PROG = "lczfs-unlockd setup"
DEFAULT_SIZE = "64M"
MIN_SIZE = 32 * 1024 * 1024  # a LUKS2 header alone takes 16 MiB
ZVOL_WAIT = 30.0  # udev makes /dev/zvol/... a moment after zfs create
PARTITION_WAIT = 30.0
MAPPER_WAIT = 10.0
ZFS_TIMEOUT = 120.0  # zfs create/change-key/destroy: one sync task each
MKFS_TIMEOUT = 120.0
SETTLE_TIMEOUT = 30.0
PARTITION_TIMEOUT = 60.0
MOUNT_TIMEOUT = 30.0
DRACUT_TIMEOUT = 600.0
DESTROY_TRIES = 10  # udev's probes briefly hold a new zvol open
DESTROY_RETRY = 0.5
HEX_KEY_BYTES = 32
_HEX_DIGITS = b"0123456789abcdef"
LUKS_PARAMETERS = ("--pbkdf", "argon2id", "--cipher", "aes-xts-plain64", "--key-size", "512")
# The partition table sfdisk writes: GPT, one Linux partition over the whole zvol.
SFDISK_SCRIPT = b"label: gpt\ntype=L, name=lczfs-keystore\n"
# systemd-cryptenroll's PCR policy: PCR 15 (the daemon's measurement PCR)
# must still be all zero, i.e. nothing has been unlocked and measured in
# this boot yet: a key unsealed once cannot be unsealed again after the
# daemon's measurement, by anything that runs later in the same boot.
ZERO_PCR = "0" * 64
AUTO_SNAPSHOT = "com.sun:auto-snapshot=false"
# Set on every dataset this run creates, to a value of this run alone: the
# rollback destroys only what carries it (not a zvol a concurrent run, or
# the person, made under the same name meanwhile).
RUN_PROPERTY = "org.lczfs:setup"
LOCK_PATH = "/run/lczfs-unlockd-setup.lock"
# zfs change-key and the rollback's zfs destroy / umount run in a session of
# their own: the terminal's Ctrl-C (SIGINT to the foreground process group)
# must not kill one half-way.  setsid(1) execs the program in place (a child
# of Popen is no group leader); --wait for the case in which it forks.
DETACH = ("setsid", "--wait")
NAME_MAX = 255  # one path component (ext4, like every Linux file system)
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
# What the no-op load of the CLI says when the key is not the dataset's
# (libzfs: "Key load error: Incorrect key provided for '...'.").
INCORRECT_KEY = "Incorrect key provided"
NO_KEY_PROPERTIES = ("prompt",)

# --- the machine --------------------------------------------------------------


class Machine:
    """Every change setup makes to the system, and the queries it asks first.

    Each method runs a program through :mod:`process` (a deadline each) or a
    system call; the tests replace this object.  Secrets go to programs
    through pipes (``process.run_fed``), never argv.
    """

    def __init__(self, *, luks_kdf: Sequence[str] = ()) -> None:
        # Extra luksFormat arguments (a cheaper KDF on test images).
        self.luks_kdf = tuple(luks_kdf)
        self.lock_path = LOCK_PATH

    def lock(self) -> int:
        """One setup at a time: an flock held for the whole run (the
        descriptor; it goes with the process, a SIGKILL included)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except OSError as exc:
            raise OpsError(f"cannot open the lock file {self.lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OpsError(
                    f"another lczfs-unlockd setup is running (it holds {self.lock_path}): "
                    "wait until it has finished, then run lczfs-unlockd status"
                ) from None
            raise OpsError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
        return fd

    def private_namespace(self) -> None:
        """Go on in a mount namespace of this process's own, propagation private.

        Every mount setup makes (the keystore on its private directory, the
        bind mount on the configured mount point) is then seen by no other
        process and vanishes with the namespace when setup exits, however it
        exits: a SIGKILL leaves no mount behind.  The children (zfs
        change-key reads its keylocation here) inherit it.  Python 3.11 has
        no os.unshare: libc's.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            code = ctypes.get_errno()
            raise OpsError(
                f"cannot make a private mount namespace (unshare: {os.strerror(code)}): "
                "setup needs CAP_SYS_ADMIN; run it as root outside a restricted container"
            )
        # Without this the new namespace still shares propagation with the
        # old one (systemd makes / shared): our mounts would show up there.
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            code = ctypes.get_errno()
            raise OpsError(f"cannot make / private in setup's namespace: {os.strerror(code)}")

    def directory_state(self, path: str) -> str:
        """``absent``, ``empty`` (a directory), ``not-empty`` or ``not-a-directory``."""
        try:
            entries = os.listdir(path) if not os.path.islink(path) else None
        except FileNotFoundError:
            return "absent"
        except NotADirectoryError:
            return "not-a-directory"
        if entries is None:
            return "not-a-directory"
        return "not-empty" if entries else "empty"

    # Queries.
    def euid(self) -> int:
        return os.geteuid()

    def have_program(self, name: str) -> bool:
        return shutil.which(name) is not None

    def path_exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def pools(self) -> list[str]:
        result = process.run([paths.ZPOOL, "list", "-H", "-o", "name"], timeout=ZFS_TIMEOUT)
        return [line for line in result.stdout.splitlines() if line]

    def pool_imported(self, pool: str) -> bool:
        argv = [paths.ZPOOL, "list", "-H", "-o", "name", pool]
        return process.run(argv, check=False, timeout=ZFS_TIMEOUT).returncode == 0

    def datasets(self, names: Sequence[str], *, recursive: bool) -> list[DatasetInfo]:
        return zpool.ZpoolCli().datasets(names, recursive=recursive, timeout=ZFS_TIMEOUT)

    def dataset_exists(self, name: str) -> bool:
        argv = [paths.ZFS, "list", "-H", "-o", "name", name]
        return process.run(argv, check=False, timeout=ZFS_TIMEOUT).returncode == 0

    def mapping_active(self, name: str) -> bool:
        return cryptsetup.LibCryptsetup().status(name) in (MappingState.ACTIVE, MappingState.BUSY)

    def is_mounted(self, path: str) -> bool:
        from . import filesystem

        return path in filesystem.mount_points()

    # ZFS.
    def create_parent(self, name: str, run_id: str) -> None:
        process.run(
            [paths.ZFS, "create", "-o", "mountpoint=none", "-o", "canmount=off",
             "-o", f"{RUN_PROPERTY}={run_id}", name],
            timeout=ZFS_TIMEOUT,
        )  # fmt: skip

    def create_zvol(self, volume: str, size: str, volmode: str, run_id: str) -> None:
        process.run(
            [paths.ZFS, "create", "-V", size, "-o", "encryption=off", "-o", f"volmode={volmode}",
             "-o", AUTO_SNAPSHOT, "-o", f"{RUN_PROPERTY}={run_id}", volume],
            timeout=ZFS_TIMEOUT,
        )  # fmt: skip

    def run_id_of(self, name: str) -> str | None:
        """The RUN_PROPERTY of ``name`` as set on it (None: not set, or no such dataset)."""
        argv = [paths.ZFS, "get", "-H", "-p", "-s", "local", "-o", "value", RUN_PROPERTY, name]
        result = process.run(argv, check=False, timeout=ZFS_TIMEOUT)
        value = result.stdout.strip()
        return value if result.returncode == 0 and value and value != "-" else None

    def destroy(self, name: str) -> None:
        for attempt in range(1, DESTROY_TRIES + 1):
            result = process.run(
                [*DETACH, paths.ZFS, "destroy", name], check=False, timeout=ZFS_TIMEOUT
            )
            if result.returncode == 0:
                return
            if "busy" not in result.stderr or attempt == DESTROY_TRIES:
                raise result.error()
            time.sleep(DESTROY_RETRY)

    def change_key(self, dataset: str, keylocation: str) -> None:
        process.run(
            [*DETACH, paths.ZFS, "change-key", "-o", "keyformat=hex",
             "-o", f"keylocation={keylocation}", dataset],
            timeout=ZFS_TIMEOUT,
        )  # fmt: skip

    def sync_pool(self, pool: str) -> None:
        """Wait until every sync task queued so far is on disk: a change-key
        whose process was killed after it queued its task lands in this txg."""
        process.run([paths.ZPOOL, "sync", pool], timeout=ZFS_TIMEOUT)

    def key_is(self, dataset: str, wrapping_key: bytearray, material: bytearray) -> bool | None:
        """Is this the dataset's wrapping key now?  A no-op load says (see
        :meth:`verify_key`): True, False (ZFS rejected it), None (no answer).

        Without pyzfs the CLI's no-op load reads the key file's text from a
        pipe (the keystore may be closed by now).
        """
        try:
            loader = zfskeys.PyzfsKeyLoader()
            loader._module()
        except (ImportError, KeyLoadError):
            argv = [paths.ZFS, "load-key", "-n", "-L", "file://{fd0}", dataset]
            try:
                result = process.run_fed(argv, [material], check=False, timeout=ZFS_TIMEOUT)
            except (UnlockError, Interrupted):
                return None
            if result.returncode == 0:
                return True
            return False if INCORRECT_KEY in result.stderr else None
        try:
            loader.load_key(dataset, wrapping_key, noop=True)
        except KeyRejectedError:
            return False
        except (UnlockError, Interrupted):
            return None
        return True

    def verify_key(self, dataset: str, wrapping_key: bytearray, path: str) -> None:
        """ZFS's own check of a wrapping key: lzc_load_key with noop.

        spa_keystore_load_wkey() (module/zfs/dsl_crypt.c) unwraps the
        dataset's DSL crypto key with it and returns before the "already
        loaded" (EEXIST) check when noop is set, so this works -- and proves
        the key that is on disk -- while the key is loaded.  Without pyzfs,
        ``zfs load-key -n -L file://PATH`` is the same ioctl (libzfs skips
        its own "already loaded" check for -n), from the key file at ``path``.
        """
        try:
            loader = zfskeys.PyzfsKeyLoader()
            loader._module()
        except (ImportError, KeyLoadError):
            process.run(
                [paths.ZFS, "load-key", "-n", "-L", f"file://{path}", dataset],
                timeout=ZFS_TIMEOUT,
            )
            return
        loader.load_key(dataset, wrapping_key, noop=True)

    # Block devices and LUKS.
    def wait_for(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise OpsError(
                    f"{path} did not appear within {timeout:g} s: is udev running "
                    "(udevadm settle), and is the zvol's volmode right?"
                )
            time.sleep(0.1)

    def partition(self, device: str) -> None:
        # sfdisk reads its script on standard input, which process gives no
        # program: a fixed shell line redirects it from a pipe.  Nothing from
        # outside goes into the shell code: the device is "$1".
        process.run_fed(
            ["sh", "-c", 'exec sfdisk --quiet --wipe always "$1" < "$2"', "sh", device, "{fd0}"],
            [SFDISK_SCRIPT],
            timeout=PARTITION_TIMEOUT,
        )
        # When sfdisk closes the zvol, udev re-reads its partition table and
        # removes and re-adds -part1: a link that exists right now may be gone
        # a moment later (seen in the guest: luksFormat found no device).
        # Waiting for the link only after udev's queue is empty avoids that.
        # No udevadm (or it overran): wait_for still bounds the wait.
        with contextlib.suppress(UnlockError):
            process.run(
                ["udevadm", "settle", f"--timeout={SETTLE_TIMEOUT:g}"],
                check=False,
                timeout=SETTLE_TIMEOUT + 10,
            )

    def format_luks(self, device: str, passphrase: bytearray, label: str) -> None:
        luksadmin.format_luks2(
            device, passphrase, label=label, pbkdf=(*LUKS_PARAMETERS, *self.luks_kdf)
        )

    def open_luks(self, device: str, name: str, passphrase: bytearray, *, read_only: bool) -> str:
        """Through the daemon's own binding: what opens it here opens it at boot."""
        with cryptsetup.LibCryptsetup().open(device) as volume:
            volume.activate_by_passphrase(name, passphrase, read_only=read_only)
        mapper = f"/dev/mapper/{name}"
        self.wait_for(mapper, MAPPER_WAIT)
        return mapper

    def close_luks(self, name: str) -> None:
        cryptsetup.LibCryptsetup().deactivate(name)

    def add_recovery_key(self, device: str, passphrase: bytearray) -> tuple[int, bytearray]:
        return luksadmin.add_recovery_key(device, passphrase)

    def test_key(self, device: str, key: bytearray, slot: int) -> bool:
        return luksadmin.test_key(device, key, slot)

    def cryptenroll(self, device: str, args: Sequence[str], passphrase: bytearray) -> None:
        luksadmin.cryptenroll(device, args, passphrase)

    # File systems.
    def mkfs(self, device: str, label: str) -> None:
        process.run(["mkfs.ext4", "-q", "-F", "-L", label[:16], device], timeout=MKFS_TIMEOUT)

    def make_private_dir(self) -> str:
        return tempfile.mkdtemp(prefix="lczfs-setup.", dir="/run")  # mode 0700

    def make_dirs(self, path: str) -> list[str]:
        """``path`` and its missing parents (0700); returns the ones made."""
        made: list[str] = []
        walk = path
        while not os.path.lexists(walk):
            made.append(walk)
            walk = os.path.dirname(walk)
        for directory in reversed(made):
            os.mkdir(directory, 0o700)
        return made

    def remove_dir(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)

    def mount(self, device: str, target: str, *, read_only: bool) -> None:
        options = "nodev,nosuid,noexec" + (",ro,noload" if read_only else "")
        process.run(["mount", "-t", "ext4", "-o", options, device, target], timeout=MOUNT_TIMEOUT)

    def bind_mount(self, source: str, target: str) -> None:
        process.run(["mount", "--bind", source, target], timeout=MOUNT_TIMEOUT)

    def unmount(self, target: str) -> None:
        process.run([*DETACH, "umount", target], timeout=MOUNT_TIMEOUT)

    def make_private(self, path: str) -> None:
        """The keystore file system's root: root's alone (mkfs makes it 0755)."""
        os.chmod(path, 0o700)

    def write_key_file(self, root: str, rel: str, material: bytearray) -> None:
        write_key_file(root, rel, material)

    def read_key_file(self, root: str, rel: str, dataset: str) -> bytearray:
        return zfskeys.read_key_file(root, f"{root}/{rel}", dataset=dataset)

    def write_config(self, path: str, text: str) -> None:
        write_new_file(path, text.encode(), 0o644)

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def rebuild_initrd(self) -> None:
        process.run(["dracut", "--force"], timeout=DRACUT_TIMEOUT)


def _fsync_dir(fd: int) -> None:
    os.fsync(fd)


def _syncfs(fd: int) -> None:
    """syncfs(2) of the file system holding ``fd``: its journal committed and
    the device flushed (Python 3.11 has no os.syncfs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), "syncfs")


def write_key_file(root: str, rel: str, material: bytearray) -> None:
    """Write ``material`` to ``root/rel``, a new file (mode 0400), durably.

    Every component is opened relative to its parent without following a
    symlink; the file must not exist (O_EXCL).  The file and each directory
    it was added to are fsync()ed, then the whole file system (syncfs)
    before this returns: only then may ZFS be told to use it.
    """
    *dirs, name = rel.split("/")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    opened = [os.open(root, flags)]
    try:
        for part in dirs:
            try:
                os.mkdir(part, 0o700, dir_fd=opened[-1])
                _fsync_dir(opened[-1])
            except FileExistsError:
                pass
            opened.append(os.open(part, flags, dir_fd=opened[-1]))
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o400,
            dir_fd=opened[-1],
        )
        try:
            with memoryview(material) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        for dirfd in reversed(opened):
            _fsync_dir(dirfd)
        _syncfs(opened[0])
    finally:
        for dirfd in opened:
            os.close(dirfd)


def write_new_file(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` atomically: a temporary file beside it, fsync, then a
    rename that refuses to replace anything (link + unlink of the temporary)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".lczfs-setup.", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # unlike rename(2), fails if path exists
        except FileExistsError:
            raise OpsError(f"{path} appeared while setup ran: not replacing it") from None
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --- the plan -----------------------------------------------------------------


@dataclass
class Target:
    """One encryption root whose key moves into the keystore."""

    name: str
    old_keylocation: str
    old_keyformat: str
    mountpoint: str
    attempted: bool = False  # zfs change-key was started (it may have happened)
    state: str = "old"  # "old", "new" or "unknown"
    stuck: bool = False  # its zfs change-key was killed but not reaped: it may still land
    # The new key, kept (wiped at the end) to ask ZFS which key the dataset has.
    key: bytearray | None = field(default=None, repr=False)
    material: bytearray | None = field(default=None, repr=False)

    @property
    def rel(self) -> str:
        return f"{self.name}.key"

    @property
    def keylocation(self) -> str:
        return f"file://{self.mountpoint}/{self.rel}"


@dataclass
class Plan:
    pool: str
    volume: str
    size: str
    whole: bool
    name: str
    mountpoint: str
    config_path: str
    targets: list[Target]
    parents: list[str]  # missing ancestors of the volume, outermost first
    encrypted_parent: str | None  # nearest existing ancestor, when encrypted
    tpm2_pcrs: str | None
    fido2: bool
    nixos: bool
    rebuild_initrd: bool
    dracut: bool
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def zvol_device(self) -> str:
        return f"/dev/zvol/{self.volume}"

    @property
    def device(self) -> str:
        return self.zvol_device if self.whole else f"{self.zvol_device}-part1"

    @property
    def volmode(self) -> str:
        # volmode=dev hides a zvol's partitions: only a whole-zvol keystore can have it.
        return "dev" if self.whole else "full"

    @property
    def unlock(self) -> list[str]:
        return ["token", "passphrase"] if self.tpm2_pcrs or self.fido2 else ["passphrase"]


def _show(value: str) -> str:
    """A value read from the pool, as it may be printed."""
    return bound(escape(value), 300)


_SIZE = re.compile(r"([0-9]{1,12})([KMGT]?)")
_PCRS = re.compile(r"[0-9]{1,2}(\+[0-9]{1,2})*")


def _size_bytes(size: str) -> int:
    match = _SIZE.fullmatch(size)
    if not match:
        raise OpsError(f"--size {size}: not a size such as 64M or 1G")
    scale: int = 1024 ** " KMGT".index(match[2] or " ")
    return int(match[1]) * scale


def _tpm2_pcrs(value: str) -> str:
    if not _PCRS.fullmatch(value):
        raise OpsError(f"--tpm2-pcrs {value}: expected PCR numbers joined by +, e.g. 7 or 7+14")
    pcrs = [int(p) for p in value.split("+")]
    measure = config.DEFAULT_MEASURE_PCR
    if any(p > config.MAX_PCR for p in pcrs):
        raise OpsError(f"--tpm2-pcrs {value}: PCRs are numbered 0-{config.MAX_PCR}")
    if measure in pcrs:
        raise OpsError(
            f"--tpm2-pcrs {value}: PCR {measure} is added by setup itself (bound to all zero, "
            "its value before the daemon's measurement); leave it out"
        )
    return "+".join(str(p) for p in pcrs) + f"+{measure}:sha256={ZERO_PCR}"


def settings_of(plan: Plan) -> dict[str, object]:
    """The configuration file's content, as TOML's data model."""
    return {
        "pool": plan.pool,
        "datasets": [t.name for t in plan.targets],
        "keystore": {
            "volume": plan.volume,
            "partition": 0 if plan.whole else 1,
            "name": plan.name,
            "mountpoint": plan.mountpoint,
            "unlock": plan.unlock,
        },
    }


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of these names is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value).__name__)


def toml_text(settings: dict[str, object], source: str) -> str:
    lines = [
        f"# Written by {PROG} on {time.strftime('%Y-%m-%d')}; see lczfs-unlockd.toml(5).",
        f"# Check it with: lczfs-unlockd check-config {source}",
    ]
    tables = []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _nix_value(value: object, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value).replace("${", "\\${")
    if isinstance(value, list):
        return "[ " + " ".join(_nix_value(v, indent) for v in value) + " ]"
    if isinstance(value, dict):
        inner = indent + "  "
        body = "".join(f"{inner}{k} = {_nix_value(v, inner)};\n" for k, v in value.items())
        return "{\n" + body + indent + "}"
    raise TypeError(type(value).__name__)


def nixos_text(plan: Plan) -> str:
    """The NixOS options (nix/module.nix) that produce the same configuration."""
    option = "boot.initrd.lczfs-unlockd"
    lines = [
        "boot.initrd.systemd.enable = true;",
        f"{option}.enable = true;",
        f"{option}.settings = {_nix_value(settings_of(plan), '')};",
    ]
    plugins = (["tpm2"] if plan.tpm2_pcrs else []) + (["fido2"] if plan.fido2 else [])
    if plugins:
        lines.append(f"{option}.tokenPlugins = {_nix_value(plugins, '')};")
    if plan.tpm2_pcrs:
        lines.append("boot.initrd.systemd.tpm2.enable = true;")
    return "\n".join(lines) + "\n"


def _parse_settings(plan: Plan) -> config.Config:
    try:
        return config.parse(settings_of(plan), source=plan.config_path)
    except ConfigError as exc:
        raise ConfigError(f"the configuration setup would write is invalid: {exc}") from None


def _under(path: str, mountpoint: str) -> bool:
    return path.startswith(mountpoint.rstrip("/") + "/")


def _in_keystore(keylocation: str, mountpoint: str) -> bool:
    return keylocation.startswith("file://") and _under(keylocation[len("file://") :], mountpoint)


def _default_target(d: DatasetInfo, mountpoint: str) -> bool:
    if d.keylocation in NO_KEY_PROPERTIES:
        return True
    return d.keylocation.startswith("file://") and not _under(
        d.keylocation[len("file://") :], mountpoint
    )


def _key_path_problems(targets: Sequence[Target]) -> list[str]:
    """Key files that cannot all exist: one's file is another's directory
    (rpool/a -> rpool/a.key, rpool/a.key/b -> rpool/a.key/b.key), or a name
    no file system takes."""
    problems = []
    for t in targets:
        long = [c for c in t.rel.split("/") if len(c.encode()) > NAME_MAX]
        if long:
            problems.append(
                f"{_show(t.name)}: its key file {_show(t.mountpoint)}/{_show(t.rel)} has a "
                f"component longer than {NAME_MAX} bytes ({_show(long[0][:40])}...)"
            )
        for other in targets:
            if other.rel.startswith(t.rel + "/"):
                problems.append(
                    f"the key file {_show(t.mountpoint)}/{_show(t.rel)} of {_show(t.name)} would "
                    f"be a directory of {_show(other.mountpoint)}/{_show(other.rel)}, the key "
                    f"file of {_show(other.name)}"
                )
    return problems


def prepare(args: argparse.Namespace, machine: Machine) -> Plan:
    """Every check that can refuse, before anything is changed."""
    if machine.euid() != 0:
        raise OpsError(
            "setup must run as root: it creates a zvol, formats it and changes keys of "
            "encryption roots (run it with sudo)"
        )
    needed = ["cryptsetup", "mkfs.ext4", "mount", "umount", DETACH[0]]
    if not args.whole_zvol:
        needed.append("sfdisk")
    if args.tpm2 or args.fido2:
        needed.append(luksadmin.CRYPTENROLL)
    for program in needed:
        if not machine.have_program(program):
            raise OpsError(f"{program} not found: install it (setup needs it), then run again")
    if args.tpm2 and not machine.path_exists("/dev/tpmrm0"):
        raise OpsError("--tpm2: this machine has no TPM2 (/dev/tpmrm0 is missing)")
    pool = args.pool
    if pool is None and args.volume:
        pool = args.volume.split("/", 1)[0]
    if pool is None:
        pools = machine.pools()
        if len(pools) != 1:
            listed = ", ".join(_show(p) for p in pools) or "none"
            raise OpsError(f"name the pool with --pool (imported pools: {listed})")
        pool = pools[0]
    problem = config.pool_name_problem(pool)
    if problem is not None:
        raise OpsError(f"--pool {_show(pool)}: not a pool name: {problem}")
    if not machine.pool_imported(pool):
        raise OpsError(f"pool {pool} is not imported: zpool import {pool} first")
    volume = args.volume or f"{pool}/volumes/bootsecrets"
    if not volume.startswith(pool + "/"):
        raise OpsError(f"--volume {_show(volume)}: the keystore must be a zvol of pool {pool}")
    mountpoint = args.mountpoint
    size = args.size.upper()
    if _size_bytes(size) < MIN_SIZE:
        raise OpsError(f"--size {args.size}: at least 32M (the LUKS2 header alone takes 16M)")
    tpm2_pcrs = _tpm2_pcrs(args.tpm2_pcrs) if args.tpm2 else None

    infos = {d.name: d for d in machine.datasets([pool], recursive=True)}
    roots = {n: d for n, d in infos.items() if d.encryption not in ("off", "-") and
             d.encryption_root == n}  # fmt: skip
    inside = {n: d.keylocation for n, d in roots.items() if _in_keystore(d.keylocation, mountpoint)}
    if volume in infos or machine.dataset_exists(volume):
        if inside:
            users = ", ".join(f"{_show(n)} (keylocation={_show(v)})" for n, v in inside.items())
            raise OpsError(
                f"{volume} already exists: do not destroy it: it holds the key of {users}. An "
                "earlier setup may have stopped half-way: lczfs-unlockd status shows the "
                "keystore; finish it by hand (the earlier run printed the commands) or choose "
                "another --volume"
            )
        raise OpsError(
            f"{volume} already exists: a keystore may be there already (lczfs-unlockd status "
            f"shows it); if it holds nothing you need, zfs destroy {volume}, or choose another "
            "--volume"
        )
    if args.roots:
        names = [r for r in args.roots.split(",") if r]
        for name in names:
            if name not in roots:
                why = "no such dataset"
                if name in infos and infos[name].encryption in ("off", "-"):
                    why = "it is not encrypted"
                elif name in infos:
                    why = f"its encryption root is {_show(infos[name].encryption_root)}"
                raise OpsError(
                    f"--roots: {_show(name)} is not an encryption root of pool {pool} ({why}); "
                    f"zfs get -r encryptionroot {pool} lists them"
                )
            if name in inside:
                # Its old and its new keylocation could be the same string:
                # after a failure nothing would tell which key it has.
                raise OpsError(
                    f"--roots: {_show(name)} already has keylocation={_show(inside[name])}, "
                    f"inside the keystore's mount point {mountpoint}: setup cannot tell its old "
                    "key from its new one there; leave it out, or move its key elsewhere first "
                    f"(zfs change-key -o keylocation=... {_show(name)})"
                )
        if not names:
            raise OpsError("--roots: no dataset named: give encryption roots, joined by commas")
    else:
        names = [n for n, d in roots.items() if _default_target(d, mountpoint)]
        if not names:
            raise OpsError(
                f"no encryption root of {pool} uses keylocation=prompt or a key file outside "
                f"{mountpoint}: name the ones to move with --roots"
            )
    for name in names:
        if roots[name].keystatus != "available":
            raise OpsError(
                f"the key of {_show(name)} is not loaded: zfs load-key {_show(name)} first "
                "(zfs change-key needs the current key), or leave it out with --roots"
            )
    targets = [Target(n, roots[n].keylocation, roots[n].keyformat, mountpoint) for n in names]
    problems = _key_path_problems(targets)
    if problems:
        raise OpsError(
            "these key files cannot be made: " + "; ".join(problems) + ": leave one of each out "
            "with --roots, or rename the dataset (zfs rename)"
        )

    parents: list[str] = []
    walk = volume.rsplit("/", 1)[0]
    while walk not in infos and "/" in walk:  # the pool itself ends it
        parents.insert(0, walk)
        walk = walk.rsplit("/", 1)[0]
    if walk not in infos:
        raise OpsError(
            f"zfs list -r {pool} did not list the pool's own dataset {pool}: is the pool "
            "healthy? (zpool status)"
        )
    ancestor = infos[walk]
    encrypted_parent = walk if ancestor.encryption not in ("off", "-") else None
    if not args.nixos and machine.path_exists(args.config):
        raise OpsError(
            f"{args.config} already exists: setup does not overwrite a configuration; move it "
            "away (or remove it) or pass another --config"
        )
    if machine.mapping_active(args.name):
        raise OpsError(
            f"/dev/mapper/{args.name} is already open: close it (cryptsetup close {args.name}) "
            "or choose another --name"
        )
    if machine.is_mounted(mountpoint):
        raise OpsError(
            f"something is mounted on {mountpoint}: unmount it or choose another --mountpoint"
        )
    # The bind mount lives in setup's own mount namespace: nobody else would
    # see it cover a directory.  Still only an empty or missing one: the path
    # is an initrd path, and files here in the running system are most likely
    # an older hand-made keystore whose keys someone may still use -- better
    # asked about than hidden for the run.
    state = machine.directory_state(mountpoint)
    if state in ("not-empty", "not-a-directory"):
        what = "is a directory that is not empty" if state == "not-empty" else "is not a directory"
        raise OpsError(
            f"--mountpoint {mountpoint} {what}: setup mounts the keystore there while the keys "
            "change; choose a path that is missing or an empty directory"
        )
    plan = Plan(
        pool=pool, volume=volume, size=size, whole=args.whole_zvol, name=args.name,
        mountpoint=mountpoint, config_path=args.config, targets=targets, parents=parents,
        encrypted_parent=encrypted_parent, tpm2_pcrs=tpm2_pcrs, fido2=args.fido2,
        nixos=args.nixos, rebuild_initrd=args.rebuild_initrd,
        dracut=machine.have_program("dracut"),
    )  # fmt: skip
    _parse_settings(plan)  # names, mount point: refused now, not after the key change
    return plan


def plan_actions(plan: Plan) -> list[str]:
    actions = [
        f"create {p} (mountpoint=none, canmount=off) to hold the keystore" for p in plan.parents
    ]
    zvol = (
        f"create the zvol {plan.volume}: {plan.size}, encryption=off (LUKS encrypts it), "
        f"volmode={plan.volmode}, {AUTO_SNAPSHOT} (zfs-auto-snapshot and sanoid-style tools "
        "skip it: a snapshot would keep old keys and old key slots)"
    )
    if plan.encrypted_parent:
        zvol += (
            f"; it lies below the encrypted {plan.encrypted_parent}: OpenZFS 2.2 or later "
            "creates it unencrypted, older versions refuse (then choose a --volume outside "
            "the encrypted tree)"
        )
    actions.append(zvol)
    if plan.whole:
        actions.append(f"use the whole zvol {plan.zvol_device} (--whole-zvol, partition = 0)")
    else:
        actions.append(
            f"write a GPT with one partition (sfdisk) and use {plan.device} "
            "(volmode=full: volmode=dev would hide the partition)"
        )
    actions += [
        f"format {plan.device} as LUKS2 (argon2id, aes-xts-plain64, 512-bit key, label "
        f"{plan.name}) with a new passphrase (typed twice, or --passphrase-file)",
        f"open it as /dev/mapper/{plan.name}, make an ext4 file system (root 0700), mount it, in "
        "a mount namespace of setup's own, on a private "
        "directory under /run (mode 0700)",
        "enroll a recovery key (a key slot and a systemd-recovery token) and print it once",
    ]
    if plan.tpm2_pcrs:
        actions.append(f"enroll a TPM2 token: systemd-cryptenroll --tpm2-pcrs={plan.tpm2_pcrs}")
    if plan.fido2:
        actions.append("enroll a FIDO2 token: systemd-cryptenroll --fido2-device=auto")
    actions.append(
        f"bind-mount the keystore on {plan.mountpoint} while the keys change, so that each "
        "keylocation is the one the daemon reads at boot"
    )
    for t in plan.targets:
        actions.append(
            f"{t.name}: write a new random 256-bit hex key to {t.mountpoint}/{t.rel}, read it "
            f"back, then zfs change-key -o keyformat=hex -o keylocation={t.keylocation} "
            f"(now keyformat={_show(t.old_keyformat)}, keylocation={_show(t.old_keylocation)})"
        )
    if plan.nixos:
        actions.append("print the NixOS options to paste (no configuration file is written)")
    else:
        actions.append(
            f"write {plan.config_path} (mode 0644) and check it as check-config does; unlock "
            f"by {', '.join(plan.unlock)}"
        )
    actions.append(
        "verify: close the keystore, open it again read-only with the passphrase, read every "
        "key file as the daemon does and check it against ZFS (a no-op key load)"
    )
    if plan.nixos:
        actions.append("rebuild the initrd yourself: nixos-rebuild boot")
    elif plan.rebuild_initrd and plan.dracut:
        actions.append("rebuild the initrd: dracut --force")
    else:
        actions.append("rebuild the initrd yourself (dracut --force; NixOS: nixos-rebuild boot)")
    return actions


# --- doing it -----------------------------------------------------------------


@dataclass
class Made:
    """What this run created, so that a failure undoes exactly that."""

    parents: list[str] = field(default_factory=list)  # zfs create was called for these
    zvol_tried: bool = False  # zfs create was called: the zvol may exist
    zvol: bool = False  # zfs create succeeded
    mapping: bool = False  # the LUKS volume may be open
    private_dir: str | None = None
    private_mount: bool = False  # mount was called on private_dir
    bind_dirs: list[str] = field(default_factory=list)
    bind_mount: bool = False
    recovery_shown: bool = False
    config_written: bool = False
    verified: bool = False
    initrd: bool = False


class Setup:
    def __init__(
        self, plan: Plan, machine: Machine, signals: Signals, out: TextIO, error: TextIO
    ) -> None:
        self.plan = plan
        self.m = machine
        self.signals = signals
        self.out = out
        self.error = error
        self.made = Made()
        self.passphrase: bytearray | None = None
        # Not a secret: it tells this run's datasets from anyone else's.
        self.run_id = os.urandom(8).hex()

    def say(self, text: str = "") -> None:
        say(text, self.out)

    def complain(self, text: str) -> None:
        # After SIGHUP (an ssh connection dropped) the terminal is gone: the
        # recovery must still run to its end.
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self.error, flush=True)

    def _err(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            err(text, self.error)

    def execute(self, passphrase_file: str | None) -> int:
        try:
            self.passphrase = ask_secret(
                "Passphrase for the new keystore: ", twice=True, file=passphrase_file
            )
            self.m.private_namespace()
            self._run()
            return EXIT_OK
        except (UnlockError, Interrupted) as exc:
            self.signals.interruptible = False  # the undo runs whole
            self._err(str(exc))
            self._recover()
            return EXIT_FAILURE
        except OSError as exc:  # a file of ours: the key file, the config, a directory
            self.signals.interruptible = False
            where = f"{exc.filename}: " if exc.filename else ""
            self._err(f"{where}{exc.strerror or exc}")
            self._recover()
            return EXIT_FAILURE
        except Exception as exc:  # a bug: still undone, never a bare traceback
            self.signals.interruptible = False
            self._err(
                f"unexpected {type(exc).__name__}: {str(exc)[:200]} (a bug: please report it)"
            )
            self._recover()
            return EXIT_FAILURE
        finally:
            wipe(self.passphrase)
            for t in self.plan.targets:
                wipe(t.key)
                wipe(t.material)
                t.key = t.material = None

    @contextlib.contextmanager
    def _deferred_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM/SIGHUP wait until the block is done (then
        checkpoint() raises them): a key change is never cut off while ZFS
        may still be carrying it out."""
        before = self.signals.interruptible
        self.signals.interruptible = False
        try:
            yield
        finally:
            self.signals.interruptible = before

    # The steps.
    def _run(self) -> None:
        p, m = self.plan, self.m
        assert self.passphrase is not None
        for parent in p.parents:
            self.made.parents.append(parent)
            m.create_parent(parent, self.run_id)
        self.say(f"creating {p.volume} ({p.size})")
        self.made.zvol_tried = True
        m.create_zvol(p.volume, p.size, p.volmode, self.run_id)
        self.made.zvol = True
        m.wait_for(p.zvol_device, ZVOL_WAIT)
        if not p.whole:
            m.partition(p.zvol_device)
            m.wait_for(p.device, PARTITION_WAIT)
        self.signals.checkpoint()
        self.say(f"formatting {p.device} as LUKS2 (argon2id: this takes a few seconds)")
        m.format_luks(p.device, self.passphrase, p.name)
        self.made.mapping = True
        mapper = m.open_luks(p.device, p.name, self.passphrase, read_only=False)
        m.mkfs(mapper, p.name)
        self.made.private_dir = m.make_private_dir()
        self.made.private_mount = True
        m.mount(mapper, self.made.private_dir, read_only=False)
        m.make_private(self.made.private_dir)
        self.signals.checkpoint()
        self._enroll()
        self.made.bind_dirs = m.make_dirs(p.mountpoint)
        self.made.bind_mount = True
        m.bind_mount(self.made.private_dir, p.mountpoint)
        for target in p.targets:
            self.signals.checkpoint()
            self._move_key(target)
        self._unbind()
        self._write_config()
        self._verify()
        self._initrd()
        self.say()
        self.say(f"done: the keys of {', '.join(t.name for t in p.targets)} are in {p.volume}.")

    def _enroll(self) -> None:
        p, m = self.plan, self.m
        assert self.passphrase is not None
        slot, key = m.add_recovery_key(p.device, self.passphrase)
        try:
            if not m.test_key(p.device, key, slot):
                raise OpsError(
                    f"the new recovery key does not open key slot {slot} of {p.device}: the "
                    "keystore is not trustworthy (cryptsetup luksDump shows it)"
                )
            self._print_recovery_key(key)
        finally:
            wipe(key)
        if p.tpm2_pcrs:
            self.say("enrolling a TPM2 token")
            m.cryptenroll(
                p.device, ["--tpm2-device=auto", f"--tpm2-pcrs={p.tpm2_pcrs}"], self.passphrase
            )
        if p.fido2:
            self.say("enrolling a FIDO2 token (touch the key when it blinks)")
            m.cryptenroll(p.device, ["--fido2-device=auto"], self.passphrase)

    def _print_recovery_key(self, key: bytearray) -> None:
        prefix = b"RECOVERY KEY: "
        line = bytearray(len(prefix) + len(key) + 1)  # its final size: no reallocation
        line[: len(prefix)] = prefix
        line[len(prefix) : -1] = key
        line[-1] = ord("\n")
        try:
            self.out.flush()
            buffer = getattr(self.out, "buffer", None)
            if self.out is sys.stdout:  # straight to fd 1: no copy in a Python buffer
                with memoryview(line) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(self.out.fileno(), view[written:])
            elif buffer is not None:
                buffer.write(line)
                buffer.flush()
            else:  # a text-only stream: the str copy cannot be wiped
                self.out.write(line.decode())
                self.out.flush()
        finally:
            wipe(line)
        self.made.recovery_shown = True
        self.say(
            "  Write the recovery key down now and keep it offline, away from this machine (on "
            "paper, in a safe or a password manager that is not on this disk). It opens the "
            "keystore when the passphrase is lost; it is not shown again."
        )

    def _move_key(self, t: Target) -> None:
        """One encryption root: a durable, proven key file, then the atomic change."""
        m = self.m
        assert self.made.private_dir is not None
        root = self.made.private_dir
        raw = t.key = luksadmin.random_bytes(HEX_KEY_BYTES)  # wiped by execute()
        material = t.material = bytearray(2 * HEX_KEY_BYTES + 1)
        back: bytearray | None = None
        derived: bytearray | None = None
        try:
            for i, byte in enumerate(raw):  # into the bytearray: no str or bytes copy
                material[2 * i] = _HEX_DIGITS[byte >> 4]
                material[2 * i + 1] = _HEX_DIGITS[byte & 15]
            material[-1] = ord("\n")
            m.write_key_file(root, t.rel, material)
            # Read back exactly as the daemon will at boot: its reader, its derivation.
            back = m.read_key_file(root, t.rel, t.name)
            derived = derive_wrapping_key(
                "hex", back, salt=0, iters=0, dataset=t.name, path=f"{t.mountpoint}/{t.rel}"
            )
            if not hmac.compare_digest(derived, raw):
                raise OpsError(
                    f"{t.name}: the key file {t.mountpoint}/{t.rel} does not read back as "
                    "written: the keystore is not trustworthy; nothing was changed for it"
                )
            self.say(f"changing key of {t.name} to {t.keylocation} ...")
            t.attempted = True
            with self._deferred_signals():
                try:
                    m.change_key(t.name, t.keylocation)
                except CommandTimeout as exc:
                    # process gives up on reaping it after a few seconds: it
                    # may still be in the kernel, its sync task yet to queue.
                    t.stuck = not exc.reaped
                    raise
                t.state = "new"
            self.signals.checkpoint()
            m.verify_key(t.name, derived, f"{root}/{t.rel}")
            self.say(f"changed key of {t.name}: now keyformat=hex keylocation={t.keylocation}")
        finally:
            wipe(back)
            wipe(derived)

    def _unbind(self) -> None:
        if self.made.bind_mount:
            self.m.unmount(self.plan.mountpoint)
            self.made.bind_mount = False
        while self.made.bind_dirs:
            self.m.remove_dir(self.made.bind_dirs[0])  # innermost first
            self.made.bind_dirs.pop(0)

    def _write_config(self) -> None:
        p = self.plan
        if p.nixos:
            self.say()
            self.say("Add to your NixOS configuration:")
            self.say(nixos_text(p))
            return
        text = toml_text(settings_of(p), p.config_path)
        self.made.config_written = True
        self.m.write_config(p.config_path, text)
        try:
            cfg = config.load(p.config_path)
        except ConfigError as exc:
            raise OpsError(f"{exc} (lczfs-unlockd check-config {p.config_path})") from None
        self.say(f"wrote {p.config_path}:")
        for line in config.summary(cfg):
            self.say(f"  {line}")

    def _close_all(self) -> None:
        """Unmount and close what this run has open (each checked first)."""
        p, m = self.plan, self.m
        if self.made.bind_mount and m.is_mounted(p.mountpoint):
            m.unmount(p.mountpoint)
        self.made.bind_mount = False
        for directory in list(self.made.bind_dirs):
            m.remove_dir(directory)
            self.made.bind_dirs.remove(directory)
        if (
            self.made.private_mount
            and self.made.private_dir
            and m.is_mounted(self.made.private_dir)
        ):
            m.unmount(self.made.private_dir)
        self.made.private_mount = False
        if self.made.mapping and m.mapping_active(p.name):
            m.close_luks(p.name)
        self.made.mapping = False

    def _verify(self) -> None:
        """The daemon's path again, from a closed keystore: open read-only with
        the passphrase, read each key file with its reader, check it with ZFS.

        (The daemon's own dry run would prove less: keys.py skips a key that
        is already loaded, and every key here is loaded.)
        """
        p, m = self.plan, self.m
        assert self.passphrase is not None and self.made.private_dir is not None
        self.say("verifying: reopening the keystore read-only with the passphrase")
        self._close_all()
        self.made.mapping = True
        mapper = m.open_luks(p.device, p.name, self.passphrase, read_only=True)
        self.made.private_mount = True
        m.mount(mapper, self.made.private_dir, read_only=True)
        now = {d.name: d for d in m.datasets([t.name for t in p.targets], recursive=False)}
        for t in p.targets:
            info = now.get(t.name)
            if info is None or info.keylocation != t.keylocation or info.keyformat != "hex":
                found = "missing" if info is None else f"keylocation={_show(info.keylocation)}"
                raise OpsError(f"{t.name}: expected keylocation={t.keylocation}, found {found}")
            material = m.read_key_file(self.made.private_dir, t.rel, t.name)
            key: bytearray | None = None
            try:
                key = derive_wrapping_key(
                    "hex", material, salt=0, iters=0, dataset=t.name,
                    path=f"{t.mountpoint}/{t.rel}",
                )  # fmt: skip
                m.verify_key(t.name, key, f"{self.made.private_dir}/{t.rel}")
            finally:
                wipe(material)
                wipe(key)
            self.say(f"verified the key of {t.name}")
        self._close_all()
        m.remove_dir(self.made.private_dir)
        self.made.private_dir = None
        self.made.verified = True

    def _initrd(self) -> None:
        p = self.plan
        if p.nixos:
            self.say("Next: nixos-rebuild boot (the initrd must hold the new configuration)")
            return
        if p.rebuild_initrd and p.dracut:
            self.say("rebuilding the initrd: dracut --force")
            self.m.rebuild_initrd()
            self.made.initrd = True
            return
        self.say(
            "Next: rebuild the initrd so that it holds lczfs-unlockd and "
            f"{p.config_path}: dracut --force (NixOS: nixos-rebuild boot)"
        )
        self.made.initrd = True  # nothing more for setup to do

    # Failure.
    def _recover(self) -> None:
        try:
            self._close_all()
        except (UnlockError, Interrupted, OSError) as exc:
            err(f"cannot close the keystore: {exc}", self.error)
        self._settle_states()
        p = self.plan
        if all(t.state == "old" for t in p.targets):
            self._roll_back()
            return
        if self.made.private_dir:
            with contextlib.suppress(OSError, UnlockError):
                self.m.remove_dir(self.made.private_dir)
        self._report_kept()

    def _settle_states(self) -> None:
        """Which key each started change left, asked of ZFS itself.

        Not the keylocation: a change-key killed after it queued its sync
        task lands in a later txg, and a property read before that says
        "old" of a dataset that is about to have the new key -- and the
        rollback would then destroy the keystore holding it.  So: wait for
        every queued task to be on disk (zpool sync), then a no-op load of
        the new key, which succeeds exactly when it is the dataset's key.  A
        change-key left unreaped, a sync or a probe that does not answer:
        "unknown", and nothing is rolled back.
        """
        open_ = [t for t in self.plan.targets if t.attempted and t.state != "new"]
        if not open_:
            return
        try:
            self.m.sync_pool(self.plan.pool)
        except (UnlockError, Interrupted, OSError) as exc:
            self._err(f"zpool sync {self.plan.pool}: {exc}")
            for t in open_:
                t.state = "unknown"
            return
        for t in open_:
            if t.stuck or t.key is None or t.material is None:
                t.state = "unknown"
                continue
            try:
                verdict = self.m.key_is(t.name, t.key, t.material)
            except (UnlockError, Interrupted, OSError):
                verdict = None
            t.state = {True: "new", False: "old", None: "unknown"}[verdict]

    def _roll_back(self) -> None:
        """Nothing uses the keystore: remove everything this run made."""
        p, m = self.plan, self.m
        problems: list[str] = []
        if self.made.private_dir:
            try:
                m.remove_dir(self.made.private_dir)
            except OSError as exc:
                problems.append(f"rmdir {self.made.private_dir} ({exc.strerror})")
        if self.made.config_written and m.path_exists(p.config_path):
            try:
                m.remove_file(p.config_path)
            except OSError as exc:
                problems.append(f"rm {p.config_path} ({exc.strerror})")
        created = ([p.volume] if self.made.zvol_tried else []) + list(reversed(self.made.parents))
        destroyed = []
        for name in created:
            try:
                if not m.dataset_exists(name):
                    continue
                if m.run_id_of(name) != self.run_id:  # not (or no longer) this run's
                    problems.append(
                        f"{name} is not marked {RUN_PROPERTY}={self.run_id} (this run's): left "
                        f"alone; zfs destroy {name} if it is yours and holds nothing"
                    )
                    continue
                m.destroy(name)
                destroyed.append(name)
            except (UnlockError, Interrupted) as exc:
                problems.append(f"zfs destroy {name} ({exc})")
        if problems:
            self.complain(
                "lczfs-unlockd: no encryption root was changed, but these could not be removed: "
                + "; ".join(problems)
                + ": run them by hand"
            )
        else:
            self.complain(
                "lczfs-unlockd: rolled back: no encryption root was changed"
                + (f" and {p.volume} was destroyed" if p.volume in destroyed else "")
                + "."
            )
        if self.made.recovery_shown:
            self.complain(
                "The RECOVERY KEY shown above belonged to the destroyed keystore: discard it."
            )

    def _report_kept(self) -> None:
        p = self.plan
        for t in p.targets:
            if t.state == "new":
                self.complain(
                    f"{t.name}: now uses the key file {t.mountpoint}/{t.rel} in the keystore "
                    f"{p.volume}"
                )
            elif t.state == "old":
                self.complain(
                    f"{t.name}: still uses its old key (keylocation={_show(t.old_keylocation)})"
                )
            else:
                self.complain(
                    f"{t.name}: unknown whether it uses its old key or the key file "
                    f"{t.mountpoint}/{t.rel}: once no zfs change-key process is left (pgrep -a "
                    f"zfs), zpool sync {p.pool}; then zfs get keylocation {t.name} tells (file://"
                    f"{t.mountpoint}/{t.rel} = the new key)"
                )
        self.complain(
            f"The keystore {p.volume} was kept: it holds keys in use. Nothing is lost: each "
            "dataset opens with the key named above."
        )
        q = shlex.quote
        lines = ["To finish by hand:"]
        lines.append(f"  cryptsetup open {q(p.device)} {q(p.name)}")
        lines.append(f"  mkdir -p {q(p.mountpoint)} && mount /dev/mapper/{q(p.name)} "
                     f"{q(p.mountpoint)}")  # fmt: skip
        for t in p.targets:
            if t.state == "new":
                continue
            path = f"{t.mountpoint}/{t.rel}"
            lines.append(f"  test -e {q(path)} || (umask 077; mkdir -p {q(os.path.dirname(path))}"
                         f" && head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \\n' > {q(path)}"
                         f" && echo >> {q(path)})")  # fmt: skip
            # On disk before ZFS is told to use it (syncfs: file, directories, journal).
            lines.append(f"  sync -f {q(path)}")
            lines.append(
                f"  zfs change-key -o keyformat=hex -o keylocation={q(t.keylocation)} {q(t.name)}"
            )
        if not self.made.recovery_shown:
            lines.append(f"  systemd-cryptenroll --unlock-key-file=/dev/stdin --recovery-key "
                         f"{q(p.device)}   # type the keystore passphrase")  # fmt: skip
        lines.append(f"  umount {q(p.mountpoint)} && cryptsetup close {q(p.name)}")
        if p.nixos:
            lines.append(
                "  add the NixOS options printed by setup --nixos, then nixos-rebuild boot"
            )
        else:
            if not self.made.config_written:
                lines.append(f"  write {p.config_path} with:")
                text = toml_text(settings_of(p), p.config_path)
                lines += [f"      {line}" for line in text.splitlines()]
            lines.append("  dracut --force   (NixOS: nixos-rebuild boot)")
        changed = [t for t in p.targets if t.state != "old"]
        lines.append("Or to undo (back to each dataset's old key format and location):")
        for t in changed:
            lines.append(f"  {_undo_command(t)}")
        lines.append(
            "  then, when no dataset uses a key from it: "
            + " && ".join(f"zfs destroy {q(n)}" for n in [p.volume, *reversed(self.made.parents)])
        )
        if self.made.config_written:
            lines.append(f"  rm {q(p.config_path)}")
        self.complain("\n".join(lines))


def _undo_command(t: Target) -> str:
    """Back to the dataset's original keyformat and keylocation.  A
    passphrase cannot be restored, only typed anew: zfs asks for it."""
    q = shlex.quote
    if t.old_keyformat == "passphrase":
        return f"zfs change-key -o keyformat=passphrase -o keylocation=prompt {q(t.name)}"
    fmt, location = _show(t.old_keyformat), _show(t.old_keylocation)
    return f"zfs change-key -o keyformat={q(fmt)} -o keylocation={q(location)} {q(t.name)}"


# --- the command line ---------------------------------------------------------

DESCRIPTION = """\
Move the keys of a pool's encryption roots into a LUKS2 keystore on a zvol
of the same pool, the layout lczfs-unlockd unlocks at boot.

setup plans first and prints every action; it changes nothing without --yes.
It refuses when the pool is not imported, a --roots dataset is not an
encryption root (or its key is not loaded), the zvol or the configuration
file already exists, or it is not run as root.  By default it moves every
encryption root whose keylocation is prompt or a key file outside the
keystore.

Each new key is a random 256-bit hex key file in the keystore, written and
read back as the daemon reads it before zfs change-key runs; a recovery key
is always enrolled and printed once.  Any failure before the first key
change destroys what setup made; after one, the keystore is kept (it holds a
live key) and setup prints, for each dataset, which key it uses and the
commands to finish or undo.  SIGINT/SIGTERM/SIGHUP take the same path; one
that arrives during a zfs change-key waits until it has returned.
"""

_M = config.DEFAULT_MEASURE_PCR
EPILOG = f"""\
--tpm2 binds the token to the PCRs of --tpm2-pcrs (default 7, the Secure Boot
state) and to PCR {_M} being all zero.  PCR {_M} is the one the daemon
extends right after it opened the keystore (keystore.measure_pcr), so the
TPM releases the key once per boot, before that measurement, and never again
to anything that runs later in the same boot.

Output lines other tools may read:
  changing key of DATASET to file://MOUNTPOINT/DATASET.key ...
  changed key of DATASET: now keyformat=hex keylocation=file://MOUNTPOINT/DATASET.key
  RECOVERY KEY: <key>            (once)
On failure after a key change, on standard error, per dataset:
  DATASET: still uses its old key (keylocation=...)
  DATASET: now uses the key file MOUNTPOINT/DATASET.key in the keystore VOLUME
Exit status: 0 done, 1 failed (rolled back, or with the commands to finish),
{EXIT_NOTCONFIGURED} the configuration it would write is invalid.

Example:
  lczfs-unlockd setup --pool rpool --roots rpool/crypt --tpm2
  lczfs-unlockd setup --pool rpool --roots rpool/crypt --tpm2 --yes --rebuild-initrd
"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config",
        default=config.DEFAULT_PATH,
        help="configuration file to write (default %(default)s); must not exist",
    )
    ap.add_argument("--pool", help="the pool (default: the --volume's, or the one imported pool)")
    ap.add_argument(
        "--roots",
        metavar="DS,DS...",
        help="encryption roots to move (default: those with keylocation=prompt "
        "or a key file outside the keystore)",
    )
    ap.add_argument("--volume", help="the keystore zvol (default POOL/volumes/bootsecrets)")
    ap.add_argument("--size", default=DEFAULT_SIZE, help="zvol size (default %(default)s)")
    ap.add_argument(
        "--whole-zvol",
        action="store_true",
        help="LUKS on the whole zvol (volmode=dev, partition = 0) instead of a GPT partition 1",
    )
    ap.add_argument(
        "--mountpoint",
        default=config.KeystoreConfig.mountpoint,
        help="where the daemon mounts the keystore in the initrd (default %(default)s)",
    )
    ap.add_argument(
        "--name",
        default=config.KeystoreConfig.name,
        help="device-mapper name (default %(default)s)",
    )
    ap.add_argument(
        "--passphrase-file",
        metavar="FILE|-",
        help="read the new keystore passphrase from FILE or standard input "
        "instead of asking twice on the terminal",
    )
    ap.add_argument("--tpm2", action="store_true", help="also enroll a TPM2 token (see below)")
    ap.add_argument(
        "--tpm2-pcrs",
        default="7",
        metavar="PCRS",
        help="PCRs the TPM2 token is bound to, joined by + (default %(default)s)",
    )
    ap.add_argument("--fido2", action="store_true", help="also enroll a FIDO2 token")
    ap.add_argument(
        "--nixos",
        action="store_true",
        help="print the NixOS options instead of writing the configuration file",
    )
    ap.add_argument(
        "--rebuild-initrd",
        action="store_true",
        help="run dracut --force at the end (when dracut is installed)",
    )
    ap.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan only, even with --yes")
    return ap  # fmt: skip


def run(
    argv: Sequence[str],
    machine: Machine,
    *,
    out: TextIO | None = None,
    error: TextIO | None = None,
    signals: Signals | None = None,
    before: Callable[[], None] | None = None,
) -> int:
    """The command with the machine given (the tests pass a fake one)."""
    args = parser().parse_args(list(argv))
    out = out or sys.stdout
    error = error or sys.stderr
    lock: int | None = None
    try:
        if args.yes and not args.dry_run:
            # Before the checks: two runs must not both find the zvol missing.
            lock = machine.lock()
        plan = prepare(args, machine)
    except ConfigError as exc:
        err(str(exc), error)
        return _unlocked(lock, EXIT_NOTCONFIGURED)
    except UnlockError as exc:
        err(str(exc), error)
        return _unlocked(lock, EXIT_FAILURE)
    try:
        show_plan(f"{PROG} will:", plan_actions(plan), out)
        if not _confirmed(args, out):
            return EXIT_OK
        signals = signals or Signals()
        with signals.installed(), _hangup_too(signals):
            if before is not None:
                before()
            return Setup(plan, machine, signals, out, error).execute(args.passphrase_file)
    finally:
        _unlocked(lock, EXIT_OK)


def _unlocked(lock: int | None, code: int) -> int:
    if lock is not None:
        os.close(lock)  # the flock goes with its last descriptor
    return code


@contextlib.contextmanager
def _hangup_too(signals: Signals) -> Iterator[None]:
    """SIGHUP (the ssh connection or the terminal went away) as SIGTERM: stop
    at the next safe point and undo or report, instead of dying half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGHUP, signals.handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, old)


def _confirmed(args: argparse.Namespace, out: TextIO) -> bool:
    if out is sys.stdout:
        return confirmed(args.yes, args.dry_run, "set the keystore up")
    with contextlib.redirect_stdout(out):
        return confirmed(args.yes, args.dry_run, "set the keystore up")


def main(argv: list[str]) -> int:
    return run(argv, Machine())
