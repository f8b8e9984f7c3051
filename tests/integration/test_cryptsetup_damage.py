"""A damaged LUKS2 header is told apart from "not a LUKS device" (real libcryptsetup)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lczfs_unlockd.cryptsetup import LibCryptsetup
from lczfs_unlockd.errors import KeystoreError

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup CLI missing")


@pytest.fixture
def luks2(tmp_path):
    image = tmp_path / "luks2.img"
    image.write_bytes(bytes(32 * 1024 * 1024))
    subprocess.run(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", "-", str(image)],
        input=b"pass", check=True, capture_output=True,
    )  # fmt: skip
    return image


def overwrite(path, offset, length):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xaa" * length)


def test_damaged_json_areas_are_reported_as_damaged(luks2):
    # Keep both binary headers' magic, destroy both JSON areas (16 KiB headers).
    overwrite(luks2, 4096, 12 * 1024)
    overwrite(luks2, 16 * 1024 + 4096, 12 * 1024)
    with pytest.raises(KeystoreError) as info:
        LibCryptsetup().open(str(luks2))
    message = str(info.value)
    assert f"the LUKS header of {luks2} is damaged" in message
    assert "cryptsetup luksHeaderRestore" in message


def test_zeroed_device_is_not_luks(luks2):
    overwrite(luks2, 0, 64 * 1024)
    with pytest.raises(KeystoreError, match="is not a LUKS device: check keystore.volume"):
        LibCryptsetup().open(str(luks2))
