"""Odd but real LUKS headers, made with the cryptsetup CLI, against the binding.

Key slots nothing can open, reencryption left half-way, requirements from a
newer cryptsetup, a destroyed primary LUKS2 header: each is told apart, with
a message that names the device and says what to do, before anything is
asked where it can be.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lczfs_unlockd import cryptsetup
from lczfs_unlockd.cryptsetup import LibCryptsetup
from lczfs_unlockd.errors import KeystoreError, NoUsableKeyslotError, WrongKeyError

CRYPTSETUP = shutil.which("cryptsetup")
pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="the cryptsetup CLI is not installed")

PASSPHRASE = b"correct horse battery staple 7f3a"
WRONG = b"correct horse battery stapel 7f3a"  # a typo
COST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
LOGGER = "lczfs_unlockd.cryptsetup"


def cli(*args: str | Path, stdin: bytes = b"") -> None:
    assert CRYPTSETUP is not None
    subprocess.run(
        [CRYPTSETUP, "--batch-mode", *map(str, args)],
        input=stdin,
        capture_output=True,
        check=True,
        timeout=60,
    )


def luks(tmp_path: Path, kind: str = "luks2", *options: str) -> Path:
    path = tmp_path / f"{kind}.img"
    with path.open("wb") as f:
        f.truncate(24 * 1024 * 1024)
    cli("luksFormat", "--type", kind, *COST, *options, "--key-file", "-", path, stdin=PASSPHRASE)
    return path


def add_unbound_slot(path: Path) -> None:
    cli("luksAddKey", *COST, "--unbound", "--key-size", "256", "--key-file", "-", path,
        stdin=b"unbound slot passphrase")  # fmt: skip


def key_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "key"
    path.write_bytes(content)
    return str(path)


# --- key slots that a passphrase cannot use ----------------------------------


def test_typo_beside_an_unbound_slot_is_a_wrong_passphrase(tmp_path: Path) -> None:
    # libcryptsetup 2.6 returns -ENOENT here, not -EPERM: the prompt loop
    # must ask again, not give up on "no such file or directory".
    image = luks(tmp_path)
    add_unbound_slot(image)
    with LibCryptsetup().open(str(image)) as dev:
        with pytest.raises(WrongKeyError) as e:
            dev.activate_by_passphrase(None, bytearray(WRONG), read_only=True)
        assert str(e.value) == f"no key slot of {image} accepts this passphrase"
        assert e.value.errno == errno.EPERM
        with pytest.raises(WrongKeyError):
            dev.activate_by_keyfile(None, key_file(tmp_path, WRONG), read_only=True)
        dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)


def test_typo_beside_an_ignored_slot_is_a_wrong_passphrase(tmp_path: Path) -> None:
    image = luks(tmp_path)
    cli("luksAddKey", *COST, "--key-file", "-", image, key_file(tmp_path, b"second"),
        stdin=PASSPHRASE)  # fmt: skip
    cli("config", "--priority", "ignore", "--key-slot", "1", image)
    with LibCryptsetup().open(str(image)) as dev, pytest.raises(WrongKeyError):
        dev.activate_by_passphrase(None, bytearray(WRONG), read_only=True)


def only_unbound(tmp_path: Path) -> Path:
    image = luks(tmp_path)
    add_unbound_slot(image)
    cli("luksKillSlot", image, "0")
    return image


def only_ignored(tmp_path: Path) -> Path:
    image = luks(tmp_path)
    cli("config", "--priority", "ignore", "--key-slot", "0", image)
    return image


def no_slots(tmp_path: Path) -> Path:
    image = luks(tmp_path)
    cli("luksKillSlot", image, "0")
    return image


def luks1_no_slots(tmp_path: Path) -> Path:
    image = luks(tmp_path, "luks1")
    cli("luksKillSlot", image, "0")
    return image


@pytest.mark.parametrize(
    ("make", "problem", "fix"),
    [
        (only_unbound, "key slot 1 is unbound (a key, but not this volume's)",
         "restore a header backup with cryptsetup luksHeaderRestore"),
        (only_ignored, "key slot 0 has priority ignore",
         "let the slot be used again with cryptsetup config --priority normal --key-slot 0 "),
        (no_slots, "it has no key slots at all",
         "restore a header backup with cryptsetup luksHeaderRestore"),
        (luks1_no_slots, "it has no key slots at all",
         "restore a header backup with cryptsetup luksHeaderRestore"),
    ],
    ids=["unbound", "ignored", "none", "luks1-none"],
)  # fmt: skip
def test_no_usable_key_slot(
    tmp_path: Path, make: Callable[[Path], Path], problem: str, fix: str
) -> None:
    image = make(tmp_path)
    with LibCryptsetup().open(str(image)) as dev:
        with pytest.raises(NoUsableKeyslotError) as e:
            dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)
        assert str(e.value).startswith(
            f"no key slot of {image} can take a passphrase: {problem}: {fix}"
        ), str(e.value)
        assert e.value.errno == errno.ENOKEY
        assert "no such file" not in str(e.value)
        assert not isinstance(e.value, WrongKeyError)  # asking again cannot help
        keyfile = key_file(tmp_path, PASSPHRASE)
        with pytest.raises(NoUsableKeyslotError) as e:
            dev.activate_by_keyfile(None, keyfile, read_only=True)
        assert str(e.value).startswith(f"no key slot of {image} can take the key file {keyfile}: ")


# --- requirements: reencryption, features of a newer cryptsetup ---------------


def rewrite_luks2_metadata(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the JSON area of both LUKS2 headers and recompute their checksums,
    as cryptsetup's tests/generators do (with jq and their lib.sh)."""
    with path.open("r+b") as f:
        hdr_size = struct.unpack(">Q", f.read(16)[8:16])[0]
        f.seek(0)
        both = bytearray(f.read(2 * hdr_size))
        metadata = json.loads(bytes(both[4096:hdr_size]).rstrip(b"\0"))
        change(metadata)
        area = json.dumps(metadata).encode()
        assert len(area) < hdr_size - 4096
        for offset in (0, hdr_size):
            header = both[offset : offset + hdr_size]
            header[4096:] = area.ljust(hdr_size - 4096, b"\0")
            header[448:512] = bytes(64)  # the checksum field covers itself as zeros
            header[448:480] = hashlib.sha256(header).digest()
            f.seek(offset)
            f.write(header)


