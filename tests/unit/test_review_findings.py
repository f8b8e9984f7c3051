"""Adversarial review of the issue-14 hardening: each test reproduces one finding.

Every test here failed on the reviewed code (1e92270) and passes with the
fixes that followed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from lczfs_unlockd import cli, context, sequence
from lczfs_unlockd import zpool as zpoolmod
from lczfs_unlockd.errors import AmbiguousPoolError, Interrupted, KeystoreError
from lczfs_unlockd.filesystem import LibcMounts
from lczfs_unlockd.process import Result
from tests.fakes import FakeZpool, Token, fake_ports


def _busy_c_call(seconds: float) -> None:
    """A C call that releases the GIL and does not return to Python for a while.

    Like libcryptsetup's keyslot KDF (an attacker can set the token-bound
    slot's pbkdf2 iterations / argon2 cost in the unauthenticated LUKS2 JSON):
    Python signal handlers are deferred until it returns.
    """
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 200_000)


# --- 1. EXTEND_TIMEOUT_USEC around a token activation (HIGH) ---------------------


def test_no_extend_timeout_during_a_token_activation_after_sigterm(
    world, make_config, run, monkeypatch
):
    """SIGTERM lands while libcryptsetup runs the token slot's KDF: the Python
    handler cannot run until the C call returns, so signals.pending stays None
    and the heartbeat thread keeps sending EXTEND_TIMEOUT_USEC -- which also
    extends systemd's stop timeout, so SIGKILL never comes."""
    monkeypatch.setattr(context, "HEARTBEAT", 0.02)
    world.tokens = [Token()]
    marks: dict[str, int] = {}

    def kill() -> None:
        marks["kill"] = len(world.notifications)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler waits: main thread is in C

    def token(w):
        threading.Timer(0.05, kill).start()
        hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 3_000_000)  # one C call, ~1 s

    world.hooks["token"] = token
    report = run(make_config(keystore={"unlock": ["token"]}))
    assert isinstance(report.error, Interrupted)
    after = [n for n in world.notifications[marks["kill"] :] if "EXTEND_TIMEOUT_USEC" in n]
    assert after == [], f"{len(after)} EXTEND_TIMEOUT_USEC sent after SIGTERM"


def test_a_token_activation_with_a_hostile_kdf_cost_is_not_extended_forever(
    world, make_config, run, monkeypatch
):
    """The token path wraps activate_by_token (plugin + the keyslot's KDF, whose
    cost sits in the attacker-writable LUKS header) in _extending(): nothing
    bounds that call, token_timeout only bounds the -EAGAIN retry loop.  The
    passphrase path rightly extends only around the prompt, not around
    activate_by_passphrase."""
    monkeypatch.setattr(context, "HEARTBEAT", 0.02)
    world.tokens = [Token()]
    marks: dict[str, int] = {}

    def token(w):
        marks["start"] = len(w.notifications)
        _busy_c_call(0.5)  # 2^32-1 pbkdf2 iterations, in small
        marks["end"] = len(w.notifications)

    world.hooks["token"] = token
    report = run(make_config(keystore={"unlock": ["token"]}))
    assert report.ok, report.error
    during = [
        n for n in world.notifications[marks["start"] : marks["end"]] if "EXTEND_TIMEOUT" in n
    ]
    assert during == [], f"{len(during)} EXTEND_TIMEOUT_USEC sent during the KDF"


# --- 2. pool_guid imports a pool of another name (MEDIUM) -------------------------


class _ByGuidZpool(FakeZpool):
    """As the real zpool does: `zpool import -N -d ... GUID` imports the pool
    with that GUID under whatever name its labels carry."""

    def import_pool(self, pool, sources, *, guid=None, force, readonly, timeout=None):
        if guid is not None and guid == self.w.pool_guid:
            pool = self.w.pool  # the on-disk name, not the configured one
        return super().import_pool(
            pool, sources, guid=guid, force=force, readonly=readonly, timeout=timeout
        )


def test_pool_guid_of_a_pool_with_another_name_is_refused_and_nothing_stays_imported(
    world, make_config
):
    world.pool = "tank"  # GUID 1111 is "tank" on disk; the config says rpool
    ports = fake_ports(world)
    ports.zpool = _ByGuidZpool(world)
    report = sequence.run(make_config(pool_guid=1111, dry_run=True), ports)
    # guid("rpool") is None after the import, so _check_imported_guid passes;
    # the dry run's export looks for "rpool" and leaves "tank" imported.
    assert not world.imported, f"dry run left pool {world.pool} imported: {report.summary}"
    assert not report.ok


# --- 3. false "left behind" reports ---------------------------------------------


def test_dry_run_with_an_imported_pool_of_the_wrong_guid_does_not_claim_it_left_it(
    world, make_config, run
):
    world.imported, world.imported_at = True, 0.0
    report = run(make_config(pool_guid=2222, dry_run=True))
    assert not report.ok and "GUID 1111" in str(report.error)
    # It was imported before the run; the run imported nothing.
    assert report.teardown_problems == [], report.teardown_problems


