"""The daemon's side of arm-reboot on a real LUKS2 header (an image file).

The header is made with the cryptsetup CLI as arm-reboot leaves it: key slot
1 (pbkdf2, priority ignore), a systemd-tpm2 token naming it (its blob is no real TPM's: activation
needs device-mapper and a TPM, this test needs neither) and the marker.
The daemon's libcryptsetup binding must find the marker through
``keystore.armed`` and destroy slot and tokens in the header on disk.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from lczfs_unlockd import keystore, luksadmin
from lczfs_unlockd.cryptsetup import LibCryptsetup
from lczfs_unlockd.ports import Keyslot

pytestmark = pytest.mark.skipif(
    shutil.which("cryptsetup") is None, reason="the cryptsetup CLI is not installed"
)

PASSPHRASE = b"first passphrase"
ONE_TIME = b"one-time secret that the TPM would seal"
FAST = luksadmin.MINIMAL_PBKDF
TPM2 = {
    "type": "systemd-tpm2",
    "keyslots": ["1"],
    "tpm2-blob": "AJ4AIDYf0mm27DbEBU9YZU9a5zUsbrfigROZBlCOl7JlQ6XMABCX",
    "tpm2-pcrs": [7, 15],
    "tpm2-pcr-bank": "sha256",
    "tpm2-primary-alg": "ecc",
    "tpm2-policy-hash": "f62d13a8dfa1a3dca5b7f16214692abd321889814e17d52ab9e830623eb8f15d",
    "tpm2-pin": False,
}


def _import(image: Path, token: dict[str, object]) -> None:
    subprocess.run(
        ["cryptsetup", "token", "import", str(image)],
        input=json.dumps(token).encode(),
        check=True,
        timeout=30,
    )


@pytest.fixture
def armed_image(tmp_path: Path) -> Path:
    image = tmp_path / "keystore.img"
    with open(image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    luksadmin.format_luks2(str(image), PASSPHRASE, pbkdf=FAST)
    assert luksadmin.add_key(str(image), PASSPHRASE, ONE_TIME, pbkdf=FAST) == 1
    _import(image, TPM2)  # token 0
    _import(image, keystore.marker_json(1, 0, 1_800_000_000, 1_800_086_400))  # token 1
    subprocess.run(
        ["cryptsetup", "config", "--priority", "ignore", "--key-slot", "1", str(image)],
        check=True,
        timeout=30,
    )
    meta = luksadmin.metadata(str(image))
    assert sorted(meta.keyslots) == [0, 1] and sorted(meta.tokens) == [0, 1]
    return image


def test_binding_finds_the_marker_and_destroys_slot_and_tokens(armed_image, caplog):
    caplog.set_level(logging.INFO, logger="lczfs_unlockd")
    with LibCryptsetup().open(str(armed_image)) as volume:
        types = {t.id: t.type for t in volume.tokens()}
        assert types == {0: "systemd-tpm2", 1: "lczfs-armed"}
        assert json.loads(volume.token_json(0) or "")["keyslots"] == ["1"]
        assert volume.token_json(5) is None
        assert volume.keyslot(1) == Keyslot(1, 0, "pbkdf2")
        assert volume.keyslot(0) == Keyslot(0, 1, "pbkdf2")
        assert volume.keyslot(7) is None
        found = keystore.armed(volume, str(armed_image))
        assert found == [
            keystore.OneTimeUnlock(
                marker=1, token=0, slot=1, armed_at=1_800_000_000, expires=1_800_086_400
            )
        ]
        volume.remove_token(1)  # consumed, as the daemon does before the try
        assert sorted(luksadmin.metadata(str(armed_image)).tokens) == [0]
        keystore.destroy(volume, str(armed_image), found[0])
        assert volume.tokens() == []  # the handle sees its own change
    assert "destroyed the one-time unlock (key slot 1, tokens 0 and 1)" in caplog.text
    meta = luksadmin.metadata(str(armed_image))  # and the header on disk has it
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}
    assert luksadmin.test_key(str(armed_image), PASSPHRASE)
    assert not luksadmin.test_key(str(armed_image), ONE_TIME)


def test_a_marker_on_a_slot_of_normal_priority_is_ignored(armed_image, caplog):
    subprocess.run(
        ["cryptsetup", "config", "--priority", "normal", "--key-slot", "1", str(armed_image)],
        check=True,
        timeout=30,
    )
    with LibCryptsetup().open(str(armed_image)) as volume:
        assert keystore.armed(volume, str(armed_image)) == []
    assert "key slot 1 does not have priority ignore" in caplog.text


def test_a_header_changed_behind_the_handle_is_read_again(armed_image):
    """libcryptsetup refuses a write from a handle whose header is stale
    ("concurrent LUKS2 metadata update"): the binding re-reads it once."""
    with LibCryptsetup().open(str(armed_image)) as volume:
        _import(armed_image, {"type": "other", "keyslots": []})  # token 2, behind its back
        volume.destroy_one_time(1, (0, 1))
    meta = luksadmin.metadata(str(armed_image))
    assert sorted(meta.keyslots) == [0] and sorted(meta.tokens) == [2]


def test_a_destroyed_slot_leaves_tokens_naming_no_slot(armed_image):
    """What the daemon leaves when only the token removal fails, and what
    one_time_leftovers finds for disarm."""
    with LibCryptsetup().open(str(armed_image)) as volume:
        volume.remove_token(1)
        volume.destroy_one_time(1, ())
    meta = luksadmin.metadata(str(armed_image))
    assert {n: t.keyslots for n, t in meta.tokens.items()} == {0: ()}
    assert keystore.one_time_leftovers(meta.keyslots, meta.tokens) == [0]


def test_marker_naming_another_slot_is_left_alone(armed_image, caplog):
    subprocess.run(
        ["cryptsetup", "token", "remove", "--token-id", "1", str(armed_image)],
        check=True,
        timeout=30,
    )
    _import(armed_image, keystore.marker_json(0, 0, 1_800_000_000, 1_800_086_400))
    with LibCryptsetup().open(str(armed_image)) as volume:
        assert keystore.armed(volume, str(armed_image)) == []
    assert "ignoring the lczfs-armed marker in token 1" in caplog.text
    assert "does not belong to key slot 0" in caplog.text
    meta = luksadmin.metadata(str(armed_image))
    assert sorted(meta.keyslots) == [0, 1] and sorted(meta.tokens) == [0, 1]


def test_destroying_a_missing_slot_says_so(armed_image):
    from lczfs_unlockd.errors import KeystoreError

    with (
        LibCryptsetup().open(str(armed_image)) as volume,
        pytest.raises(KeystoreError, match="cannot destroy key slot 7 of"),
    ):
        volume.destroy_one_time(7, (0, 1))
    assert sorted(luksadmin.metadata(str(armed_image)).tokens) == [0, 1]
