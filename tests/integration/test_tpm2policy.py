"""TPM2 policy digests (tpm2policy.py) against a real software TPM, and
``status`` end to end on a real LUKS image, a real token and a real initrd.

The reference is tpm2-tools talking to swtpm (the fixtures of
test_tpm2.py): ``tpm2_createpolicy --policy-pcr`` computes a PolicyPCR
digest with the tools' own code from PCR values the TPM returned, and a
real policy session (``tpm2_startauthsession --policy-session``,
``tpm2_policypcr``, ``tpm2_policyauthvalue``) makes the TPM compute one
itself.  If the formula in tpm2policy.py were wrong — the command code, the
selection's layout, the PCR order, the hash of the values, the order of
the policy parts — these digests would differ.

The end-to-end test seals nothing (status never unseals): it enrolls a
systemd-tpm2 token whose ``tpm2-policy-hash`` tpm2-tools computed from the
TPM's PCRs with PCR 15 at zero, extends PCR 15 as the daemon would, copies
the TPM's PCRs into a fake sysfs, and asks ``status`` whether the token
will match at the next boot: yes; and after PCR 7 moves: no, with the
warning.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lczfs_unlockd import luksadmin, ops_status, tpm2policy
from tests.integration.test_tpm2 import (  # noqa: F401 (fixtures)
    Swtpm,
    _run,
    swtpm,
    tpm_state,
    unavailable,
)

TOOLS = ("tpm2_createpolicy", "tpm2_startauthsession", "tpm2_policypcr", "tpm2_policyauthvalue",
         "tpm2_flushcontext", "tpm2_pcrextend", "tpm2_pcrread")  # fmt: skip


@pytest.fixture
def tpm(request: pytest.FixtureRequest) -> Swtpm:
    """test_tpm2.py's swtpm (imported above, hence asked for by name here)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(f"not installed: {', '.join(missing)} (scripts/setup-host installs them)")
    started: Swtpm = request.getfixturevalue("swtpm")
    return started


def extend(tpm: Swtpm, pcr: int, what: bytes) -> None:
    digests = f"sha1={hashlib.sha1(what).hexdigest()},sha256={hashlib.sha256(what).hexdigest()}"
    result = _run(["tpm2_pcrextend", "-T", tpm.tcti, f"{pcr}:{digests}"])
    assert result.returncode == 0, result.stderr


