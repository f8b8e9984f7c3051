"""The unlock sequence against a stateful fake machine (tests/fakes.py)."""

from __future__ import annotations

import errno
import logging
import os
import signal

import pytest

from lczfs_unlockd import sequence
from lczfs_unlockd.errors import Interrupted, KeyLoadError, PoolError, TeardownError, UnlockError
from tests.fakes import HEX_KEY, PASSPHRASE_KEY, RAW_KEY, Dataset, Token, fake_ports

CRYPT_UNIT = r"systemd-cryptsetup@lczfs\x2dkeystore.service"


def mount_unit_of(path: str) -> str:
    from lczfs_unlockd.unitnames import mount_unit

    return mount_unit(path)


def assert_clean(world, *, masked: bool = True) -> None:
    assert world.clean(), (world.mappings, world.mounts)
    if masked:
        assert world.masked.get(CRYPT_UNIT) == "masked-runtime"
        assert world.masked.get(mount_unit_of(world.mountpoint)) == "masked-runtime"
    else:
        assert world.masked == {}


# --- success paths ------------------------------------------------------------


def test_passphrase_unlocks_and_tears_down_in_order(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.error
    assert world.loaded_keys() == {"rpool/crypt": True}
    assert_clean(world)
    assert world.events == [
        "import rpool",
        "activate lczfs-keystore ro",
        f"mount {world.mountpoint}",
        "load-key rpool/crypt",
        f"unmount {world.mountpoint}",
        "deactivate lczfs-keystore",
        f"mask {CRYPT_UNIT} {mount_unit_of(world.mountpoint)}",
    ]
    assert report.summary.startswith("unlocked rpool/crypt (hex) in ")
    assert report.summary.endswith("; keystore closed")
    assert world.prompts == [
        ("Please enter the passphrase for keystore rpool/volumes/bootsecrets:", True)
    ]
    assert report.keystore_method == "passphrase"


def test_mount_point_is_created_0700_and_removed_after(world, make_config, run, mountpoint):
    world.answers = ["luks pass"]
    modes: list[int] = []
    world.hooks["load_key"] = lambda w: modes.append(os.stat(mountpoint).st_mode & 0o777)
    assert run(make_config()).ok
    assert modes == [0o700]
    assert not os.path.exists(mountpoint)


def test_status_is_reported_at_every_step(world, make_config, run):
    world.answers = ["luks pass"]
    run(make_config())
    statuses = [n for n in world.notifications if n.startswith("STATUS=")]
    assert any("importing pool rpool" in s for s in statuses)
    assert any("opening keystore /dev/zvol/rpool/volumes/bootsecrets-part1" in s for s in statuses)
    assert any("mounting /dev/mapper/lczfs-keystore read-only" in s for s in statuses)
    assert any("loading keys" in s for s in statuses)
    assert any("asking for the passphrase" in s for s in statuses)


def test_key_file_unlocks_without_prompt(world, make_config, run):
    world.luks_keyfiles["/etc/lczfs-unlockd/keystore.key"] = b"k" * 64
    world.luks_key_slots_for_files.add(b"k" * 64)
    report = run(make_config({"keyfile": "/etc/lczfs-unlockd/keystore.key"}))
    assert report.ok, report.error
    assert report.keystore_method == "key file"
    assert world.prompts == []
    assert_clean(world)


def test_wrong_key_file_falls_back_to_passphrase(world, make_config, run, caplog):
    world.luks_keyfiles["/etc/k"] = b"wrong"
    world.answers = ["luks pass"]
    report = run(make_config({"keyfile": "/etc/k"}))
    assert report.ok
    assert report.keystore_method == "passphrase"
    assert "key file /etc/k did not open the keystore" in caplog.text


def test_token_without_pin(world, make_config, run):
    world.tokens = [Token()]
    report = run(make_config())
    assert report.ok and report.keystore_method == "token"
    assert world.prompts == []


def test_token_with_pin_asks_for_pin(world, make_config, run):
    world.tokens = [Token(pin="1234")]
    world.answers = ["0000", "1234"]
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "token"
    assert [p for p, _ in world.prompts] == [
        "Please enter the security token PIN for keystore rpool/volumes/bootsecrets:"
    ] * 2
    # a PIN is never taken from the passphrase cache
    assert [cached for _, cached in world.prompts] == [False, False]


def test_token_that_shows_up_late_is_waited_for(world, make_config, run):
    world.tokens = [Token(available_after=1.5)]
    report = run(make_config({"token_timeout": "5s"}))
    assert report.ok and report.keystore_method == "token"


def test_absent_token_falls_back_to_passphrase_after_token_timeout(world, make_config, run):
    world.tokens = [Token(available_after=1e9)]
    world.answers = ["luks pass"]
    report = run(make_config({"token_timeout": "2s"}))
    assert report.ok and report.keystore_method == "passphrase"
    assert world.time >= 2.0


def test_unlock_order_is_respected(world, make_config, run):
    world.tokens = [Token()]
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase", "token"]}))
    assert report.keystore_method == "passphrase"


def test_wrong_then_right_passphrase(world, make_config, run, caplog):
    world.answers = ["nope", "luks pass"]
    report = run(make_config())
    assert report.ok
    assert [cached for _, cached in world.prompts] == [True, False]
    assert (
        "wrong passphrase for keystore /dev/zvol/rpool/volumes/bootsecrets-part1 (try 1 of 3)"
        in caplog.text
    )


def test_wrong_passphrase_tries_times_fails_clean(world, make_config, run):
    world.answers = ["a", "b", "c", "luks pass"]
    report = run(make_config({"tries": 3}))
    assert not report.ok
    assert len(world.prompts) == 3
    assert "passphrase: wrong 3 times" in str(report.error)
    assert report.errno == errno.EPERM
    assert world.loaded_keys() == {"rpool/crypt": False}
    assert_clean(world)


def test_unlimited_tries(world, make_config, run):
    world.answers = ["x"] * 7 + ["luks pass"]
    assert run(make_config({"tries": 0})).ok
    assert len(world.prompts) == 8


def test_prompt_timeout_fails_clean(world, make_config, run):
    world.answers = []
    report = run(make_config())
    assert not report.ok
    assert "no passphrase was entered" in str(report.error)
    assert_clean(world)


def test_all_three_key_formats_are_derived_and_loaded(world, make_config, run):
    world.add_encryption_root("rpool/rawset", "raw", RAW_KEY)
    world.add_encryption_root("rpool/pass", "passphrase", (PASSPHRASE_KEY + "\n").encode())
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.error
    assert world.loaded_keys() == {"rpool/crypt": True, "rpool/rawset": True, "rpool/pass": True}
    assert sorted(report.loaded) == [
        ("rpool/crypt", "hex"),
        ("rpool/pass", "passphrase"),
        ("rpool/rawset", "raw"),
    ]


def test_explicit_dataset_list_only_loads_those(world, make_config, run):
    world.add_encryption_root("rpool/other", "raw", RAW_KEY)
    world.answers = ["luks pass"]
    report = run(make_config(datasets=["rpool/other"]))
    assert report.ok
    assert world.loaded_keys() == {"rpool/crypt": False, "rpool/other": True}


def test_auto_skips_roots_with_other_keylocations(world, make_config, run, caplog):
    world.add_encryption_root("rpool/home", "passphrase", b"x" * 10, keylocation="prompt")
    world.answers = ["luks pass"]
    assert run(make_config()).ok
    assert world.loaded_keys()["rpool/home"] is False
    assert "not mine: rpool/home (keylocation=prompt" in caplog.text


def test_already_loaded_key_is_skipped(world, make_config, run):
    world.datasets["rpool/crypt"].loaded = True
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok
    assert report.already_loaded == ["rpool/crypt"]
    assert "rpool/crypt already unlocked" in report.summary


def test_already_imported_pool_is_fine(world, make_config, run):
    world.imported, world.imported_at = True, -10.0
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.pool_imported_before
    assert "import rpool" not in world.events


def test_existing_mapping_is_used_and_closed(world, make_config, run, caplog):
    world.mappings["lczfs-keystore"] = True
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "already open"
    assert world.prompts == []
    assert_clean(world)


# --- the pool -------------------------------------------------------------------


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


# --- keystore problems ---------------------------------------------------------------


def test_wrong_volume_fails_at_once(world, make_config, run):
    report = run(make_config({"volume": "rpool/volumes/nothere"}))
    assert "keystore.volume = rpool/volumes/nothere: no such zvol in pool rpool" in str(
        report.error
    )
    assert world.time < 1.0
    assert_clean(world)


def test_wrong_partition_fails_soon(world, make_config, run):
    report = run(make_config({"partition": 2}))
    assert "/dev/zvol/rpool/volumes/bootsecrets has no partition 2" in str(report.error)
    assert world.time < 7.0


def test_not_luks_fails_clean(world, make_config, run):
    world.luks_present = False
    report = run(make_config())
    assert "is not a LUKS device" in str(report.error)
    assert_clean(world)


def test_corrupt_header_fails_clean(world, make_config, run):
    world.luks_valid = False
    report = run(make_config())
    assert "damaged" in str(report.error)
    assert_clean(world)


def test_something_already_mounted_is_refused(world, make_config, run, mountpoint):
    os.makedirs(mountpoint)
    world.mounts[mountpoint] = "/dev/sdz1"
    world.answers = ["luks pass"]
    report = run(make_config())
    assert "something is already mounted on" in str(report.error)
    assert world.mounts == {mountpoint: "/dev/sdz1"}  # not ours: left alone
    assert world.mappings == {}


# --- keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "does not exist in the keystore"),
        (b"0123", "holds 4 characters; a hex key is exactly 64 hex digits"),
        (b"zz" * 32, "not a hex digit"),
        (("ab" * 32).encode(), "zfs rejected the key for rpool/crypt: wrong key"),
    ],
    ids=["missing", "truncated", "garbage", "wrong"],
)
def test_bad_key_file_fails_naming_dataset_and_path(world, make_config, run, content, expect):
    if content is None:
        del world.keystore_files["rpoolcrypt.key"]
    else:
        world.keystore_files["rpoolcrypt.key"] = content
    world.answers = ["luks pass"]
    report = run(make_config())
    assert not report.ok
    message = str(report.error)
    assert expect in message
    assert "rpool/crypt" in message
    assert f"{world.mountpoint}/rpoolcrypt.key" in message
    assert world.loaded_keys() == {"rpool/crypt": False}
    assert_clean(world)