def test_reencryption_in_progress_is_refused_at_load(tmp_path: Path) -> None:
    image = luks(tmp_path)
    cli("reencrypt", "--init-only", *COST, "--key-file", "-", image, stdin=PASSPHRASE)
    with pytest.raises(KeystoreError) as e:
        LibCryptsetup().open(str(image))
    assert str(e.value) == (
        f"{image} is in the middle of a LUKS2 reencryption (interrupted, or only initialised "
        "with --init-only): finish it from a rescue system with cryptsetup reencrypt "
        f"--resume-only {image}, then boot again"
    )
    assert e.value.errno == errno.ETXTBSY


def test_unknown_requirement_is_refused_at_load(tmp_path: Path) -> None:
    image = luks(tmp_path)

    def require(metadata: dict[str, Any]) -> None:
        metadata["config"]["requirements"] = {"mandatory": ["lczfs-test-future-feature"]}

    rewrite_luks2_metadata(image, require)
    with pytest.raises(KeystoreError) as e:
        LibCryptsetup().open(str(image))
    assert str(e.value).startswith(
        f"the LUKS2 header of {image} requires a feature this libcryptsetup does not know "
        "(written by a newer cryptsetup, or tampered with): "
    )
    assert e.value.errno == errno.ETXTBSY


def test_rewritten_metadata_without_requirements_still_opens(tmp_path: Path) -> None:
    # The header editor above is sound: the same rewrite minus the requirement loads.
    image = luks(tmp_path)
    rewrite_luks2_metadata(image, lambda metadata: None)
    with LibCryptsetup().open(str(image)) as dev:
        dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)


# --- a destroyed primary LUKS2 header -----------------------------------------


def zero(path: Path, offset: int, length: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize(("metadata", "secondary"), [("16k", "16 KiB"), ("1m", "1 MiB")])
def test_destroyed_primary_header_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, metadata: str, secondary: str
) -> None:
    # libcryptsetup 2.6 loads the secondary header and, the device being
    # writable, silently writes the primary one back; the operator is told.
    image = luks(tmp_path, "luks2", "--luks2-metadata-size", metadata)
    zero(image, 0, 4096)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with LibCryptsetup().open(str(image)) as dev:
        dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)
    assert (
        f"the primary LUKS2 header of {image} was destroyed; libcryptsetup restored it from "
        f"the secondary copy at {secondary}: find out what overwrote it, and renew your "
        "header backup (cryptsetup luksHeaderBackup)"
    ) in messages(caplog)
    assert image.read_bytes()[:6] == b"LUKS\xba\xbe"


