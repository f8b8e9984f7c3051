"""setup's LUKS and file-system steps on image files, with the real tools:
LUKS2 with the parameters setup promises, the recovery key, ext4.

The zvol, the mapping and the mounts need root and ZFS: the VM scenarios
run those.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lczfs_unlockd import luksadmin, ops_setup

CRYPTSETUP = shutil.which("cryptsetup")
pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="the cryptsetup CLI is not installed")

PASSPHRASE = bytearray(b"a keystore passphrase 0815")
# argon2id as setup uses it, at a cost a shared test machine can afford.
CHEAP = ("--pbkdf-memory", "32768", "--iter-time", "100")


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "keystore.img"
    with path.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    return str(path)


def dump(device: str) -> dict[str, object]:
    assert CRYPTSETUP is not None
    out = subprocess.run(
        [CRYPTSETUP, "luksDump", "--dump-json-metadata", device],
        capture_output=True, check=True, timeout=60, text=True,
    ).stdout  # fmt: skip
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_format_uses_argon2id_aes_xts_and_the_label(image):
    machine = ops_setup.Machine(luks_kdf=CHEAP)
    machine.format_luks(image, PASSPHRASE, "lczfs-keystore")
    data = dump(image)
    slots = data["keyslots"]
    assert isinstance(slots, dict) and set(slots) == {"0"}
    assert slots["0"]["kdf"]["type"] == "argon2id"
    segment = data["segments"]["0"]  # type: ignore[index]
    assert segment["encryption"] == "aes-xts-plain64"
    assert data["config"]["json_size"]  # type: ignore[index]
    assert luksadmin.test_key(image, PASSPHRASE)
    assert not luksadmin.test_key(image, bytearray(b"not the passphrase"))
    label = subprocess.run(
        [CRYPTSETUP, "luksDump", image], capture_output=True, check=True, timeout=60, text=True
    ).stdout  # fmt: skip
    assert re.search(r"^Label:\s+lczfs-keystore$", label, re.M), label


def test_recovery_key_opens_the_keystore_and_has_its_token(image):
    machine = ops_setup.Machine(luks_kdf=CHEAP)
    machine.format_luks(image, PASSPHRASE, "lczfs-keystore")
    slot, key = machine.add_recovery_key(image, PASSPHRASE)
    try:
        assert len(key) == 71 and key.count(b"-") == 7
        assert luksadmin.test_key(image, key, slot)
        assert machine.test_key(image, key, slot)  # what setup checks before printing it
        assert not machine.test_key(image, bytearray(b"x" * len(key)), slot)
        assert luksadmin.test_key(image, PASSPHRASE, 0)
        meta = luksadmin.metadata(image)
        assert sorted(meta.keyslots) == [0, slot]
        assert [t.type for t in meta.tokens_of(slot)] == ["systemd-recovery"]
        # Both are slots a person can open: the recovery key counts as one.
        assert meta.human_slots() == [0, slot]
    finally:
        key[:] = bytes(len(key))


def test_mkfs_makes_ext4(image):
    ops_setup.Machine().mkfs(image, "lczfs-keystore")
    with open(image, "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef"  # the ext2/3/4 superblock magic
        f.seek(1024 + 0x78)
        assert f.read(14) == b"lczfs-keystore"  # s_volume_name


def test_key_file_round_trip_through_the_daemons_reader(tmp_path):
    """What setup writes, read back as the daemon reads it at boot."""
    from lczfs_unlockd.keyformat import derive_wrapping_key

    machine = ops_setup.Machine()
    root = tmp_path / "ks"
    root.mkdir()
    material = bytearray(b"00112233445566778899aabbccddeeff" * 2 + b"\n")
    machine.write_key_file(str(root), "rpool/crypt.key", material)
    back = machine.read_key_file(str(root), "rpool/crypt.key", "rpool/crypt")
    key = derive_wrapping_key("hex", back, salt=0, iters=0, dataset="rpool/crypt", path="x")
    assert bytes(key) == bytes.fromhex(material[:64].decode())


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk is not installed")
def test_partition_writes_one_gpt_partition(image):
    ops_setup.Machine().partition(image)
    out = subprocess.run(
        ["sfdisk", "--json", image], capture_output=True, check=True, timeout=60, text=True
    ).stdout  # fmt: skip
    table = json.loads(out)["partitiontable"]
    assert table["label"] == "gpt" and len(table["partitions"]) == 1


def test_private_namespace_hides_the_mounts_and_drops_them_on_sigkill(tmp_path):
    """setup's mounts live in a mount namespace of its own: nobody else sees
    them, and a SIGKILL leaves none behind (run in a child: it needs root)."""
    import os
    import signal
    import sys

    if os.geteuid() != 0:
        pytest.skip("unshare(CLONE_NEWNS) needs root")
    target = tmp_path / "mnt"
    target.mkdir()
    code = (
        "import os, subprocess, sys\n"
        "from lczfs_unlockd import ops_setup\n"
        "ops_setup.Machine().private_namespace()\n"
        f"subprocess.run(['mount', '-t', 'tmpfs', 'none', {str(target)!r}], check=True)\n"
        "print(sum(line.split()[4] == %r for line in open('/proc/self/mountinfo')), flush=True)\n"
        "sys.stdin.read()\n"
    ) % str(target)
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=str(Path(__file__).parents[2]),
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "1"  # mounted, in its namespace
        with open("/proc/self/mountinfo") as f:
            assert not any(line.split()[4] == str(target) for line in f)  # not in ours
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert not os.path.ismount(target)