def test_symlinked_key_file_is_refused(world, make_config, run, tmp_path):
    outside = tmp_path / "elsewhere.key"
    outside.write_text(HEX_KEY)
    del world.keystore_files["rpoolcrypt.key"]
    world.keystore_symlinks["rpoolcrypt.key"] = str(outside)
    world.answers = ["luks pass"]
    report = run(make_config())
    assert "symlink" in str(report.error)
    assert world.loaded_keys() == {"rpool/crypt": False}


def test_one_bad_dataset_does_not_stop_the_others(world, make_config, run):
    world.add_encryption_root("rpool/broken", "raw", b"short")
    world.answers = ["luks pass"]
    report = run(make_config())
    assert not report.ok
    assert "rpool/broken" in str(report.error)
    assert world.loaded_keys()["rpool/crypt"] is True


def test_no_matching_encryption_root(world, make_config, run):
    world.datasets["rpool/crypt"].keylocation = "prompt"
    world.answers = ["luks pass"]
    report = run(make_config())
    assert "no encryption root of rpool has its keylocation under" in str(report.error)


def test_listed_child_dataset_names_its_root(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config(datasets=["rpool/crypt/local/root"]))
    assert "rpool/crypt/local/root is not an encryption root" in str(report.error)
    assert "list rpool/crypt instead" in str(report.error)