READ_ONLY_OPEN = """
import logging, sys
from lczfs_unlockd.cryptsetup import LibCryptsetup
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
with LibCryptsetup().open(sys.argv[1]) as dev:
    dev.activate_by_passphrase(None, bytearray(sys.argv[2].encode()), read_only=True)
print("opened")
"""


def test_destroyed_primary_header_on_a_read_only_device(tmp_path: Path) -> None:
    # A dry run imports the pool read-only: libcryptsetup cannot write the
    # primary header back, so the operator is told how to repair it.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    image = luks(tmp_path)
    zero(image, 0, 4096)
    script = f'mount --bind -o ro {tmp_path} {tmp_path} && exec "$0" -c "$1" {image} "$2"'
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable, READ_ONLY_OPEN, PASSPHRASE.decode()],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    if run.returncode != 0 and "mount" in run.stderr and "opened" not in run.stdout:
        pytest.skip(f"no read-only bind mount here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert (
        f"the primary LUKS2 header of {image} is destroyed; libcryptsetup uses the secondary "
        f"copy at 16 KiB: repair it with cryptsetup repair {image} where the device is writable"
    ) in run.stdout.splitlines()
    assert image.read_bytes()[:6] == bytes(6)  # nothing was written


@pytest.mark.parametrize(("metadata", "offset", "secondary"), [("16k", 16384, "16 KiB"),
                                                                ("64k", 65536, "64 KiB")])  # fmt: skip
def test_destroyed_primary_with_an_unloadable_secondary_is_not_called_not_luks(
    tmp_path: Path, metadata: str, offset: int, secondary: str
) -> None:
    image = luks(tmp_path, "luks2", "--luks2-metadata-size", metadata)
    zero(image, 0, 4096)
    with image.open("r+b") as f:  # the secondary's JSON area; its magic stays
        f.seek(offset + 4096)
        f.write(b"\xaa" * 4096)
    with pytest.raises(KeystoreError) as e:
        LibCryptsetup().open(str(image))
    message = str(e.value)
    assert "is not a LUKS device" not in message
    assert message.startswith(
        f"the primary LUKS2 header of {image} is destroyed and libcryptsetup could not use "
        f"the secondary copy at {secondary} either ("
    ), message
    assert f"try cryptsetup repair {image}, or restore a header backup" in message


def test_both_headers_destroyed_is_not_luks(tmp_path: Path) -> None:
    image = luks(tmp_path)
    zero(image, 0, 32 * 1024)
    with pytest.raises(KeystoreError, match="is not a LUKS device"):
        LibCryptsetup().open(str(image))


# --- libcryptsetup's error text ------------------------------------------------


def test_an_earlier_error_does_not_leak_into_the_next_message(tmp_path: Path) -> None:
    missing = tmp_path / "earlier-missing-device"
    with pytest.raises(KeystoreError):
        LibCryptsetup().open(str(missing))
    assert str(missing) in cryptsetup.last_error()  # "Device ... does not exist or access denied."
    # Both JSON areas damaged, both magics kept: libcryptsetup logs no error of its own.
    image = luks(tmp_path)
    with image.open("r+b") as f:
        for offset in (4096, 16384 + 4096):
            f.seek(offset)
            f.write(b"\xaa" * 12 * 1024)
    with pytest.raises(KeystoreError) as e:
        LibCryptsetup().open(str(image))
    assert str(e.value) == (
        f"the LUKS header of {image} is damaged (invalid header): "
        "restore it from a backup with cryptsetup luksHeaderRestore"
    )
    assert str(missing) not in str(e.value)


def test_library_error_text_is_escaped_and_bounded() -> None:
    # libcryptsetup quotes header contents (type names, labels) in its errors.
    cryptsetup._log_message(
        cryptsetup.CRYPT_LOG_ERROR, b"Unknown type evil\nSTATUS=unlocked\x1b[2J" + b"A" * 500, None
    )
    reason = cryptsetup._reason()
    assert reason.startswith("Unknown type evil\\x0aSTATUS=unlocked\\x1b[2J")
    assert "\n" not in reason and "\x1b" not in reason
    assert len(reason) == cryptsetup.MAX_REASON
    assert reason.endswith("...")
