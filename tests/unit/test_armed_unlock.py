"""The daemon's side of arm-reboot (lczfs_unlockd/keystore.py): the one-time TPM2 unlock."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest

from lczfs_unlockd import keystore
from lczfs_unlockd.errors import Interrupted
from tests.fakes import Token

DAY = 24 * 3600


def arm(
    world,
    *,
    slot=1,
    marker=None,
    tpm2=None,
    failure=None,
    armed_ago=3600,
    lifetime=DAY,
    priority=0,
    kdf="pbkdf2",
):
    """As arm-reboot leaves the header: token 0 = T (systemd-tpm2 of ``slot``),
    token 1 = the marker M, the slot with priority ignore and pbkdf2."""
    now = int(world.wall_time)
    world.keyslots |= {slot}
    world.keyslot_priority[slot] = priority
    world.keyslot_kdf[slot] = kdf
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


def test_expired_and_not_destroyed_is_not_used_by_the_token_method(world, make_config, run):
    """It was: "any token" took T, expired or not, on every later boot."""
    arm(world, armed_ago=2 * DAY)
    world.destroy_failure = "cannot destroy key slot 1: read-only file system"
    world.answers = ["luks pass", "luks pass"]
    for _boot in range(2):
        report = run(make_config())
        assert report.ok and report.keystore_method == "passphrase"
    assert "try token 0" not in world.events
    assert world.tokens[1].removed and world.keyslots == {0, 1}  # marker gone, S and T left


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
        # str.isdigit() says yes to these, int() then raises ValueError.
        ({"lczfs_tpm2_token": "\u00b2"}, "lczfs_tpm2_token is not a number"),
        ({"keyslots": ["\u0663"]}, "key slot is not a number"),
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


def test_failing_destruction_is_logged_and_never_used_again(world, make_config, run, caplog):
    arm(world)
    world.destroy_failure = "cannot destroy key slot 1: read-only file system"
    report = run(make_config())
    assert report.ok, report.error
    assert report.keystore_method == "one-time TPM2 unlock (arm-reboot)"
    assert "cannot destroy the one-time unlock (key slot 1, tokens 0 and 1)" in caplog.text
    assert "lczfs-unlockd disarm" in caplog.text
    # consumed before it was used: the marker is gone, S and T stay
    assert world.tokens[1].removed and not world.tokens[0].removed
    assert world.keyslots == {0, 1}
    # the next boot: no marker, and "any token" passes over a slot of priority ignore
    world.destroy_failure = None
    world.events.clear()
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert "try token 0" not in world.events and "activate lczfs-keystore ro" in world.events


def test_the_marker_is_removed_before_the_token_is_tried(world, make_config, run):
    arm(world)
    seen = []
    world.hooks["token"] = lambda w: seen.append(w.tokens[1].removed)
    report = run(make_config())
    assert report.keystore_method == "one-time TPM2 unlock (arm-reboot)"
    assert seen == [True]
    assert world.events.index("remove token 1") < world.events.index("try token 0")


def test_a_marker_that_cannot_be_removed_means_no_try(world, make_config, run, caplog):
    arm(world)
    world.remove_failure = "cannot remove token 1: read-only file system"
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert "try token 0" not in world.events
    assert "not using the one-time unlock (arm-reboot, key slot 1, tokens 0 and 1)" in caplog.text
    assert "cannot be removed from the header" in caplog.text
    assert not any(e.startswith("destroy") for e in world.events)
    # and the token method does not use the token its marker names either
    assert "not trying token 0 of" in caplog.text


def test_sigterm_in_the_destruction_waits_until_it_is_done(world, make_config, run):
    arm(world)
    world.hooks["destroy"] = lambda w: os.kill(os.getpid(), signal.SIGTERM)
    report = run(make_config())
    assert isinstance(report.error, Interrupted)
    assert world.keyslots == {0} and all(t.removed for t in world.tokens)


def test_a_boot_cut_short_after_the_try_leaves_nothing_usable(world, make_config, run):
    """SIGTERM while the destruction has not started (or power lost):
    S and T are left without their marker; the next boot uses neither."""
    arm(world)

    def stop(w):
        w.hooks.pop("destroy")
        raise Interrupted("simulated: the boot stopped before the destruction")

    world.hooks["destroy"] = stop
    report = run(make_config())
    assert isinstance(report.error, Interrupted)
    assert world.keyslots == {0, 1} and world.tokens[1].removed
    world.events.clear()
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert "try token 0" not in world.events


def test_a_leftover_token_of_an_ignored_slot_is_not_used_by_the_token_method(
    world, make_config, run
):
    world.keyslots |= {1}
    world.keyslot_priority[1] = 0
    world.tokens += [Token(json=json.dumps({"type": "systemd-tpm2", "keyslots": ["1"]}))]
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert "activate lczfs-keystore ro" in world.events


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"priority": 1}, "key slot 1 does not have priority ignore"),
        ({"kdf": "argon2id"}, "key slot 1 has the KDF argon2id, not pbkdf2"),
    ],
)
def test_marker_on_a_slot_arm_reboot_did_not_make_is_ignored(
    world, make_config, run, caplog, change, why
):
    arm(world, **change)
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok and report.keystore_method == "passphrase"
    assert why in caplog.text
    # not destroyed, and its token not used by the token method either
    assert world.keyslots == {0, 1} and not any(t.removed for t in world.tokens)
    assert "try token 0" not in world.events and world.prompts


def test_marker_on_a_slot_another_token_also_opens_is_ignored(world, make_config, run, caplog):
    arm(world)
    world.tokens.append(
        Token(type="systemd-recovery", plugin=False, json='{"type": "systemd-recovery", '
              '"keyslots": ["1"]}')
    )  # fmt: skip
    world.answers = ["luks pass"]
    report = run(make_config({"unlock": ["passphrase"]}))
    assert report.keystore_method == "passphrase"
    assert "key slot 1 also belongs to token 2: not a one-time slot" in caplog.text
    assert world.keyslots == {0, 1}


def test_other_tokens_still_open_next_to_an_ignored_marker(world, make_config, run, caplog):
    arm(world, priority=1)  # an invalid marker: its token is skipped, token 2 is not
    world.keyslots |= {2}
    world.tokens.append(Token(json=json.dumps({"type": "systemd-tpm2", "keyslots": ["2"]})))
    report = run(make_config())
    assert report.ok and report.keystore_method == "token"
    assert "try token 2" in world.events and "try token 0" not in world.events


def test_one_deadline_for_the_one_time_try_and_the_token_wait(world, make_config, run):
    arm(world)
    world.tokens[0].available_after = 1000  # the TPM never shows up
    world.keyslots |= {2}
    world.tokens.append(
        Token(available_after=1000, json=json.dumps({"type": "systemd-tpm2", "keyslots": ["2"]}))
    )
    world.answers = ["luks pass"]
    report = run(make_config())  # token_timeout = 2s
    assert report.ok and report.keystore_method == "passphrase"
    assert world.time < 2.0 + 2 * keystore.TOKEN_RETRY + 1  # not 2 x token_timeout


def test_destroy_drops_the_slot_from_tokens_like_libcryptsetup(world, make_config, run):
    arm(world)
    world.remove_failure = None
    world.hooks["token"] = lambda w: setattr(w, "remove_failure", "read-only file system")
    run(make_config())  # the marker went; the slot went; T could not be removed
    assert world.keyslots == {0} and world.tokens[1].removed and not world.tokens[0].removed
    assert json.loads(world.tokens[0].json)["keyslots"] == []


def _slot(priority, kdf="pbkdf2"):
    return SimpleNamespace(priority=priority, kdf=kdf)


def _token(kind, *slots):
    return SimpleNamespace(type=kind, keyslots=tuple(slots))


def test_one_time_leftovers():
    slots = {
        0: _slot(1, "argon2id"),
        1: _slot(0),
        2: _slot(1),
        3: _slot(0),
        4: _slot(0, "argon2id"),
    }
    tokens = {
        0: _token("systemd-tpm2"),  # its slot destroyed
        1: _token("lczfs-armed"),  # likewise
        2: _token("systemd-tpm2", 1),  # no marker, priority ignore, pbkdf2: left over
        3: _token("systemd-tpm2", 2),  # an enrolled TPM2 (normal priority)
        4: _token("systemd-tpm2", 3),  # armed: the marker names its slot
        5: _token("lczfs-armed", 3),
        6: _token("systemd-tpm2", 4),  # argon2id: not systemd-cryptenroll's TPM2 slot
        7: _token("systemd-recovery"),  # not ours
    }
    assert keystore.one_time_leftovers(slots, tokens) == [0, 1, 2]


def test_check_one_time_slot():
    unlock = keystore.OneTimeUnlock(marker=1, token=0, slot=1, armed_at=1, expires=2)
    keystore.check_one_time_slot(unlock, _slot(0), [0, 1])
    with pytest.raises(ValueError, match="not active"):
        keystore.check_one_time_slot(unlock, None, [0, 1])
    with pytest.raises(ValueError, match="also belongs to token 3"):
        keystore.check_one_time_slot(unlock, _slot(0), [0, 1, 3])


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
