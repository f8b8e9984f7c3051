"""Step 3, the mount: the opened keystore, read-only on a 0700 directory, unmounted at the end.

A mount point under a symlink is refused (it would be mounted where
mountinfo shows another path, and outlive us); so is one that already has
something mounted on it.  The mount is recognised by its mount ID, not its
path, and unmounted lazily if it stays busy.  Directories this run created
are removed again; a dry run leaves an existing mount point exactly as it is.
"""

from __future__ import annotations

import errno
import functools
import logging

from .config import check_real_path
from .context import Context
from .errors import KeystoreError
from .unitnames import mount_unit

log = logging.getLogger("lczfs_unlockd")


def mount_keystore(ctx: Context, device: str) -> str:
    """Mount ``device`` read-only on keystore.mountpoint; return the mount point."""
    p, mp = ctx.ports, ctx.config.keystore.mountpoint
    with ctx.step(f"mounting {device} read-only on {mp}", "mount"):
        # Checked at config load and again here, where it counts.
        check_real_path(mp, "keystore.mountpoint", realpath=p.fs.real_path)
        # First, so it runs after the unmount; parents included, innermost first.
        ctx.on_exit("remove created directories", functools.partial(_remove_created_dirs, ctx))
        if not (ctx.config.dry_run and p.fs.exists(mp)):
            ctx.state.created_dirs = p.fs.make_dirs(mp, 0o700)
        if p.mounts.is_mounted(mp):
            raise KeystoreError(
                f"something is already mounted on {mp}: remove the old {mount_unit(mp)} / "
                "fstab entry, or choose another keystore.mountpoint",
                errno=errno.EBUSY,
            )
        ctx.on_exit(
            f"unmount {mp}",
            functools.partial(_unmount, ctx),
            functools.partial(_unmount, ctx, lazy=True),
        )
        ctx.state.mounting = True
        ctx.state.mount_id = p.mounts.mount(device, mp, "")
    return mp


def still_mounted(ctx: Context) -> bool:
    """The keystore's own mount is still there: by its mount ID, not a path string."""
    p, mp = ctx.ports, ctx.config.keystore.mountpoint
    if ctx.state.mount_id is not None:
        return p.mounts.mount_exists(ctx.state.mount_id)
    # Someone else's mount found there is not ours to report or remove.
    return ctx.state.mounting and p.mounts.is_mounted(mp)


def _unmount(ctx: Context, *, lazy: bool = False) -> None:
    p, mp = ctx.ports, ctx.config.keystore.mountpoint
    if still_mounted(ctx):
        p.mounts.unmount(mp, lazy=lazy)
        if lazy:
            log.warning("detached %s lazily: it goes away when its last user closes it", mp)
        else:
            log.info("unmounted %s", mp)


def _remove_created_dirs(ctx: Context) -> None:
    for path in reversed(ctx.state.created_dirs):
        if ctx.ports.fs.exists(path):
            ctx.ports.fs.remove_dir(path)
            log.debug("removed %s (created by this run)", path)
