"""Hostile pool properties, hung calls, duplicate pools, odd mount points: issue 14."""

from __future__ import annotations

import errno
import os
import signal
import time

from lczfs_unlockd import context
from lczfs_unlockd.errors import AmbiguousPoolError, Interrupted, KeyLoadError, PoolError
from tests.fakes import PASSPHRASE_KEY

# --- attacker-controlled KDF cost --------------------------------------------------


def test_absurd_pbkdf2iters_is_refused_and_the_other_roots_still_load(world, make_config, run):
    bad = world.add_encryption_root("rpool/evil", "passphrase", PASSPHRASE_KEY.encode(), iters=1000)
    bad.iters = 2**32  # what the pool says; deriving would overflow hashlib
    world.answers = ["luks pass"]
    report = run(make_config())
    assert not report.ok
    message = str(report.error)
    assert "rpool/evil has pbkdf2iters=4294967296, more than max_pbkdf2iters = 100000000" in (
        message
    )
    assert isinstance(report.error, KeyLoadError)
    assert world.loaded_keys() == {"rpool/crypt": True, "rpool/evil": False}
    assert world.clean()
    assert any(n.startswith("STATUS=") for n in world.notifications)


def test_pbkdf2iters_cap_is_configurable(world, make_config, run):
    world.add_encryption_root("rpool/slow", "passphrase", PASSPHRASE_KEY.encode(), iters=200_000)
    world.answers = ["luks pass"]
    report = run(make_config(max_pbkdf2iters=150_000))
    assert not report.ok and "max_pbkdf2iters = 150000" in str(report.error)
    world.answers = ["luks pass"]
    report = run(make_config(max_pbkdf2iters=200_000))
    assert report.ok, report.error


def test_an_unexpected_exception_in_one_dataset_does_not_stop_the_others(world, make_config, run):
    world.add_encryption_root("rpool/zz", "hex", ("ab" * 32 + "\n").encode())
    calls: list[int] = []

    def explode(_w):
        calls.append(1)
        if len(calls) == 1:
            raise OverflowError("int too large to convert")

    world.hooks["load_key"] = explode
    world.answers = ["luks pass"]
    report = run(make_config())
    assert not report.ok
    assert "unexpected OverflowError" in str(report.error)
    assert sum(world.loaded_keys().values()) == 1  # the second root loaded
    assert world.clean()


def test_any_unexpected_exception_is_a_reported_failure_with_teardown(world, make_config, run):
    def bug(_w):
        raise RuntimeError("a bug")

    world.hooks["mask"] = bug  # in the teardown: still reported, not raised
    world.hooks["datasets"] = bug
    world.answers = ["luks pass"]
    report = run(make_config())
    assert not report.ok
    assert report.errno
    assert world.clean()


def test_unexpected_exception_outside_any_step_is_reported(world, make_config, run):
    def bug(_w):
        raise ZeroDivisionError("boom")

    world.hooks["health"] = bug
    report = run(make_config())
    assert not report.ok
    assert "unexpected ZeroDivisionError" in report.summary
    assert report.errno


# --- timeouts --------------------------------------------------------------------


def test_every_zpool_call_of_the_pool_step_has_a_deadline(world, make_config, run):
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    world.appear_at = {"/dev/disk/by-id/nvme-disk-part2": 3.0}
    world.answers = ["luks pass"]
    assert run(make_config(devices=[])).ok
    pool_calls = [c for c in world.zpool_calls if c[0] in ("health", "scan", "import")]
    assert pool_calls
    for name, _sources, timeout in pool_calls:
        assert timeout is not None and timeout <= 20.0, (name, timeout)


def test_extension_only_during_waits(world, make_config, run, monkeypatch):
    """EXTEND_TIMEOUT_USEC while a wait runs; none while keys load (a long C call)."""
    monkeypatch.setattr(context, "HEARTBEAT", 0.01)
    during: list[list[str]] = []

    def slow_load(w):
        before = len(w.notifications)
        time.sleep(0.1)  # real time: the heartbeat thread would beat ~10 times
        during.append(w.notifications[before:])

    world.hooks["load_key"] = slow_load
    world.answers = ["luks pass"]
    assert run(make_config()).ok
    assert during and not any(n.startswith("EXTEND_TIMEOUT_USEC") for n in during[0])
    assert any(n.startswith("EXTEND_TIMEOUT_USEC=") for n in world.notifications)


