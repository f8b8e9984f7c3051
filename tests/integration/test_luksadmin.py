"""luksadmin (header changes through the cryptsetup CLI) and process.run_fed on image files."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from lczfs_unlockd import luksadmin, process
from lczfs_unlockd.errors import LuksAdminError

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="no cryptsetup CLI")

PASS = b"first passphrase"
FAST = luksadmin.MINIMAL_PBKDF


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "ks.img"
    with open(path, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    luksadmin.format_luks2(str(path), PASS, pbkdf=FAST, label="ks")
    return str(path)


def test_format_add_kill_and_tokens(image):
    meta = luksadmin.metadata(image)
    assert meta.version == 2 and re.fullmatch(r"[0-9a-f-]{36}", meta.uuid)
    assert list(meta.keyslots) == [0] and meta.human_slots() == [0]
    slot = luksadmin.add_key(image, PASS, b"second", pbkdf=FAST)
    assert slot == 1 and luksadmin.test_key(image, b"second", slot=1)
    assert not luksadmin.test_key(image, b"second", slot=0)
    token = luksadmin.import_token(image, {"type": "x-test", "keyslots": ["1"]})
    assert luksadmin.metadata(image).tokens[token].keyslots == (1,)
    luksadmin.kill_slot(image, 1)  # and the token that named only it
    meta = luksadmin.metadata(image)
    assert list(meta.keyslots) == [0] and meta.tokens == {}
    with pytest.raises(LuksAdminError, match="there is no key slot 5"):
        luksadmin.kill_slot(image, 5)


def test_recovery_key(image):
    slot, key = luksadmin.add_recovery_key(image, PASS)
    assert re.fullmatch(rb"([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}", bytes(key))
    assert luksadmin.test_key(image, key, slot=slot)
    meta = luksadmin.metadata(image)
    assert [t.type for t in meta.tokens_of(slot)] == ["systemd-recovery"]
    assert meta.human_slots() == [0, slot]  # a recovery key is typed: a person's slot


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2]", "not a JSON object"),
        ("{not json", "unreadable LUKS2 metadata"),
        ('{"keyslots": {"99": {}}, "tokens": {}}', "invalid key slot number"),
        ('{"keyslots": {"0": []}, "tokens": {}}', "key slot 0 is not a JSON object"),
        ('{"keyslots": {}, "tokens": {"0": {"keyslots": "0"}}}', "invalid keyslots list"),
        ('{"keyslots": {}, "tokens": {"0": {"keyslots": [true]}}}', "invalid key slot of token"),
        ('{"keyslots": [1], "tokens": {}}', "no keyslots/tokens objects"),
        ("{" + '"x": "' + "a" * (5 * 1024 * 1024) + '"}', "larger than 4 MiB"),
    ],
)
def test_hostile_metadata_is_an_error_not_a_traceback(text, why):
    with pytest.raises(LuksAdminError, match=why):
        luksadmin.parse_metadata(text, "/dev/x")


def test_hostile_type_is_escaped():
    meta = luksadmin.parse_metadata(
        json.dumps({"keyslots": {}, "tokens": {"0": {"type": "a\nb\x1b[31m", "keyslots": []}}}),
        "/dev/x",
    )
    assert "\n" not in meta.tokens[0].type and "\x1b" not in meta.tokens[0].type


def test_no_secret_in_argv(tmp_path):
    """run_fed names the secret's pipe in argv; the secret itself arrives only through it."""
    show = tmp_path / "show.py"
    show.write_text(
        "import json, sys\n"
        "print(json.dumps(sys.argv[1:]))\n"
        "print(open(sys.argv[1], 'rb').read().decode())\n"
    )
    secret = bytearray(b"very secret passphrase")
    result = process.run_fed([sys.executable, str(show), "{fd0}"], [secret])
    argv_line, content = result.stdout.splitlines()
    assert "very secret" not in argv_line
    assert re.fullmatch(r'\["/proc/self/fd/\d+"\]', argv_line)
    assert content == "very secret passphrase"