def tools_policy_pcr(tpm: Swtpm, tmp: Path, bank: str, pcrs: list[int]) -> bytes:
    """tpm2-tools' PolicyPCR digest over the TPM's current values (a trial)."""
    selection = f"{bank}:{','.join(map(str, pcrs))}"
    values, out = tmp / "pcrs.bin", tmp / "policy.bin"
    result = _run(["tpm2_pcrread", "-T", tpm.tcti, selection, "-o", str(values)])
    assert result.returncode == 0, result.stderr
    result = _run(["tpm2_createpolicy", "-T", tpm.tcti, "--policy-pcr", "-l", selection,
                   "-f", str(values), "-L", str(out)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def session_policy(tpm: Swtpm, tmp: Path, bank: str, pcrs: list[int], *, pin: bool) -> bytes:
    """The digest the TPM itself computes in a real policy session."""
    ctx, out = tmp / "session.ctx", tmp / "session.bin"
    result = _run(["tpm2_startauthsession", "-T", tpm.tcti, "--policy-session", "-S", str(ctx)])
    assert result.returncode == 0, result.stderr
    try:
        if pcrs:
            selection = f"{bank}:{','.join(map(str, pcrs))}"
            result = _run(["tpm2_policypcr", "-T", tpm.tcti, "-S", str(ctx), "-l", selection,
                           "-L", str(out)])  # fmt: skip
            assert result.returncode == 0, result.stderr
        if pin:
            result = _run(["tpm2_policyauthvalue", "-T", tpm.tcti, "-S", str(ctx), "-L", str(out)])
            assert result.returncode == 0, result.stderr
    finally:
        _run(["tpm2_flushcontext", "-T", tpm.tcti, str(ctx)])
    return out.read_bytes()


def values(tpm: Swtpm, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    return {p: tpm.pcr(bank, p) for p in pcrs}


@pytest.mark.parametrize(
    ("bank", "pcrs"),
    [("sha256", [7]), ("sha256", [7, 15]), ("sha256", [0, 2, 4, 7, 11, 16, 23]), ("sha1", [7, 15])],
)
def test_policy_pcr_is_the_tpms(tpm, tmp_path, bank, pcrs):
    extend(tpm, 7, b"secure boot db")
    extend(tpm, 4, b"boot loader")
    extend(tpm, 16, b"debug")
    mine = tpm2policy.sealing_policy(bank, values(tpm, bank, pcrs), pin=False)
    assert mine == tools_policy_pcr(tpm, tmp_path, bank, pcrs)
    assert mine == session_policy(tpm, tmp_path, bank, pcrs, pin=False)
    # A PCR value one bit off gives another digest: the values count.
    changed = values(tpm, bank, pcrs)
    changed[7] = bytes([changed[7][0] ^ 1]) + changed[7][1:]
    assert tpm2policy.sealing_policy(bank, changed, pin=False) != mine


@pytest.mark.parametrize("pcrs", [[7, 15], []])
def test_pin_adds_policy_auth_value_after_the_pcrs(tpm, tmp_path, pcrs):
    extend(tpm, 7, b"secure boot db")
    mine = tpm2policy.sealing_policy("sha256", values(tpm, "sha256", pcrs), pin=True)
    assert mine == session_policy(tpm, tmp_path, "sha256", pcrs, pin=True)


# --- status end to end ---------------------------------------------------------------------

POOL = "rpool"
VOLUME = "rpool/volumes/bootsecrets"
DEVICE = f"/dev/zvol/{VOLUME}-part1"
FAST = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def cpio(root: Path, out: Path) -> None:
    """A newc archive of ``root`` made by GNU cpio, zstd-compressed after an
    uncompressed early archive, as dracut lays an initrd out."""
    early_root = root.parent / "early"
    (early_root / "kernel/x86/microcode").mkdir(parents=True)
    (early_root / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(b"\x01" * 1000)

    def archive(top: Path) -> bytes:
        names = subprocess.run(["find", "."], cwd=top, capture_output=True, check=True).stdout
        return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=top, input=names,
                              capture_output=True, check=True).stdout  # fmt: skip

    main = subprocess.run(["zstd", "-q", "-c"], input=archive(root), capture_output=True,
                          check=True).stdout  # fmt: skip
    out.write_bytes(archive(early_root) + main)


def test_status_on_a_real_header_token_and_initrd(tpm, tmp_path, capsys):
    for program in ("cryptsetup", "cpio", "zstd", "find"):
        if shutil.which(program) is None:
            unavailable(f"{program} is not installed")
    extend(tpm, 7, b"secure boot db")
    # What systemd-cryptenroll --tpm2-pcrs=7+15:sha256=0 seals to: PCR 15 still zero.
    policy = tools_policy_pcr(tpm, tmp_path, "sha256", [7, 15]).hex()
    extend(tpm, 15, b"the daemon measured the unlock")  # this boot's measurement

    image = tmp_path / "keystore.img"
    with open(image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    luksadmin.format_luks2(str(image), b"passphrase", pbkdf=FAST)
    luksadmin.add_recovery_key(str(image), b"passphrase")[1][:] = b""
    tpm_slot = luksadmin.add_key(str(image), b"passphrase", b"tpm2 secret", pbkdf=FAST)
    token = luksadmin.import_token(
        str(image),
        {
            "type": "systemd-tpm2",
            "keyslots": [str(tpm_slot)],
            "tpm2-blob": base64.b64encode(b"\x00" * 64).decode(),
            "tpm2-pcrs": [7, 15],
            "tpm2-pcr-bank": "sha256",
            "tpm2-primary-alg": "ecc",
            "tpm2-policy-hash": policy,
            "tpm2-pin": False,
        },
    )

    config = tmp_path / "lczfs-unlockd.toml"
    config.write_text(
        f'pool = "{POOL}"\n[keystore]\nvolume = "{VOLUME}"\nmountpoint = "/bootsecrets"\n'
    )
    root = tmp_path / "initrd-root"
    for name, data in (
        ("etc/lczfs-unlockd.toml", config.read_bytes()),
        ("usr/lib/lczfs-unlockd/lczfs_unlockd/__init__.py", b""),
        ("usr/lib/systemd/system/lczfs-unlockd.service", b"[Unit]\n"),
        ("usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so", b""),
        # What the daemon loads to measure the unlock (tpm2.py, paths.py).
        ("usr/lib/x86_64-linux-gnu/libtss2-esys.so.0", b""),
        ("usr/lib/x86_64-linux-gnu/libtss2-tctildr.so.0", b""),
        ("usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0", b""),
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    initrd = tmp_path / "initrd.img"
    cpio(root, initrd)

    sysfs = tmp_path / "tpm0"

    def copy_pcrs() -> None:
        (sysfs / "pcr-sha256").mkdir(parents=True, exist_ok=True)
        for pcr in range(24):
            (sysfs / "pcr-sha256" / str(pcr)).write_text(tpm.pcr("sha256", pcr).hex().upper())

    copy_pcrs()
    probe = ops_status.Probe(
        metadata=lambda device: luksadmin.metadata(str(image) if device == DEVICE else device),
        exists=lambda p: p == DEVICE or Path(p).exists(),
        zfs_list=lambda pool: (
            f"{pool}/crypt\t{pool}/crypt\tfile:///bootsecrets/{pool}/crypt.key\thex\tavailable\n"
        ),
        journal=lambda: "",
        tpm_sysfs=str(sysfs),
        flags=(str(tmp_path / "checked"), str(tmp_path / "refused")),
    )
    argv = ["--config", str(config), "--initrd", str(initrd)]
    assert ops_status.main(argv, probe=probe) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"TPM2 token {token}: will unseal at the next boot" in out
    assert "zstd" in out and "this config" in out and "recovery key: yes" in out

    assert ops_status.main([*argv, "--json"], probe=probe) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["keystore"]["luks_version"] == 2
    assert data["tpm2"]["tokens"][0]["predicted"] == policy
    assert data["warnings"] == []

    extend(tpm, 7, b"a firmware update")
    copy_pcrs()
    assert ops_status.main(argv, probe=probe) == 1
    out = capsys.readouterr().out
    assert f"TPM2 policy of token {token} will not match the next boot: PCR 7 changed" in out

    # Without the TCTI module GNU cpio packed, the measurement fails: exit 2.
    (root / "usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0").unlink()
    (tmp_path / "early").rename(tmp_path / "early-old")
    cpio(root, initrd)
    assert ops_status.main(argv, probe=probe) == 2
    out = capsys.readouterr().out
    assert f"initrd {initrd} does not contain the tpm2-tss library libtss2-tcti-device" in out
