"""The teardown (lczfs_unlockd/teardown.py, Context.guarded): failure and SIGTERM at every step,
EBUSY retries, masking, verification."""

from __future__ import annotations

import errno
import logging
import os
import signal

import pytest

from lczfs_unlockd import sequence
from lczfs_unlockd.context import BUSY_RETRIES
from lczfs_unlockd.errors import Interrupted, PoolError, TeardownError, UnlockError
from lczfs_unlockd.ports import MappingState
from tests.fakes import FakeCryptsetup, fake_ports
from tests.unit.conftest import CRYPT_UNIT, assert_clean


def config_reaching(step, make_config):
    # With every listed device present the pool is imported without a scan:
    # the scan step needs a configuration without a devices list.
    return make_config(devices=[]) if step == "scan" else make_config()


STEPS = [
    "scan",
    "import",
    "datasets",
    "luks_open",
    "ask",
    "passphrase",
    "activate",
    "mount",
    "load_key",
]


@pytest.mark.parametrize("step", STEPS)
def test_failure_at_every_step_leaves_nothing(world, make_config, run, step):
    world.answers = ["luks pass"]

    def fail(_w):
        raise UnlockError(f"injected failure at {step}")

    world.hooks[step] = fail
    report = run(config_reaching(step, make_config))
    assert not report.ok
    assert f"injected failure at {step}" in str(report.error)
    assert_clean(world)
    assert world.loaded_keys() == {"rpool/crypt": False}


@pytest.mark.parametrize("step", [*STEPS, "sleep"])
def test_sigterm_at_every_step_leaves_nothing(world, make_config, run, step):
    world.answers = ["luks pass"]
    if step == "sleep":
        world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
        world.appear_at = {"/dev/disk/by-id/nvme-disk-part2": 2.0}
    fired = []

    def sigterm(_w):
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    world.hooks[step] = sigterm
    report = run(config_reaching(step, make_config))
    assert fired
    assert isinstance(report.error, Interrupted)
    assert "received SIGTERM" in str(report.error)
    assert report.errno == errno.EINTR
    assert_clean(world)
    # the handler is removed again afterwards
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_teardown_does_not_interrupt_it(world, make_config, run):
    world.answers = ["luks pass"]
    world.hooks["unmount"] = lambda w: os.kill(os.getpid(), signal.SIGTERM)
    report = run(make_config())
    assert_clean(world)
    assert isinstance(report.error, Interrupted)
    assert "during teardown" in str(report.error)


def test_sigterm_swallowed_inside_a_callback_is_raised_at_the_next_checkpoint(
    world, make_config, run
):
    """A raise inside a ctypes log callback is lost; the recorded signal is not."""
    world.answers = ["luks pass"]

    def swallowed(_w):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:  # what ctypes does with an exception in a callback
            pass

    world.hooks["activate"] = swallowed
    report = run(make_config())
    assert isinstance(report.error, Interrupted)
    assert world.loaded_keys() == {"rpool/crypt": False}
    assert_clean(world)


def test_sigterm_while_logging_is_not_swallowed(world, make_config, run, caplog):
    world.answers = ["luks pass"]

    class Bomb(logging.Handler):
        fired = False

        def emit(self, record):
            if not Bomb.fired and "keystore opened" in record.getMessage():
                Bomb.fired = True
                os.kill(os.getpid(), signal.SIGTERM)

    handler = Bomb()
    logging.getLogger("lczfs_unlockd").addHandler(handler)
    try:
        report = run(make_config())
    finally:
        logging.getLogger("lczfs_unlockd").removeHandler(handler)
    assert Bomb.fired
    assert isinstance(report.error, Interrupted)
    assert_clean(world)


def test_teardown_failure_is_reported_and_the_rest_still_runs(world, make_config, run, caplog):
    world.answers = ["luks pass"]

    def refuse(_w):
        raise TeardownError("cannot unmount: Device or resource busy", errno=errno.EBUSY)

    world.hooks["unmount"] = refuse
    world.hooks["unmount_lazy"] = refuse
    report = run(make_config())
    assert not report.ok
    assert isinstance(report.error, TeardownError)
    assert f"{world.mountpoint} is still mounted" in str(report.error)
    assert "deferred-deactivate lczfs-keystore" in world.events
    # mask ran although unmount and close failed
    assert world.masked.get(CRYPT_UNIT) == "masked-runtime"
    assert f"left behind: {world.mountpoint} is still mounted" in caplog.text


def test_transiently_busy_teardown_is_retried(world, make_config, run):
    world.answers = ["luks pass"]
    busy = {"unmount": 3, "deactivate": 2}

    def flaky(name):
        def hook(_w):
            if busy[name] > 0:
                busy[name] -= 1
                raise TeardownError(f"{name}: Device or resource busy", errno=errno.EBUSY)

        return hook

    world.hooks["unmount"] = flaky("unmount")
    world.hooks["deactivate"] = flaky("deactivate")
    report = run(make_config())
    assert report.ok, report.error
    assert busy == {"unmount": 0, "deactivate": 0}
    assert_clean(world)


