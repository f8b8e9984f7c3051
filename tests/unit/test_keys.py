"""Step 4, the keys (lczfs_unlockd/keys.py): targets, every key format, already loaded keys."""

from __future__ import annotations

import errno

import pytest

from lczfs_unlockd.errors import KeyLoadError, PoolError
from tests.fakes import HEX_KEY, PASSPHRASE_KEY, RAW_KEY, Dataset
from tests.unit.conftest import assert_clean


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


def test_unknown_dataset_kind_in_world_is_not_touched(world, make_config, run):
    world.datasets["rpool/plain"] = Dataset(name="rpool/plain")
    world.answers = ["luks pass"]
    assert run(make_config()).ok


def test_a_failing_zfs_get_is_a_key_loading_failure(world, make_config, run):
    """zfs get failing (not a missing dataset): KeyLoadError and EACCES, as before
    the step split; a timeout keeps ETIMEDOUT."""
    world.answers = ["luks pass", "luks pass"]

    def broken(w):
        if w.zpool_calls[-1][1] == ("rpool",):  # the targets' lookup, not the keystore's
            raise PoolError('"zfs get ..." returned non-zero exit code 1: internal error')

    world.hooks["datasets"] = broken
    report = run(make_config())
    assert isinstance(report.error, KeyLoadError) and report.errno == errno.EACCES
    assert "internal error" in str(report.error)
