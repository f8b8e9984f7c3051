"""Step 3, the mount (lczfs_unlockd/mount.py): a 0700 mount point, a foreign mount, lazy unmount."""

from __future__ import annotations

import errno
import os

from lczfs_unlockd.errors import TeardownError


def test_mount_point_is_created_0700_and_removed_after(world, make_config, run, mountpoint):
    world.answers = ["luks pass"]
    modes: list[int] = []
    world.hooks["load_key"] = lambda w: modes.append(os.stat(mountpoint).st_mode & 0o777)
    assert run(make_config()).ok
    assert modes == [0o700]
    assert not os.path.exists(mountpoint)


def test_something_already_mounted_is_refused(world, make_config, run, mountpoint):
    os.makedirs(mountpoint)
    world.mounts[mountpoint] = "/dev/sdz1"
    world.answers = ["luks pass"]
    report = run(make_config())
    assert "something is already mounted on" in str(report.error)
    assert world.mounts == {mountpoint: "/dev/sdz1"}  # not ours: left alone
    assert world.mappings == {}


def test_dry_run_keeps_an_existing_mount_point_mode(world, make_config, run, mountpoint):
    os.makedirs(mountpoint, mode=0o755)
    os.chmod(mountpoint, 0o755)
    world.answers = ["luks pass"]
    assert run(make_config(dry_run=True)).ok
    assert os.stat(mountpoint).st_mode & 0o777 == 0o755


def test_unmount_that_stays_busy_is_detached_lazily(world, make_config, run):
    world.answers = ["luks pass"]

    def busy(_w):
        raise TeardownError("cannot unmount: Device or resource busy", errno=errno.EBUSY)

    world.hooks["unmount"] = busy
    report = run(make_config())
    assert not report.ok
    assert f"unmount {world.mountpoint} lazily" in world.events
    assert "deactivate lczfs-keystore" in world.events
    assert world.clean()
