"""Step 2, the keystore (lczfs_unlockd/keystore.py): its zvol, token, PIN, key file, passphrase."""

from __future__ import annotations

import errno
import os

from tests.fakes import Token
from tests.unit.conftest import assert_clean


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


def test_existing_mapping_is_used_and_closed(world, make_config, run, caplog):
    world.mappings["lczfs-keystore"] = True
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "already open"
    assert world.prompts == []
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
