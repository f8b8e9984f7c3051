"""Step 5, the root check (lczfs_unlockd/rootcheck.py): an evil maid's root is refused."""

from __future__ import annotations

import dataclasses

import pytest

from lczfs_unlockd import config as configmod
from lczfs_unlockd import paths
from lczfs_unlockd.errors import RootRefusedError
from tests.fakes import Dataset, Token
from tests.unit.conftest import assert_clean

ROOT = "rpool/crypt/local/root"


def with_cmdline(cfg, cmdline):
    new, warnings = configmod.apply_cmdline(cfg, cmdline)
    assert warnings == []
    return new


def test_root_from_the_kernel_command_line_is_checked(world, make_config, run, caplog):
    world.answers = ["luks pass"]
    report = run(with_cmdline(make_config(), f"root=zfs:{ROOT} quiet"))
    assert report.ok, report.error
    assert report.checked == [ROOT]
    assert f"root dataset {ROOT} is encrypted under rpool/crypt: ok" in caplog.text


def test_evil_maid_unencrypted_root_is_refused_and_the_keys_unloaded(world, make_config, run):
    # Whoever holds the disk renamed the real encryption root away and put
    # an unencrypted dataset where root= points; the real key still loads.
    world.tokens = [Token()]
    world.tpm_present = True
    world.datasets[ROOT] = Dataset(name=ROOT)
    report = run(with_cmdline(make_config({"unlock": ["token"]}), f"root=zfs:{ROOT}"))
    assert not report.ok
    assert isinstance(report.error, RootRefusedError)
    message = str(report.error)
    assert message.startswith(f"refusing root dataset {ROOT}: it is not encrypted")
    assert "expected a dataset encrypted under rpool/crypt" in message
    # Fail closed: the PCR moved, the key the run loaded is gone again, the
    # flag that makes sysroot.mount's assertion fail is there.
    assert 15 in world.pcrs["sha256"]
    assert world.loaded_keys() == {"rpool/crypt": False}
    assert world.events.index("load-key rpool/crypt") < world.events.index("unload-key rpool/crypt")
    assert paths.ROOT_REFUSED_FLAG in world.files
    assert world.imported  # not exported: the distribution would only import it again
    assert report.summary.startswith(f"failed: refusing root dataset {ROOT}")
    assert_clean(world)


def test_evil_maid_foreign_encryption_root_is_refused(world, make_config, run):
    # The attacker's own encryption root, renamed to where root= points.
    world.answers = ["luks pass"]
    world.datasets[ROOT] = Dataset(
        name=ROOT, keyformat="passphrase", keylocation="prompt", encryption_root=ROOT
    )
    report = run(with_cmdline(make_config(), f"root=ZFS={ROOT}"))
    assert not report.ok
    assert f"refusing root dataset {ROOT}: its encryption root is {ROOT}, expected rpool/crypt" in (
        str(report.error)
    )
    assert world.loaded_keys()["rpool/crypt"] is False


def test_missing_root_is_refused(world, make_config, run):
    world.answers = ["luks pass"]
    del world.datasets[ROOT]
    report = run(make_config(root_dataset=ROOT))
    assert not report.ok
    assert f"refusing root dataset {ROOT}: there is no such dataset in pool rpool" in str(
        report.error
    )


def test_root_under_a_key_someone_else_must_load_is_refused(world, make_config, run):
    world.answers = ["luks pass"]
    world.add_encryption_root("rpool/other", "hex", b"ab" * 32, keylocation="prompt")
    world.add_child("rpool/other/root", "rpool/other")
    report = run(make_config(root_dataset="rpool/other/root"))
    assert not report.ok
    assert "its encryption root is rpool/other, expected rpool/crypt" in str(report.error)


def test_trusted_roots_replace_the_unlocked_ones(world, make_config, run):
    world.answers = ["luks pass"]
    world.add_encryption_root("rpool/other", "hex", b"ab" * 32, keylocation="prompt")
    world.datasets["rpool/other"].loaded = True  # loaded by someone, trusted by config
    world.add_child("rpool/other/root", "rpool/other")
    cfg = make_config(root_dataset="rpool/other/root", trusted_roots=["rpool/other"])
    report = run(cfg)
    assert report.ok, report.error
    # ... and then a root under the unlocked rpool/crypt is not trusted.
    world.datasets["rpool/crypt"].loaded = False
    world.answers = ["luks pass"]
    report = run(dataclasses.replace(cfg, root_dataset=ROOT))
    assert "its encryption root is rpool/crypt, expected rpool/other" in str(report.error)