def test_a_foreign_mount_on_the_mount_point_is_not_reported_as_left_behind(
    world, make_config, run, mountpoint
):
    os.makedirs(mountpoint)
    world.mounts[mountpoint] = "/dev/sdz1"  # an fstab entry's mount, not ours
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.errno == errno.EBUSY
    assert report.teardown_problems == [], report.teardown_problems


def test_a_reused_mount_id_is_not_taken_for_the_keystore_mount(world, make_config, run):
    """mountinfo's mount ID is reused (lowest free): after our unmount, the next
    mount anywhere (another initrd unit) can carry it.  Verification then says
    the keystore is still mounted and the successful unlock fails."""

    def reuse(w):
        w.mount_ids["/sysroot/boot"] = w.mount_ids[w.mountpoint]

    world.hooks["unmount"] = reuse
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.summary


def test_libcmounts_mount_exists_checks_the_mount_point_too(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("29 1 0:26 / /sysroot/boot rw,relatime - ext4 /dev/sda1 rw\n")
    # ID 29 was the keystore's on /bootsecrets before it was unmounted.
    assert not LibcMounts(str(info)).mount_exists(29)


# --- 4. exceptions outside sequence.run in cli.main (LOW) -------------------------


def test_cli_failure_before_run_still_reports_status_and_errno(tmp_path, monkeypatch):
    """With rd.lczfs.debug / --debug, cryptsetup.set_debug() loads libcryptsetup
    outside sequence.run: a missing library is a traceback, no STATUS=/ERRNO=."""
    from lczfs_unlockd import cryptsetup, libc

    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setattr(libc, "forbid_core_dumps", lambda: None)

    def missing(_enabled):
        raise KeystoreError("cannot load libcryptsetup (...)", errno=errno.ELIBACC)

    monkeypatch.setattr(cryptsetup, "set_debug", missing)
    cfg = tmp_path / "c.toml"
    cfg.write_text('pool = "rpool"\n[keystore]\nvolume = "rpool/volumes/bootsecrets"\n')
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("")
    try:
        code = cli.main(["--config", str(cfg), "--debug", "--kernel-cmdline", str(cmdline)])
    except Exception as exc:
        pytest.fail(f"cli.main raised {type(exc).__name__}: {exc} (no STATUS=/ERRNO= sent)")
    assert code != 0
    got = sock.recv(4096).decode()
    assert "ERRNO=" in got


# --- 5. a zpool import overruns its deadline (LOW) --------------------------------


def test_import_pool_calls_share_one_deadline(monkeypatch):
    """import -> (fails) health -> (ambiguous) scan each got the whole timeout.

    Each call here runs to its deadline (a hung disk): the whole import_pool
    must stay within its timeout plus a short floor for each follow-up."""
    given: list[float | None] = []
    now = [1000.0]
    monkeypatch.setattr(zpoolmod.time, "monotonic", lambda: now[0])

    def fake_run(argv, *, check=True, timeout=None):
        given.append(timeout)
        now[0] += timeout or 0
        if argv[1] == "import" and "-N" in argv:
            return Result(tuple(argv), 1, "", "cannot import 'rpool': more than one matching pool")
        if argv[1] == "list":
            return Result(tuple(argv), 1, "", "cannot open 'rpool': no such pool")
        return Result(tuple(argv), 0, "", "")

    monkeypatch.setattr(zpoolmod, "run", fake_run)
    with pytest.raises(AmbiguousPoolError):
        zpoolmod.ZpoolCli().import_pool(
            "rpool", ["/dev/disk/by-id"], force=False, readonly=False, timeout=10.0
        )
    assert sum(t or 0 for t in given) <= 10.0 + 2 * zpoolmod.FOLLOW_UP_MIN, given


# --- 6. a directory created just before SIGTERM is not tracked (LOW) --------------


def test_directories_made_before_an_interruption_are_removed(
    world, make_config, tmp_path, monkeypatch
):
    mp = str(tmp_path / "run" / "keystore" / "bootsecrets")
    world.mountpoint = mp
    for ds in world.datasets.values():
        if ds.keylocation.startswith("file://"):
            ds.keylocation = f"file://{mp}/rpoolcrypt.key"
    real_mkdir = os.mkdir
    made: list[str] = []

    def mkdir(path, mode=0o777):
        real_mkdir(path, mode)
        made.append(path)
        if len(made) == 2:
            raise Interrupted("received SIGTERM: stopped")  # the handler, between mkdirs

    monkeypatch.setattr(os, "mkdir", mkdir)
    world.answers = ["luks pass"]
    report = sequence.run(make_config(keystore={"mountpoint": mp}), fake_ports(world))
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    assert isinstance(report.error, Interrupted)
    left = [p for p in made if os.path.exists(p)]
    assert left == [], f"left behind and not reported: {left}; summary: {report.summary}"