def test_listed_unencrypted_dataset(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config(datasets=["rpool/volumes"]))
    assert "rpool/volumes is not encrypted" in str(report.error)


def test_listed_missing_dataset(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config(datasets=["rpool/nope"]))
    assert isinstance(report.error, KeyLoadError)
    assert "rpool/nope does not exist" in str(report.error)
    assert_clean(world)


# --- teardown on failure and on SIGTERM at every step ---------------------------------


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


# --- dry run ---------------------------------------------------------------------------


def snapshot(world):
    return (
        {n: d.loaded for n, d in world.datasets.items()},
        world.imported,
        dict(world.mappings),
        dict(world.mounts),
        dict(world.masked),
    )


def test_dry_run_changes_nothing(world, make_config, run):
    world.answers = ["luks pass"]
    before = snapshot(world)
    report = run(make_config(dry_run=True))
    assert report.ok, report.error
    assert snapshot(world) == before
    assert "import rpool readonly" in world.events
    assert "export rpool" in world.events
    assert "activate lczfs-keystore ro" in world.events
    assert report.summary.startswith(
        "dry run: would unlock rpool/crypt (hex) using the keystore (passphrase)"
    )
    assert report.summary.endswith("nothing changed")


def test_dry_run_keeps_an_imported_pool_imported(world, make_config, run):
    world.imported, world.imported_at = True, -10.0
    world.answers = ["luks pass"]
    report = run(make_config(dry_run=True))
    assert report.ok
    assert world.imported
    assert "export rpool" not in world.events