def test_verify_datasets_are_checked_and_named(world, make_config, run):
    world.answers = ["luks pass"]
    world.datasets["rpool/safe"] = Dataset(name="rpool/safe")
    report = run(make_config(verify_datasets=["rpool/crypt/safe/persist", "rpool/safe"]))
    assert not report.ok
    assert str(report.error).startswith("refusing verify_datasets entry rpool/safe: ")
    assert "rpool/crypt/safe/persist" not in str(report.error)


def test_every_problem_is_named(world, make_config, run):
    world.answers = ["luks pass"]
    world.datasets[ROOT] = Dataset(name=ROOT)
    report = run(make_config(root_dataset=ROOT, verify_datasets=["rpool/nope"]))
    assert f"refusing root dataset {ROOT}" in str(report.error)
    assert "refusing verify_datasets entry rpool/nope: there is no such dataset" in str(
        report.error
    )


def test_bootfs_is_the_root_of_zfs_auto(world, make_config, run):
    world.answers = ["luks pass"]
    world.bootfs = ROOT
    world.datasets[ROOT] = Dataset(name=ROOT)
    report = run(with_cmdline(make_config(), "root=zfs:AUTO"))
    assert f"refusing root dataset {ROOT}: it is not encrypted" in str(report.error)


def test_zfs_auto_without_bootfs_is_refused(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(with_cmdline(make_config(), "root=zfs:AUTO"))
    assert "has no bootfs property" in str(report.error)
    assert world.loaded_keys() == {"rpool/crypt": False}


def test_both_root_dataset_and_kernel_root_are_checked(world, make_config, run):
    world.answers = ["luks pass"]
    world.datasets["rpool/fake"] = Dataset(name="rpool/fake")
    report = run(with_cmdline(make_config(root_dataset=ROOT), "root=zfs:rpool/fake"))
    assert "refusing root dataset rpool/fake" in str(report.error)


def test_a_root_in_another_pool_is_not_ours_to_check(world, make_config, run, caplog):
    world.answers = ["luks pass"]
    report = run(with_cmdline(make_config(), "root=zfs:tank/root"))
    assert report.ok, report.error
    assert "root=zfs:tank/root is not in pool rpool" in caplog.text


def test_non_zfs_root_and_no_config_checks_nothing(world, make_config, run, caplog):
    world.tokens = [Token()]
    report = run(with_cmdline(make_config(), "root=/dev/sda2"))
    assert report.ok and report.checked == []
    assert "nothing to check" in world.files[paths.ROOT_CHECKED_FLAG]


def test_the_root_is_let_through_only_once_checked(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config(root_dataset=ROOT))
    assert report.ok
    assert world.files[paths.ROOT_CHECKED_FLAG] == f"checked: {ROOT}\n"


@pytest.mark.parametrize("failure", ["no keystore", "sigterm"])
def test_any_failure_leaves_sysroot_mount_blocked(world, make_config, run, failure):
    # Not only a refusal: a keystore an attacker broke, a kill at the start
    # timeout — no flag, so sysroot.mount's assertion fails.
    world.files[paths.ROOT_CHECKED_FLAG] = "from an earlier run\n"
    world.answers = ["luks pass"]
    if failure == "no keystore":
        world.luks_present = False
    else:
        import os
        import signal

        world.hooks["passphrase"] = lambda w: os.kill(os.getpid(), signal.SIGTERM)
    report = run(with_cmdline(make_config(), f"root=zfs:{ROOT}"))
    assert not report.ok
    assert paths.ROOT_CHECKED_FLAG not in world.files


def test_a_failing_extra_dataset_cannot_skip_the_check(world, make_config, run):
    # The attacker adds an encryption root whose keylocation points at the
    # real key file: its key fails after the real one loaded.
    world.answers = ["luks pass"]
    world.add_encryption_root("rpool/zzbogus", "hex", b"ff" * 32, file="rpoolcrypt.key")
    world.keystore_files["rpoolcrypt.key"] = (
        "0123456789abcdef" * 4 + "\n"
    ).encode()  # the real key, which is not the bogus root's
    world.datasets[ROOT] = Dataset(name=ROOT)
    report = run(with_cmdline(make_config(), f"root=zfs:{ROOT}"))
    assert isinstance(report.error, RootRefusedError), report.error
    assert world.loaded_keys()["rpool/crypt"] is False
    assert paths.ROOT_REFUSED_FLAG in world.files


def test_key_failures_are_still_reported_after_a_passing_check(world, make_config, run):
    world.answers = ["luks pass"]
    world.add_encryption_root("rpool/zzbogus", "hex", b"ff" * 32, file="rpoolcrypt.key")
    world.keystore_files["rpoolcrypt.key"] = ("0123456789abcdef" * 4 + "\n").encode()
    report = run(with_cmdline(make_config(), f"root=zfs:{ROOT}"))
    assert not report.ok and "rpool/zzbogus" in str(report.error)
    assert report.checked == [ROOT]
    assert world.loaded_keys()["rpool/crypt"] is True  # the root is ours: it boots
    assert paths.ROOT_CHECKED_FLAG in world.files


def test_a_forged_property_line_fails_the_check():
    from lczfs_unlockd.errors import PoolError
    from lczfs_unlockd.zpool import parse_properties

    forged = f"{ROOT}\tencryption\toff\n{ROOT}\tencryption\taes-256-gcm\n"
    with pytest.raises(PoolError, match="printed encryption of .* twice"):
        parse_properties(forged, [ROOT], recursive=False)
    with pytest.raises(PoolError, match="not asked for"):
        parse_properties("rpool/other\tencryption\toff\n", [ROOT], recursive=False)


def test_dry_run_refuses_without_changing_anything(world, make_config, run):
    world.answers = ["luks pass"]
    world.datasets[ROOT] = Dataset(name=ROOT)
    report = run(make_config(root_dataset=ROOT, dry_run=True))
    assert not report.ok
    assert report.summary.startswith("dry run: a real run would fail: refusing root dataset")
    assert world.files == {}
    assert not world.imported


def test_dry_run_accepts_a_root_whose_key_it_verified(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config(root_dataset=ROOT, dry_run=True))
    assert report.ok, report.error
    assert report.checked == [ROOT]


def test_a_key_that_will_not_unload_is_reported(world, make_config, run):
    world.answers = ["luks pass"]
    world.datasets[ROOT] = Dataset(name=ROOT)

    def busy(w):
        from lczfs_unlockd.errors import KeyLoadError

        raise KeyLoadError("cannot unload the key of rpool/crypt: something of it is mounted")

    world.hooks["unload_key"] = busy
    report = run(make_config(root_dataset=ROOT))
    assert "zfs unload-key rpool/crypt by hand" in report.summary


def test_a_sigterm_after_the_key_loaded_unloads_it(world, make_config, run):
    # A later dataset's KDF (its cost from the disk) runs into systemd's
    # start timeout: the real key must not stay loaded for the emergency
    # shell (second review).
    import os
    import signal

    world.answers = ["luks pass"]
    world.add_encryption_root("rpool/zz", "hex", b"ab" * 32)
    calls = {"n": 0}

    def term_on_second(w):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    world.hooks["load_key"] = term_on_second
    report = run(with_cmdline(make_config(), f"root=zfs:{ROOT}"))
    assert not report.ok
    assert world.loaded_keys() == {"rpool/crypt": False, "rpool/zz": False}
    assert paths.ROOT_CHECKED_FLAG not in world.files


def test_a_flag_that_cannot_be_written_is_reported(world, make_config, run):
    world.answers = ["luks pass"]
    world.datasets[ROOT] = Dataset(name=ROOT)

    def fail(w):
        raise OSError(30, "Read-only file system")

    world.hooks["write_flag"] = fail
    report = run(make_config(root_dataset=ROOT))
    assert "sysroot.mount is not blocked" in str(report.error)


@pytest.mark.parametrize(
    ("cmdline", "root"),
    [
        ("root=zfs:rpool/a", "rpool/a"),
        ("root=ZFS=rpool/a", "rpool/a"),
        ("root=zfs:AUTO", configmod.BOOTFS),
        ("root=zfs", configmod.BOOTFS),
        ("root=rpool/a rootfstype=zfs", "rpool/a"),
        ("root=/dev/sda1", None),
        ("root=UUID=1234 rootfstype=zfs", None),
        ("root=zfs:rpool/a root=/dev/sda1", None),  # the last one counts
        ("quiet", None),
        ("rootfstype=zfs", configmod.BOOTFS),  # dracut: AUTO
    ],
)
def test_kernel_root_forms(make_config, cmdline, root):
    assert configmod.apply_cmdline(make_config(), cmdline)[0].kernel_root == root


def test_a_line_with_a_tab_or_newline_in_a_value_fails():
    # A name or value holding a newline truncates into a short line.
    from lczfs_unlockd.errors import PoolError
    from lczfs_unlockd.zpool import parse_properties

    with pytest.raises(PoolError, match="not name, property and value"):
        parse_properties(f"{ROOT}\tencryptionroot\trpool/crypt\njunk\n", [ROOT], recursive=False)