def test_no_extension_once_a_signal_arrived(world, make_config, run, monkeypatch):
    """EXTEND_TIMEOUT_USEC also extends the stop timeout: after SIGTERM, never."""
    monkeypatch.setattr(context, "HEARTBEAT", 0.01)
    seen: list[int] = []

    def sigterm_then_wait(w):
        if not seen:
            seen.append(len(w.notifications))
            os.kill(os.getpid(), signal.SIGTERM)

    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    world.hooks["sleep"] = sigterm_then_wait
    report = run(make_config())
    assert isinstance(report.error, Interrupted)
    after = world.notifications[seen[0] :]
    assert not any(n.startswith("EXTEND_TIMEOUT_USEC") for n in after)


# --- duplicate pool names --------------------------------------------------------


def test_two_pools_with_the_name_fail_at_once_naming_both(world, make_config, run):
    world.duplicate_guids = [2222]
    report = run(make_config(devices=[]))
    assert isinstance(report.error, AmbiguousPoolError)
    assert report.error.errno == errno.ENOTUNIQ
    text = str(report.error)
    assert "GUID 1111" in text and "GUID 2222" in text and "pool_guid" in text
    assert world.time < 5  # not retried until the 20 s deadline
    assert not world.imported


def test_ambiguous_import_is_not_retried(world, make_config, run):
    world.duplicate_guids = [2222]
    report = run(make_config())  # devices listed and present: straight to import
    assert isinstance(report.error, AmbiguousPoolError)
    assert len([c for c in world.zpool_calls if c[0] == "import"]) == 1


def test_pool_guid_picks_the_right_pool(world, make_config, run):
    world.duplicate_guids = [2222]
    world.answers = ["luks pass"]
    report = run(make_config(devices=[], pool_guid=1111))
    assert report.ok, report.error
    assert world.loaded_keys() == {"rpool/crypt": True}


def test_pool_guid_of_an_already_imported_pool_is_checked(world, make_config, run):
    world.imported = True
    world.imported_at = 0.0
    report = run(make_config(pool_guid=3333))
    assert isinstance(report.error, PoolError)
    assert "has GUID 1111, not pool_guid = 3333" in str(report.error)


# --- mount point -----------------------------------------------------------------


def test_mount_point_under_a_symlink_at_run_time_is_refused(world, make_config, run, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "parent").mkdir()
    mountpoint = str(tmp_path / "parent" / "bootsecrets")
    world.mountpoint = mountpoint
    for ds in world.datasets.values():
        if ds.keylocation.startswith("file://"):
            ds.keylocation = f"file://{mountpoint}/rpoolcrypt.key"
    cfg = make_config(keystore={"mountpoint": mountpoint})
    # Swapped for a symlink after the configuration was checked.
    (tmp_path / "parent").rmdir()
    (tmp_path / "parent").symlink_to(real)
    world.answers = ["luks pass"]
    report = run(cfg)
    assert not report.ok
    assert "keystore.mountpoint" in str(report.error)
    assert f'is really "{real}/bootsecrets"; use {real}/bootsecrets' in str(report.error)
    assert not world.mounts and not world.mappings


def test_dry_run_removes_the_parents_it_created(world, make_config, run, tmp_path):
    mountpoint = str(tmp_path / "run" / "keystore" / "rpool")
    world.mountpoint = mountpoint
    world.datasets["rpool/crypt"].keylocation = f"file://{mountpoint}/rpoolcrypt.key"
    world.answers = ["luks pass"]
    report = run(make_config(dry_run=True, keystore={"mountpoint": mountpoint}))
    assert report.ok, report.error
    assert not (tmp_path / "run").exists()