def test_dry_run_reports_what_would_fail(world, make_config, run):
    world.keystore_files["rpoolcrypt.key"] = ("ab" * 32).encode()
    world.answers = ["luks pass"]
    before = snapshot(world)
    report = run(make_config(dry_run=True))
    assert not report.ok
    assert report.summary.startswith(
        "dry run: a real run would fail: zfs rejected the key for rpool/crypt"
    )
    assert snapshot(world) == before


@pytest.mark.parametrize("step", ["import", "activate", "mount", "load_key"])
def test_dry_run_failure_at_any_step_changes_nothing(world, make_config, run, step):
    world.answers = ["luks pass"]
    before = snapshot(world)

    def fail(_w):
        raise UnlockError("injected")

    world.hooks[step] = fail
    report = run(make_config(dry_run=True))
    assert not report.ok
    assert snapshot(world) == before


# --- secrets -------------------------------------------------------------------------


def test_no_secret_reaches_logs_or_notifications(world, make_config, run, caplog):
    world.add_encryption_root("rpool/pass", "passphrase", (PASSPHRASE_KEY + "\n").encode())
    world.answers = ["wrong secret", "luks pass"]
    report = run(make_config())
    assert report.ok
    text = caplog.text + "\n".join(world.notifications) + report.summary
    for secret in ("luks pass", "wrong secret", HEX_KEY, PASSPHRASE_KEY, HEX_KEY.upper()):
        assert secret not in text


def test_key_buffers_are_wiped(world, make_config):
    world.answers = ["luks pass"]
    ports = fake_ports(world)
    handed_out: list[bytearray] = []
    real_ask, real_read = ports.askpass.ask, ports.keys.read_key_file

    def ask(*a, **kw):
        buf = real_ask(*a, **kw)
        handed_out.append(buf)
        return buf

    def read(*a, **kw):
        buf = real_read(*a, **kw)
        handed_out.append(buf)
        return buf

    ports.askpass.ask = ask
    ports.keys.read_key_file = read
    assert sequence.run(make_config(), ports).ok
    assert len(handed_out) == 2
    assert all(not any(buf) for buf in handed_out)
    assert ports.keys.seen  # the fake saw the real key while it was live


def test_unknown_dataset_kind_in_world_is_not_touched(world, make_config, run):
    world.datasets["rpool/plain"] = Dataset(name="rpool/plain")
    world.answers = ["luks pass"]
    assert run(make_config()).ok


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