def test_dry_run_export_retried_while_busy(world, make_config, run):
    world.answers = ["luks pass"]
    left = [2]

    def busy_export(_w):
        if left[0]:
            left[0] -= 1
            raise UnlockError("cannot export 'rpool': pool is busy", errno=errno.EBUSY)

    world.hooks["export"] = busy_export
    report = run(make_config(dry_run=True))
    assert report.ok, report.error
    assert not world.imported


def test_mask_failure_fails_the_run(world, make_config, run):
    world.answers = ["luks pass"]

    def no_bus(_w):
        raise TeardownError(
            "systemd's private bus unix:path=/run/systemd/private: connection refused"
        )

    world.hooks["mask"] = no_bus
    report = run(make_config())
    assert not report.ok
    assert "private bus" in str(report.error)
    assert f"{CRYPT_UNIT} is static, not masked" in str(report.error)
    assert world.clean()


def test_extra_units_are_masked(world, make_config, run):
    world.answers = ["luks pass"]
    assert run(make_config(mask=["bootsecrets.mount", "mask-secretsroot.service"])).ok
    assert world.masked["mask-secretsroot.service"] == "masked-runtime"


# --- verification: what the undo actions could not undo is a failure ----------------


def test_dry_run_pool_that_stays_busy_is_reported_still_imported(world, make_config, run):
    world.answers = ["luks pass"]
    exports = []

    def busy_export(w):
        exports.append(w.time)
        raise UnlockError("cannot export 'rpool': pool is busy", errno=errno.EBUSY)

    world.hooks["export"] = busy_export
    report = run(make_config(dry_run=True))
    assert not report.ok
    assert len(exports) == BUSY_RETRIES
    assert world.imported  # the dry run's read-only import outlived it...
    assert "pool rpool is still imported" in report.teardown_problems  # ...and says so
    assert "pool rpool is still imported" in str(report.error)
    assert not report.verified
    assert world.clean()  # the mount and the mapping were still undone


def test_verification_that_cannot_check_fails_the_run(world, make_config, run):
    world.answers = ["luks pass"]

    def zpool_hangs_after_export(w):
        if "export rpool" in w.events:
            raise PoolError("zpool list timed out after 30 s", errno=errno.ETIMEDOUT)

    world.hooks["health"] = zpool_hangs_after_export
    report = run(make_config(dry_run=True))
    assert not report.ok
    assert not report.verified
    assert "verification: zpool list timed out after 30 s" in str(report.error)
    assert not world.imported and world.clean()


class NoDeviceMapper(FakeCryptsetup):
    """crypt_status() without a usable device-mapper (no dm_mod): CRYPT_INVALID."""

    def status(self, name: str) -> MappingState:
        return MappingState.INVALID


def test_device_mapper_unavailable_is_not_a_mapping_left_open(world, make_config, caplog):
    caplog.set_level(logging.INFO, logger="lczfs_unlockd")
    world.disks = {"/dev/disk/by-id/nvme-disk-part2": False}
    ports = fake_ports(world)
    ports.crypt = NoDeviceMapper(world)
    report = sequence.run(make_config(timeout="4s"), ports)
    assert isinstance(report.error, PoolError)  # the real failure, not a teardown one
    assert report.teardown_problems == []
    assert report.verified
    assert "/dev/mapper/lczfs-keystore not present (device-mapper unavailable)" in caplog.text


# --- a signal as the teardown begins (review of the step split) ---------------


@pytest.fixture
def signal_on_first_disarm(monkeypatch):
    """SIGTERM arrives in the instant before signals stop interrupting: its
    handler runs inside the very line that disarms them."""
    from lczfs_unlockd.context import Signals

    fired: list[str] = []

    def get(self):
        return self.__dict__.get("_interruptible", True)

    def set_(self, value):
        if value is False and not fired:
            fired.append("first")
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the store
        self.__dict__["_interruptible"] = value

    monkeypatch.setattr(Signals, "interruptible", property(get, set_), raising=False)
    return fired


@pytest.mark.parametrize("fail", [False, True], ids=["after-success", "after-a-failure"])
def test_one_sigterm_as_the_teardown_begins_leaves_nothing(
    world, make_config, run, signal_on_first_disarm, fail
):
    world.answers = ["luks pass"]
    if fail:

        def boom(_w):
            raise UnlockError("injected")

        world.hooks["load_key"] = boom
    report = run(make_config())
    assert signal_on_first_disarm and not report.ok
    assert world.clean(), (world.mappings, world.mounts)
    assert not os.path.exists(world.mountpoint)
    assert any("tearing down" in n for n in world.notifications)


def test_a_second_sigterm_during_the_unmount_does_not_cut_it_short(
    world, make_config, run, signal_on_first_disarm
):
    world.answers = ["luks pass"]

    def second(_w):
        if len(signal_on_first_disarm) == 1:
            signal_on_first_disarm.append("second")
            os.kill(os.getpid(), signal.SIGTERM)

    world.hooks["unmount"] = second
    report = run(make_config())
    assert signal_on_first_disarm == ["first", "second"]
    assert world.clean(), (world.mappings, world.mounts)
    assert report.teardown_problems == []
    assert "SIGTERM" in str(report.error)