def test_real_run_removes_the_parents_it_created(world, make_config, run, tmp_path, caplog):
    mountpoint = str(tmp_path / "run" / "keystore" / "rpool")
    world.mountpoint = mountpoint
    world.datasets["rpool/crypt"].keylocation = f"file://{mountpoint}/rpoolcrypt.key"
    world.answers = ["luks pass"]
    report = run(make_config(keystore={"mountpoint": mountpoint}))
    assert report.ok, report.error
    assert not (tmp_path / "run").exists()
    assert f"removed {mountpoint}, {tmp_path}/run/keystore, {tmp_path}/run" in caplog.text


def test_a_directory_that_cannot_be_removed_is_left_behind_and_said(
    world, make_config, run, tmp_path
):
    mountpoint = str(tmp_path / "made" / "bootsecrets")
    world.mountpoint = mountpoint
    world.datasets["rpool/crypt"].keylocation = f"file://{mountpoint}/rpoolcrypt.key"

    def squat(_w):
        os.makedirs(tmp_path / "made" / "someone-else", exist_ok=True)

    world.hooks["load_key"] = squat
    world.answers = ["luks pass"]
    report = run(make_config(keystore={"mountpoint": mountpoint}))
    assert not report.ok
    assert f"directories this run created remain: {tmp_path}/made" in report.summary


# --- what the final status says ----------------------------------------------------


def test_summary_of_many_roots_stays_short(world, make_config, run):
    for i in range(131):
        world.add_encryption_root(f"rpool/r{i:03}", "hex", ("cd" * 32).encode())
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.error
    assert len(report.loaded) == 132
    assert "and 124 more" in report.summary
    assert len(report.summary.encode()) < 1024


def test_sigterm_status_says_what_was_verified(world, make_config, run):
    def sigterm(_w):
        os.kill(os.getpid(), signal.SIGTERM)

    world.hooks["mount"] = sigterm
    world.answers = ["luks pass"]
    report = run(make_config())
    assert isinstance(report.error, Interrupted)
    assert report.summary.endswith("nothing is left open")


def test_sigterm_status_says_what_was_left_behind(world, make_config, run):
    def sigterm(_w):
        os.kill(os.getpid(), signal.SIGTERM)

    def stuck(_w):
        raise PoolError("cannot unmount: busy", errno=errno.EIO)

    world.hooks["load_key"] = sigterm
    world.hooks["unmount"] = stuck
    world.hooks["unmount_lazy"] = stuck
    world.answers = ["luks pass"]
    report = run(make_config())
    assert isinstance(report.error, Interrupted)
    assert "left behind:" in report.summary
    assert "nothing is left open" not in report.summary


# --- password agents ---------------------------------------------------------------


def test_passphrase_prompt_has_systemd_cryptsetups_id_and_a_pin_prompt_does_not(
    world, make_config, run
):
    from tests.fakes import Token

    world.tokens = [Token(pin="1234")]
    world.answers = ["1234"]
    assert run(make_config()).ok
    world.tokens = []
    world.answers = ["luks pass"]
    assert run(make_config()).ok
    device = "/dev/zvol/rpool/volumes/bootsecrets-part1"
    assert world.idents == [f"lczfs-unlockd:{device}", f"cryptsetup:{device}"]


def test_no_usable_key_slot_moves_on_without_asking_again(world, make_config, run):
    from lczfs_unlockd.errors import NoUsableKeyslotError

    def no_slot(_w):
        raise NoUsableKeyslotError("no key slot of the keystore can take a passphrase")

    world.hooks["passphrase"] = no_slot
    world.answers = ["luks pass", "luks pass", "luks pass"]
    report = run(make_config(keystore={"unlock": ["passphrase"], "tries": 3}))
    assert not report.ok
    assert len(world.prompts) == 1  # not asked three times
    assert "passphrase: no key slot of the keystore can take a passphrase" in str(report.error)


def test_infinite_grace_never_accepts_degraded(world, make_config, run):
    world.mirror = True
    world.disks = {"/dev/disk/by-id/a": True, "/dev/disk/by-id/b": False}
    report = run(make_config(devices=[], online_grace="infinity", timeout="10s"))
    assert isinstance(report.error, PoolError)
    assert "it is DEGRADED" in str(report.error)
    assert any(
        "pool is DEGRADED, missing b; not accepted (online_grace = infinity)" in n
        for n in world.notifications
    ), world.notifications
    assert not world.imported