def test_token_without_plugin_falls_back_at_once(world, make_config, run):
    world.tokens = [Token(plugin=False)]
    world.answers = ["luks pass"]
    report = run(make_config({"token_timeout": "30s"}))
    assert report.ok and report.keystore_method == "passphrase"
    assert world.time < 1.0  # no 30 s wait for a token that can never work


def test_token_without_plugin_is_named_in_the_failure(world, make_config, run, caplog):
    world.tokens = [Token(plugin=False, type="systemd-fido2")]
    report = run(make_config({"unlock": ["token"]}))
    assert not report.ok
    assert (
        "token: token 0 (systemd-fido2): no plugin /plugins/libcryptsetup-token-systemd-fido2.so"
    ) in str(report.error)
    assert "put that token plugin into the initrd" in str(report.error)


def test_token_without_plugin_beside_a_usable_one_is_warned_about(world, make_config, run, caplog):
    world.tokens = [Token(plugin=False, type="systemd-fido2"), Token()]
    report = run(make_config({"unlock": ["token"]}))
    assert report.ok and report.keystore_method == "token"
    assert "token 0 (systemd-fido2) of" in caplog.text
    assert "cannot be used: no plugin" in caplog.text


def test_failing_token_falls_back_to_passphrase(world, make_config, run, caplog):
    world.tokens = [Token(failure="TPM2 unseal failed: PCR policy mismatch")]
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert "token did not open" in caplog.text and "PCR policy mismatch" in caplog.text


def test_pin_refused_ambiguously_is_asked_again(world, make_config, run, caplog):
    world.tokens = [Token(pin="1234", refusal="ambiguous")]
    world.answers = ["0000", "1234"]
    report = run(make_config({"unlock": ["token"]}))
    assert report.ok and report.keystore_method == "token"
    assert "refused this PIN or failed (try 1 of 3)" in caplog.text


def test_token_failing_whatever_the_pin_is_not_asked_forever(world, make_config, run):
    # tries = 0 means "until right", but a TPM that fails whatever the PIN
    # (PCRs changed, TPM cleared) must not keep the passphrase from being asked.
    world.tokens = [Token(pin="1234", broken=True)]
    world.answers = ["1234", "1234", "1234", "luks pass"]
    report = run(make_config({"tries": 0}))
    assert report.ok, report.error
    assert report.keystore_method == "passphrase"
    assert len(world.prompts) == 4  # three PINs, then the passphrase


def test_token_key_no_slot_accepts_is_not_blamed_on_the_pin(world, make_config, run):
    world.tokens = [Token(pin="1234", wrong_key=True)]
    world.answers = ["1234", "luks pass"]
    report = run(make_config({"tries": 0}))
    assert report.ok and report.keystore_method == "passphrase"
    assert len(world.prompts) == 2  # one PIN, then the passphrase


def test_pin_is_not_shared_through_the_keyring(world, make_config, run):
    world.tokens = [Token(pin="1234")]
    world.answers = ["1234"]
    assert run(make_config()).ok
    assert world.keynames == [None]


def test_passphrase_is_shared_with_systemd_cryptsetup(world, make_config, run):
    world.answers = ["x", "luks pass"]
    assert run(make_config()).ok
    assert world.keynames == ["cryptsetup", "cryptsetup"]


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


def test_dry_run_leaves_an_open_mapping_open_and_no_new_directory(
    world, make_config, run, mountpoint
):
    world.imported, world.imported_at = True, -10.0
    world.mappings["lczfs-keystore"] = True
    report = run(make_config(dry_run=True))
    assert report.ok, report.error
    assert world.mappings == {"lczfs-keystore": True}  # as found
    assert world.imported
    assert not os.path.exists(mountpoint)  # created for the check, removed again


def test_dry_run_keeps_an_existing_mount_point_mode(world, make_config, run, mountpoint):
    os.makedirs(mountpoint, mode=0o755)
    os.chmod(mountpoint, 0o755)
    world.answers = ["luks pass"]
    assert run(make_config(dry_run=True)).ok
    assert os.stat(mountpoint).st_mode & 0o777 == 0o755


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
