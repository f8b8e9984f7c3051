"""Step 1, the pool (lczfs_unlockd/pool.py): waiting for its disks, scanning, importing."""

from __future__ import annotations

import errno

import pytest

from lczfs_unlockd.errors import PoolError
from tests.unit.conftest import assert_clean


def test_already_imported_pool_is_fine(world, make_config, run):
    world.imported, world.imported_at = True, -10.0
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.pool_imported_before
    assert "import rpool" not in world.events


def test_dry_run_keeps_an_imported_pool_imported(world, make_config, run):
    world.imported, world.imported_at = True, -10.0
    world.answers = ["luks pass"]
    report = run(make_config(dry_run=True))
    assert report.ok
    assert world.imported
    assert "export rpool" not in world.events


def test_missing_disk_fails_at_deadline_naming_it(world, make_config, run):
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    report = run(make_config(timeout="8s"))
    assert not report.ok
    assert isinstance(report.error, PoolError)
    assert "/dev/disk/by-id/nvme-disk-part2" in str(report.error)
    assert "within 8s" in str(report.error)
    assert 8.0 <= world.time < 8.5
    assert any(n == "STATUS=waiting for rpool: 0 of 1 devices" for n in world.notifications)
    assert any(n.startswith("EXTEND_TIMEOUT_USEC=") for n in world.notifications)
    assert_clean(world)


def test_pool_without_device_list_names_scan_dir(world, make_config, run):
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    report = run(make_config(devices=[], timeout="4s"))
    assert "no pool named rpool was found in /dev/disk/by-id" in str(report.error)


def test_hot_plugged_disk_is_imported_within_a_poll(world, make_config, run):
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    world.appear_at = {"/dev/disk/by-id/nvme-disk-part2": 5.0}
    world.answers = ["luks pass"]
    seen = {}
    world.hooks["import"] = lambda w: seen.setdefault("t", w.time)
    report = run(make_config())
    assert report.ok
    assert 5.0 <= seen["t"] < 5.3


def test_all_listed_devices_present_imports_without_a_scan(world, make_config, run):
    world.answers = ["luks pass"]
    assert run(make_config()).ok
    assert world.scans == 0  # the import reads the labels; no second read first
    assert world.imported_at is not None and world.imported_at < 0.1


def test_listed_devices_are_what_zpool_reads(world, make_config, run):
    # One -d per listed device, wherever it lives, instead of all of
    # dev_nodes: a stale disk with another rpool there is never looked at.
    world.disks = {"/dev/sda2": True}
    world.answers = ["luks pass"]
    assert run(make_config(devices=["/dev/sda2"])).ok
    assert world.scans == 0
    imports = [c for c in world.zpool_calls if c[0] == "import"]
    assert imports and imports[0][1] == ("/dev/sda2",)


def test_without_devices_zpool_reads_dev_nodes(world, make_config, run):
    world.answers = ["luks pass"]
    assert run(make_config(devices=[])).ok
    imports = [c for c in world.zpool_calls if c[0] == "import"]
    assert imports[0][1] == ("/dev/disk/by-id",)


def test_devices_list_leaving_out_a_missing_disk_is_warned_about(world, make_config, run, caplog):
    world.mirror = True
    world.disks = {"/dev/disk/by-id/a": True, "/dev/disk/by-id/b": False}
    world.answers = ["luks pass"]
    report = run(make_config(devices=["/dev/disk/by-id/a"]))
    assert report.ok, report.error
    assert (
        "pool rpool was imported DEGRADED as soon as every device in devices existed: "
        "the pool has disks not named there"
    ) in caplog.text


