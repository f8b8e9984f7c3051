"""The file system: mount(2)/umount2(2) through libc, /proc/self/mountinfo, directories.

The Mounts and Filesystem ports.  No mount(8) is needed in the initrd.  The
keystore is always mounted read-only, nodev, nosuid, noexec.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os

from . import libc
from .errors import KeystoreError, TeardownError, UnlockError

log = logging.getLogger("lczfs_unlockd.filesystem")

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
# <sys/mount.h>
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# mount(8) without blkid tries the kernel's file systems; the keystore is
# ext4 in every documented layout, so that comes first.
FSTYPES = ("ext4", "ext2", "vfat", "xfs", "btrfs")


def _libc() -> ctypes.CDLL:
    try:
        return libc.libc()
    except UnlockError as exc:
        raise KeystoreError(str(exc)) from None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[int, str]]:
    """(mount ID, mount point) of every mount, in mountinfo's order."""
    table = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[0].isdigit():
                table.append((int(fields[0]), _unescape(fields[4])))
    return table


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    return [point for _, point in mount_table(mountinfo)]


def _kernel_fstypes() -> list[str]:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return [line.split()[0] for line in f if not line.startswith("nodev")]
    except OSError:
        return []


class LibcMounts:
    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.mountinfo = mountinfo
        # Mount IDs are reused (the lowest free one): ours is the pair of
        # the ID and the real path it was made on.
        self._made: dict[int, str] = {}

    def mount(self, source: str, target: str, fstype: str = "") -> int | None:
        self._mount(source, target, fstype)
        # The topmost mount on the target's real path is the one just made.
        real = os.path.realpath(target)
        ids = [mount_id for mount_id, point in mount_table(self.mountinfo) if point == real]
        if not ids:
            return None
        self._made[ids[-1]] = real
        return ids[-1]

    def _mount(self, source: str, target: str, fstype: str) -> None:
        libc = _libc()
        flags = MS_RDONLY | MS_NODEV | MS_NOSUID | MS_NOEXEC
        candidates = [fstype] if fstype else list(FSTYPES)
        candidates += [t for t in _kernel_fstypes() if t not in candidates and not fstype]
        last = errno.EINVAL
        for candidate in candidates:
            if libc.mount(source.encode(), target.encode(), candidate.encode(), flags, None) == 0:
                return
            last = ctypes.get_errno()
            if last == errno.EROFS and candidate.startswith("ext"):
                # The journal needs recovery, which a read-only device cannot
                # take: mount without replaying it (the key files were
                # written and synced long ago).
                data = b"noload"
                if (
                    libc.mount(source.encode(), target.encode(), candidate.encode(), flags, data)
                    == 0
                ):
                    log.warning(
                        "%s: journal not replayed (read-only keystore); mounted with noload", source
                    )
                    return
                last = ctypes.get_errno()
            if last not in (errno.EINVAL, errno.ENODEV):
                break
        if last in (errno.EINVAL, errno.ENODEV):
            raise KeystoreError(
                f"cannot mount {source} on {target}: no file system this kernel supports "
                f"({', '.join(candidates)}) found on it; the keystore should hold an ext4 "
                "file system",
                errno=last,
            )
        raise KeystoreError(f"cannot mount {source} on {target}: {os.strerror(last)}", errno=last)

    def unmount(self, target: str, *, lazy: bool = False) -> None:
        flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
        if _libc().umount2(target.encode(), flags) != 0:
            code = ctypes.get_errno()
            raise TeardownError(f"cannot unmount {target}: {os.strerror(code)}", errno=code)

    def is_mounted(self, target: str) -> bool:
        points = mount_points(self.mountinfo)
        return target in points or os.path.realpath(target) in points

    def mount_exists(self, mount_id: int) -> bool:
        point = self._made.get(mount_id)
        return point is not None and (mount_id, point) in mount_table(self.mountinfo)


class HostFilesystem:
    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listing(self, path: str) -> tuple[str, ...]:
        try:
            return tuple(sorted(os.listdir(path)))
        except OSError:
            return ()

    def make_dirs(self, path: str, mode: int) -> list[str]:
        """Create the mount point with ``mode`` (0700), parents too, or tighten
        an existing one; every directory created is returned, so the caller
        can remove exactly those."""
        missing: list[str] = []
        walk = os.path.normpath(path)
        while not os.path.lexists(walk):
            missing.append(walk)
            parent = os.path.dirname(walk)
            if parent == walk:
                break
            walk = parent
        created: list[str] = []
        try:
            for directory in reversed(missing):
                os.mkdir(directory, mode)
                created.append(directory)
            if not os.path.isdir(path) or os.path.islink(path):
                raise KeystoreError(f"{path} exists and is not a directory: remove it")
            os.chmod(path, mode)
        except BaseException as exc:
            # Whatever stops us (SIGTERM between two mkdir calls included),
            # nothing made here outlives the call.
            # mkdir may have made the directory when the signal arrived:
            # every one that was missing and exists now is ours (rmdir
            # only ever removes an empty one).
            for directory in missing:  # innermost first
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            if isinstance(exc, OSError):
                raise KeystoreError(f"cannot create mount point {path}: {exc.strerror}") from None
            raise
        return created

    def real_path(self, path: str) -> str:
        return os.path.realpath(path)

    def remove_flag(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def write_flag(self, path: str, text: str) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(
            path,
            os.O_WRONLY
            | os.O_CREAT
            | os.O_TRUNC
            | os.O_NOFOLLOW
            | os.O_CLOEXEC
            | os.O_NOCTTY
            | os.O_NONBLOCK,  # a FIFO there fails (ENXIO) instead of blocking
            0o600,
        )
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def remove_dir(self, path: str) -> None:
        try:
            os.rmdir(path)
        except OSError as exc:
            raise TeardownError(f"cannot remove {path}: {exc.strerror}") from None
