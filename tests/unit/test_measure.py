"""The measurement (lczfs_unlockd/measure.py): PCR 15 moves once the keystore's volume key is known.

The expected PCR values are computed here with hashlib/hmac from the
measured fields (volume key, mapping name, LUKS UUID), independently of
the daemon's code, and against a fixed known answer.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from lczfs_unlockd import measure
from tests.fakes import Token
from tests.unit.conftest import assert_clean

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def expected_pcr(bank: str, volume_key: bytes, name: str, uuid: str, start: bytes | None = None):
    """TPM2_PCR_Extend of HMAC-<bank>(volume key, "cryptsetup:<name>:<uuid>"), from zero."""
    size = hashlib.new(bank).digest_size
    digest = hmac.new(volume_key, f"cryptsetup:{name}:{uuid}".encode(), bank).digest()
    return hashlib.new(bank, (start or bytes(size)) + digest).digest()


def test_known_answer():
    # Computed once with openssl, not Python: printf 'cryptsetup:lczfs-keystore:<UUID>' |
    # openssl dgst -sha256 -mac HMAC -macopt hexkey:000102...3f
    key = bytearray(range(64))
    got = measure.digests(["sha256"], measure.event_string("lczfs-keystore", UUID).encode(), key)
    assert got["sha256"].hex() == (
        hmac.new(bytes(range(64)), f"cryptsetup:lczfs-keystore:{UUID}".encode(), "sha256")
        .digest()
        .hex()
    )
    assert got["sha256"].hex() == KNOWN_HMAC_SHA256


KNOWN_HMAC_SHA256 = "adaac53adb5313b21fc91a823c106336898e1afadacaf331a91d1e2ab6dadb55"


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("lczfs-keystore", "lczfs-keystore"),
        ("a:b", "a\\x3ab"),
        ("back\\slash", "back\\x5cslash"),
        ("tab\there", "tab\\x09here"),
        ("ümlaut", "\\xc3\\xbcmlaut"),
    ],
)
def test_name_is_escaped_like_systemds_xescape(name, escaped):
    assert measure.event_string(name, UUID) == f"cryptsetup:{escaped}:{UUID}"


def test_token_unlock_is_measured_into_pcr_15_in_every_bank(world, make_config, run, caplog):
    world.tokens = [Token()]
    world.tpm_present = True
    world.tpm_banks = ["sha1", "sha256"]
    report = run(make_config())
    assert report.ok, report.error
    assert report.measured == "PCR 15 (sha1, sha256)"
    for bank in ("sha1", "sha256"):
        assert world.pcrs[bank][15] == expected_pcr(
            bank, world.volume_key, "lczfs-keystore", world.luks_uuid
        )
    ((pcr, _, event, description),) = world.tpm_log
    assert (pcr, event) == (15, "volume-key")
    assert description == f"cryptsetup:lczfs-keystore:{world.luks_uuid}"
    # Measured before the mapping existed: nothing later in the boot, not
    # even a failure after activation, finds the PCR unmoved.
    assert world.events.index("extend PCR 15") < world.events.index("activate lczfs-keystore ro")
    assert f'extended PCR 15 (sha1, sha256) with "{description}"' in caplog.text
    assert "measured into PCR 15 (sha1, sha256)" in report.summary
    assert world.volume_key.hex() not in caplog.text
    assert_clean(world)


@pytest.mark.parametrize("method", ["passphrase", "keyfile"])
def test_every_method_is_measured_when_a_tpm2_token_is_enrolled(world, make_config, run, method):
    # The token fails (a firmware update changed PCR 7): the passphrase or
    # key file that opens instead is measured just the same.
    world.tokens = [Token(failure="TPM2 unseal failed")]
    world.tpm_present = True
    ks: dict[str, object] = {}
    if method == "keyfile":
        world.luks_keyfiles["/etc/k"] = b"k" * 32
        world.luks_key_slots_for_files.add(b"k" * 32)
        ks = {"keyfile": "/etc/k"}
    else:
        world.answers = ["luks pass"]
    report = run(make_config(ks))
    assert report.ok, report.error
    assert report.keystore_method == ("key file" if method == "keyfile" else "passphrase")
    assert world.pcrs["sha256"][15] == expected_pcr(
        "sha256", world.volume_key, "lczfs-keystore", world.luks_uuid
    )


def test_configured_pcr_is_used_without_any_token(world, make_config, run):
    world.tpm_present = True
    world.answers = ["luks pass"]
    report = run(make_config({"measure_pcr": 9, "name": "ks:1"}))
    assert report.ok, report.error
    assert world.pcrs["sha256"] == {
        9: expected_pcr("sha256", world.volume_key, "ks\\x3a1", world.luks_uuid)
    }


def test_auto_measures_a_passphrase_unlock_even_without_a_tpm2_token(world, make_config, run):
    # The header is the attacker's: one who deleted the TPM2 token (keeping a
    # copy) must not get an unmeasured unlock that leaves PCR 15 at zero.
    world.tpm_present = True
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.measured == "PCR 15 (sha256)"


def test_without_a_token_a_broken_tpm_only_warns(world, make_config, run, caplog):
    world.tpm_present = True
    world.tpm_failure = "cannot extend PCR 15 on /dev/tpmrm0: TPM_RC_FAILURE"
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.error
    assert "cannot measure the unlock (no TPM2 token is enrolled)" in caplog.text


def test_a_tpm_that_shows_up_late_is_still_measured(world, make_config, run):
    world.tokens = [Token(available_after=1.0)]

    def tpm_arrives(w):
        w.tpm_present = w.time >= 1.0

    world.hooks["token"] = tpm_arrives
    report = run(make_config({"token_timeout": "5s"}))
    assert report.ok, report.error
    assert report.keystore_method == "token" and 15 in world.pcrs["sha256"]


def test_a_failed_unlock_with_a_tpm2_token_caps_the_pcr(world, make_config, run, caplog):
    # The token's secret may have left the TPM without a key to measure
    # (a key no slot takes): nothing later in the boot may unseal it again.
    world.tokens = [Token(wrong_key=True, pin="1")]
    world.answers = ["1", "wrong", "wrong", "wrong"]
    world.tpm_present = True
    report = run(make_config())
    assert not report.ok
    ((pcr, digests, event, marker),) = world.tpm_log
    assert (pcr, event) == (15, "phase")
    assert marker == f"lczfs-unlockd:unlock-failed:lczfs-keystore:{world.luks_uuid}"
    assert digests == {"sha256": hashlib.sha256(marker.encode()).digest()}
    assert "no TPM2 token can be unsealed again in this boot" in caplog.text
    assert_clean(world)


@pytest.mark.parametrize("failure", ["pool missing", "header broken", "token deleted"])
def test_any_failed_run_with_a_tpm_caps_the_pcr(world, make_config, run, failure):
    # The attacker makes the run fail before any unlock, keeping a copy of
    # the header with its token: PCR 15 must still move (review finding).
    world.tpm_present = True
    if failure == "pool missing":
        world.disks = {d: False for d in world.disks}
    elif failure == "header broken":
        world.luks_valid = False
    else:
        world.answers = ["wrong", "wrong", "wrong"]
    report = run(make_config({"unlock": ["passphrase"]}, timeout="1s", online_grace="0"))
    assert not report.ok
    assert [event for _, _, event, _ in world.tpm_log] == ["phase"]
    assert 15 in world.pcrs["sha256"]


def test_a_successful_run_is_not_capped(world, make_config, run):
    world.tpm_present = True
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok
    assert [event for _, _, event, _ in world.tpm_log] == ["volume-key"]


def test_a_dry_run_does_not_measure_a_passphrase(world, make_config, run):
    # Run in stage 2 to check the configuration, it must not move a PCR
    # that stage-2 secrets are bound to.
    world.tokens = [Token(failure="policy mismatch")]
    world.tpm_present = True
    world.answers = ["luks pass"]
    report = run(make_config(dry_run=True))
    assert report.ok, report.error
    assert world.pcrs == {} and world.tpm_log == []


def test_auto_measures_nothing_without_a_tpm(world, make_config, run, caplog):
    world.tokens = [Token(failure="no TPM2 device")]
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.measured == ""
    assert "not measuring the unlock: no TPM2" in caplog.text


def test_measure_pcr_false_turns_it_off(world, make_config, run):
    world.tokens = [Token()]
    world.tpm_present = True
    report = run(make_config({"measure_pcr": False}))
    assert report.ok and report.measured == ""
    assert world.pcrs == {}


def test_a_failed_measurement_fails_closed(world, make_config, run):
    # A token the PCR no longer guards would be a key for anyone later in
    # the boot: no unmeasured unlock, no passphrase fallback.
    world.tokens = [Token()]
    world.tpm_present = True
    world.tpm_failure = "cannot extend PCR 15 on /dev/tpmrm0: TPM_RC_LOCALITY"
    world.answers = ["luks pass"]
    report = run(make_config())
    assert not report.ok
    assert "TPM_RC_LOCALITY" in str(report.error)
    assert world.prompts == []
    assert world.loaded_keys() == {"rpool/crypt": False}
    assert_clean(world)


def test_required_pcr_without_a_tpm_fails_naming_the_key(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config({"measure_pcr": 15}))
    assert not report.ok
    assert "/dev/tpmrm0" in str(report.error)
    assert_clean(world)


def test_a_failure_after_the_unlock_still_leaves_the_pcr_moved(world, make_config, run):
    world.tokens = [Token()]
    world.tpm_present = True
    world.datasets["rpool/crypt"].wrapping_key = b"\0" * 32  # the key file no longer fits
    report = run(make_config())
    assert not report.ok
    assert 15 in world.pcrs["sha256"]
    assert_clean(world)


def test_measured_once_when_a_second_method_opens(world, make_config, run):
    world.tokens = [Token()]
    world.tpm_present = True
    calls = {"n": 0}

    def refuse_first_activation(w):
        calls["n"] += 1
        if calls["n"] == 1:
            from lczfs_unlockd.errors import KeystoreError

            raise KeystoreError("cannot activate: device-mapper said no")

    world.hooks["activate"] = refuse_first_activation
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "passphrase"
    assert len(world.tpm_log) == 1


def test_dry_run_measures_too(world, make_config, run):
    # The TPM released the key: the PCR must move, dry run or not.
    world.tokens = [Token()]
    world.tpm_present = True
    report = run(make_config(dry_run=True))
    assert report.ok, report.error
    assert 15 in world.pcrs["sha256"]


def test_signature_and_pcrlock_reach_the_tpm2_plugin(world, make_config, run):
    world.tokens = [Token(type="systemd-fido2"), Token()]
    world.tpm_present = True
    report = run(
        make_config({"tpm2_signature": "/etc/sig.json", "tpm2_pcrlock": "/etc/pcrlock.json"})
    )
    assert report.ok, report.error
    (policy,) = world.token_policies
    assert policy is not None
    assert (policy.signature, policy.pcrlock) == ("/etc/sig.json", "/etc/pcrlock.json")


def test_no_policy_means_the_plugins_defaults(world, make_config, run):
    world.tokens = [Token()]
    report = run(make_config())
    assert report.ok
    assert world.token_policies == [None]