def test_degraded_mirror_is_accepted_after_grace(world, make_config, run, caplog):
    world.mirror = True
    world.disks = {"/dev/disk/by-id/a": True, "/dev/disk/by-id/b": False}
    world.answers = ["luks pass"]
    seen = {}
    world.hooks["import"] = lambda w: seen.setdefault("t", w.time)
    report = run(make_config(devices=[], online_grace="3s"))
    assert report.ok, report.error
    assert 3.0 <= seen["t"] < 3.3
    assert "importing rpool DEGRADED after waiting 3s: missing b" in caplog.text
    assert any("pool is DEGRADED, missing b; accepted after 3s" in n for n in world.notifications)


def test_online_mirror_does_not_wait_for_grace(world, make_config, run):
    world.mirror = True
    world.disks = {"/dev/disk/by-id/a": True, "/dev/disk/by-id/b": True}
    world.answers = ["luks pass"]
    assert run(make_config(devices=[], online_grace="30s", timeout="1min")).ok
    assert world.time < 1.0


def test_unavailable_pool_fails_with_zpool_detail(world, make_config, run):
    world.disks = {"/dev/disk/by-id/a": True, "/dev/disk/by-id/b": False}  # not a mirror
    report = run(make_config(devices=[], timeout="5s"))
    assert "it is UNAVAIL, missing b" in str(report.error)


def test_import_is_retried_within_the_deadline(world, make_config, run):
    world.answers = ["luks pass"]
    failures = [2]

    def flaky(_w):
        if failures[0]:
            failures[0] -= 1
            raise PoolError("cannot import pool rpool: no such pool available")

    world.hooks["import"] = flaky
    report = run(make_config())
    assert report.ok, report.error
    assert failures == [0]


def test_hostid_mismatch_is_not_retried(world, make_config, run):
    def foreign(_w):
        raise PoolError(
            "cannot import pool rpool: in use from another system", errno=errno.EADDRINUSE
        )

    world.hooks["import"] = foreign
    report = run(make_config())
    assert "in use from another system" in str(report.error)
    assert world.time < 1.0


def test_waiting_scans_only_when_dev_nodes_change_or_every_2s(world, make_config, run):
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    world.appear_at = {"/dev/disk/by-id/nvme-disk-part2": 10.0}
    world.answers = ["luks pass"]
    seen = {}
    world.hooks["import"] = lambda w: seen.setdefault("t", w.time)
    report = run(make_config(devices=[], timeout="30s"))
    assert report.ok, report.error
    # 10 s of waiting at a 0.2 s poll: 50 polls, but only ~6 label scans
    assert world.scans <= 8
    # ...and the disk's arrival is still noticed at the next poll
    assert 10.0 <= seen["t"] < 10.3


def test_scans_never_run_past_the_deadline(world, make_config, run):
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    report = run(make_config(devices=[], timeout="6s"))
    assert not report.ok
    assert world.scan_timeouts and all(t is not None and t <= 6.0 for t in world.scan_timeouts)
    # each scan gets what is left of the deadline (at least 1 s)
    assert world.scan_timeouts[0] == pytest.approx(6.0)
    assert min(world.scan_timeouts) >= 1.0


def test_pool_deadline_counts_from_the_start_of_the_step(world, make_config, run):
    """A slow first zpool call (seconds under QEMU) is inside the deadline, not before it."""
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    slow = [True]

    def slow_first_health(w):
        if slow[0]:
            slow[0] = False
            w.advance(5.0)

    world.hooks["health"] = slow_first_health
    report = run(make_config(timeout="8s"))
    assert not report.ok
    assert 8.0 <= world.time < 8.5


def test_dry_run_does_not_export_a_pool_someone_else_imported_meanwhile(world, make_config, run):
    """zfs-import-scan imports the pool read-write while we wait: it is theirs."""
    world.answers = ["luks pass"]

    def other_import(w):
        if not w.imported:
            w.imported = True
            w.imported_at = w.time
            w.events.append("someone else imports rpool")

    world.hooks["scan"] = other_import
    report = run(make_config(devices=[], dry_run=True))
    assert report.ok, report.summary
    assert report.pool_imported_before
    assert world.imported, "a dry run exported a pool it did not import"
    assert "export rpool" not in world.events
