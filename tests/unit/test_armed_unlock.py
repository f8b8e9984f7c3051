"""The daemon's side of arm-reboot (lczfs_unlockd/keystore.py): the one-time TPM2 unlock."""

from __future__ import annotations

import json

import pytest

from lczfs_unlockd import keystore
from tests.fakes import Token

DAY = 24 * 3600


def arm(world, *, slot=1, marker=None, tpm2=None, failure=None, armed_ago=3600, lifetime=DAY):
    """As arm-reboot leaves the header: token 0 = T (systemd-tpm2 of ``slot``),
    token 1 = the marker M."""
    now = int(world.wall_time)
    world.keyslots |= {slot}
    t = Token(
        failure=failure,
        json=json.dumps(tpm2 or {"type": "systemd-tpm2", "keyslots": [str(slot)]}),
    )
    fields = marker or keystore.marker_json(slot, 0, now - armed_ago, now - armed_ago + lifetime)
    m = Token(type=keystore.MARKER_TYPE, plugin=False, json=json.dumps(fields))
    world.tokens += [t, m]


def test_armed_unlock_is_used_once_and_destroyed(world, make_config, run, caplog):
    world.tpm_present = True
    arm(world)
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "one-time TPM2 unlock (arm-reboot)"
    assert world.prompts == []
    assert world.keyslots == {0}
    assert all(t.removed for t in world.tokens)
    assert "keystore opened with one-time TPM2 unlock (arm-reboot)" in caplog.text
    assert "destroyed the one-time unlock (key slot 1, tokens 0 and 1)" in caplog.text
    # measured like any token, before the activation; destroyed after it
    events = world.events
    assert events.index("extend PCR 15") < events.index("destroy slot 1")
    assert events.index("try token 0") < events.index("destroy slot 1")
    # the next boot asks again
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"


def test_used_even_when_token_is_not_configured(world, make_config, run):
    arm(world)
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.ok and report.keystore_method == "one-time TPM2 unlock (arm-reboot)"
    assert world.prompts == []


def test_expired_is_not_tried_but_destroyed(world, make_config, run, caplog):
    arm(world, armed_ago=2 * DAY)
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.ok and report.keystore_method == "passphrase"
    assert "try token 0" not in world.events
    assert "expired at" in caplog.text
    assert world.keyslots == {0}
    assert "destroyed the one-time unlock (key slot 1, tokens 0 and 1)" in caplog.text


def test_clock_before_arming_is_not_trusted(world, make_config, run, caplog):
    arm(world, armed_ago=-DAY)  # armed "tomorrow": the clock was set back
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.keystore_method == "passphrase"
    assert "try token 0" not in world.events
    assert "not trusting it" in caplog.text
    assert world.keyslots == {0}


def test_failed_unseal_is_destroyed_and_passphrase_asked(world, make_config, run, caplog):
    arm(world, failure="TPM2 unseal failed: policy check failed (PCR 7 changed)")
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert world.events.count("try token 0") == 1  # tried once, never again by "token"
    assert "did not open" in caplog.text and "PCR 7 changed" in caplog.text
    assert world.keyslots == {0} and all(t.removed for t in world.tokens)
    assert "destroyed the one-time unlock" in caplog.text


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"keyslots": [1]}, "key slot is not a number"),
        ({"keyslots": ["1", "0"]}, "not a list of one"),
        ({"lczfs_tpm2_token": 0}, "lczfs_tpm2_token is not a number"),
        ({"lczfs_tpm2_token": "1"}, "names the marker itself"),
        ({"expires": "2000000000"}, "expires is not a time"),
        ({"armed_at": True}, "armed_at is not a time"),
        ({"expires": 1_800_000_000 + 30 * DAY}, "at most 7 days"),
        ({"extra": "x"}, "fields are not exactly"),
        ({"keyslots": ["0"]}, "does not belong to key slot 0"),  # the passphrase's slot
        ({"lczfs_tpm2_token": "5"}, "token 5 is not a systemd-tpm2 token"),
    ],
)
def test_hostile_marker_is_ignored(world, make_config, run, caplog, fields, why):
    now = int(world.wall_time)
    marker = {**keystore.marker_json(1, 0, now - 60, now + DAY), **fields}
    arm(world, marker=marker)
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.ok and report.keystore_method == "passphrase"
    assert "ignoring the lczfs-armed marker in token 1" in caplog.text
    assert why in caplog.text
    assert not any(e.startswith(("destroy", "remove", "try token")) for e in world.events)
    assert world.keyslots == {0, 1}


def test_marker_naming_a_fido2_token_is_ignored(world, make_config, run, caplog):
    arm(world, tpm2={"type": "systemd-fido2", "keyslots": ["1"]})
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.keystore_method == "passphrase"
    assert "token 0 is not a systemd-tpm2 token" in caplog.text
    assert world.keyslots == {0, 1}


def test_unreadable_marker_json_is_ignored(world, make_config, run, caplog):
    arm(world)
    world.tokens[1].json = '{"type": "lczfs-armed", "keyslots": ['
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.keystore_method == "passphrase"
    assert "its JSON is unreadable or too long" in caplog.text
    assert world.keyslots == {0, 1}


def test_dry_run_ignores_the_marker(world, make_config, run, caplog):
    arm(world)
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}, dry_run=True))
    assert report.ok and report.keystore_method == "passphrase"
    assert "neither used nor destroyed" in caplog.text
    assert not any(e.startswith(("destroy", "remove", "try token")) for e in world.events)
    assert world.keyslots == {0, 1}


def test_failing_destruction_is_logged_and_the_boot_goes_on(world, make_config, run, caplog):
    arm(world)
    world.destroy_failure = "cannot destroy key slot 1: read-only file system"
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "one-time TPM2 unlock (arm-reboot)"
    assert "cannot destroy the one-time unlock (key slot 1, tokens 0 and 1)" in caplog.text
    assert "lczfs-unlockd disarm" in caplog.text
    assert world.keyslots == {0, 1}


def test_marker_is_not_a_token_to_warn_about(world, make_config, run, caplog):
    arm(world, armed_ago=2 * DAY)  # expired: destroyed, then the configured token path
    world.answers = ["luks pass"]
    run(make_config())
    assert "lczfs-armed) cannot be used" not in caplog.text


def test_parse_marker_round_trip():
    fields = keystore.marker_json(3, 2, 1000, 2000)
    got = keystore.parse_marker(4, fields, {2: {"type": "systemd-tpm2", "keyslots": ["3"]}}.get)
    assert got == keystore.OneTimeUnlock(marker=4, token=2, slot=3, armed_at=1000, expires=2000)
    assert keystore.utc(0) == "1970-01-01T00:00:00Z"
