"""``lczfs-unlockd status`` against a fake machine: every warning and exit code.

The machine is a :class:`ops_status.Probe` of fakes: a LUKS header's JSON
(parsed by the real luksadmin.parse_metadata), ``zfs list`` output, a sysfs
directory of PCR files, journal JSON lines and an initrd built here as a
real newc cpio archive (written by this file's own small writer, read by the
module's parser).  The expected TPM2 policy digests are systemd's own test
vectors (src/test/test-tpm2.c) or computed here with hashlib, step by step.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lczfs_unlockd import cli, luksadmin, ops_status, tpm2policy
from lczfs_unlockd.errors import CommandError

POOL = "rpool"
VOLUME = "rpool/volumes/bootsecrets"
DEVICE = f"/dev/zvol/{VOLUME}-part1"
SYSFS = "sys/class/tpm/tpm0"
PCR7 = hashlib.sha256(b"secure boot db").digest()
PCR15_NOW = hashlib.sha256(b"the daemon measured this boot").digest()
ZERO = bytes(32)


# --- the pieces of a machine ----------------------------------------------------------


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data), ended by TRAILER!!!."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + raw
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


def reg(name: str, data: bytes = b"x") -> tuple[str, int, bytes]:
    return (name, stat.S_IFREG | 0o644, data)


def link(name: str, target: str) -> tuple[str, int, bytes]:
    return (name, stat.S_IFLNK | 0o777, target.encode())


CONFIG_TEXT = f'pool = "{POOL}"\n[keystore]\nvolume = "{VOLUME}"\nmountpoint = "/bootsecrets"\n'


TSS2 = ("libtss2-esys.so.0", "libtss2-tctildr.so.0", "libtss2-tcti-device.so.0")


def initrd_entries(
    config: bytes, *, daemon: bool = True, unit: bool = True, plugin: bool = True,
    tss2: tuple[str, ...] = TSS2,
):  # fmt: skip
    entries = [("etc", stat.S_IFDIR | 0o755, b""), reg("etc/lczfs-unlockd.toml", config)]
    entries += [reg(f"usr/lib/x86_64-linux-gnu/{lib}", b"\x7fELF") for lib in tss2]
    if daemon:
        entries.append(reg("usr/lib/lczfs-unlockd/lczfs_unlockd/__init__.py", b'"""x"""\n'))
    if unit:
        entries.append(reg("usr/lib/systemd/system/lczfs-unlockd.service", b"[Unit]\n"))
    if plugin:
        entries.append(reg("usr/lib/cryptsetup/libcryptsetup-token-systemd-tpm2.so", b"\x7fELF"))
    return entries


def policy(pcrs: dict[int, bytes], *, pin: bool = False, bank: str = "sha256") -> str:
    """PolicyPCR (+ PolicyAuthValue) written out here, independent of tpm2policy."""
    bitmap = sum(1 << p for p in pcrs).to_bytes(3, "little")
    alg = {"sha1": 4, "sha256": 11}[bank]
    selection = struct.pack(">IHB", 1, alg, 3) + bitmap
    values = hashlib.sha256(b"".join(pcrs[p] for p in sorted(pcrs))).digest()
    digest = hashlib.sha256(ZERO + b"\x00\x00\x01\x7f" + selection + values).digest()
    if pin:
        digest = hashlib.sha256(digest + b"\x00\x00\x01\x6b").digest()
    return digest.hex()


def tpm2_token(slot: int, pcrs: list[int], policy_hash: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "systemd-tpm2",
        "keyslots": [str(slot)],
        "tpm2-blob": "AAAA",
        "tpm2-pcrs": pcrs,
        "tpm2-pcr-bank": "sha256",
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": policy_hash,
        "tpm2-pin": False,
        **extra,
    }


@dataclass
class Machine:
    """What the Probe sees; each test changes what it needs."""

    root: Path
    keyslots: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)
    zfs: str = ""
    journal: str = ""
    existing: set[str] = field(default_factory=set)
    now: float = 1_800_000_000.0
    zfs_error: Exception | None = None
    boot_time: float = 0.0  # unknown: no boot-chain warning unless a test sets it
    release: str = "6.1.0-test"

    @property
    def config_path(self) -> Path:
        return self.root / "lczfs-unlockd.toml"

    @property
    def initrd(self) -> Path:
        return self.root / "boot" / "initrd.img"

    @property
    def sysfs(self) -> Path:
        return self.root / SYSFS

    def set_pcr(self, pcr: int, value: bytes, bank: str = "sha256") -> None:
        d = self.sysfs / f"pcr-{bank}"
        d.mkdir(parents=True, exist_ok=True)
        (d / str(pcr)).write_text(value.hex().upper() + "\n")

    def write_initrd(self, data: bytes) -> None:
        self.initrd.parent.mkdir(exist_ok=True)
        self.initrd.write_bytes(data)

    def metadata(self, device: str) -> luksadmin.Metadata:
        assert device == DEVICE
        text = json.dumps({"keyslots": self.keyslots, "tokens": self.tokens})
        meta = luksadmin.parse_metadata(text, device)
        return luksadmin.Metadata(device, 2, "0b5d8a2e-0000", meta.keyslots, meta.tokens)

    def zfs_list(self, pool: str) -> str:
        assert pool == POOL
        if self.zfs_error is not None:
            raise self.zfs_error
        return self.zfs

    def probe(self) -> ops_status.Probe:
        return ops_status.Probe(
            metadata=self.metadata,
            exists=lambda p: (
                p in self.existing or (p.startswith(str(self.root)) and Path(p).exists())
            ),
            zfs_list=self.zfs_list,
            journal=lambda: self.journal,
            initrds=lambda: [str(self.initrd)],
            tpm_sysfs=str(self.sysfs),
            now=lambda: self.now,
            release=lambda: self.release,
            boot_time=lambda: self.boot_time,
            flags=(str(self.root / "root-checked"), str(self.root / "root-refused")),
        )

    def status(self, *args: str) -> tuple[int, dict[str, Any]]:
        st = ops_status.collect(
            str(self.config_path),
            initrd=None,
            journal="--no-journal" not in args,
            probe=self.probe(),
        )
        return st.data["exit"], st.data

    def text(self, capsys, *args: str) -> tuple[int, str]:
        code = ops_status.main(["--config", str(self.config_path), *args], probe=self.probe())
        return code, capsys.readouterr().out


def slot(kdf: str = "argon2id", priority: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "luks2", "kdf": {"type": kdf}}
    if priority is not None:
        out["priority"] = priority
    return out


@pytest.fixture
def m(tmp_path) -> Machine:
    """The seed layout with TPM2: passphrase slot 0, recovery key slot 1, a TPM2
    token on PCRs 7+15 in slot 2, an initrd with all of it, PCR 15 moved."""
    mach = Machine(tmp_path)
    mach.config_path.write_text(CONFIG_TEXT)
    mach.existing.add(DEVICE)
    mach.keyslots = {"0": slot(), "1": slot("pbkdf2"), "2": slot("pbkdf2")}
    mach.tokens = {
        "0": {"type": "systemd-recovery", "keyslots": ["1"]},
        "1": tpm2_token(2, [7, 15], policy({7: PCR7, 15: ZERO})),
    }
    mach.set_pcr(7, PCR7)
    mach.set_pcr(15, PCR15_NOW)  # the daemon extended it in this boot
    mach.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode())))
    mach.zfs = (
        f"{POOL}\t-\tnone\tnone\t-\n"
        f"{POOL}/crypt\t{POOL}/crypt\tfile:///bootsecrets/{POOL}/crypt.key\thex\tavailable\n"
        f"{POOL}/crypt/root\t{POOL}/crypt\tnone\thex\tavailable\n"
        f"{POOL}/other\t{POOL}/other\tprompt\tpassphrase\tunavailable\n"
    )
    return mach


def has(data: dict[str, Any], phrase: str) -> bool:
    return any(phrase in w for w in data["warnings"])


# --- the TPM2 policy arithmetic ------------------------------------------------------------


def test_policy_pcr_matches_systemds_test_vectors():
    values = {
        4: bytes.fromhex("368f85b3013041dfe203faaa364f00b07c5da7b1e5f1dbf2efb06fa6b9bd92de"),
        7: bytes.fromhex("aa1154c9e0a774854ccbed4c8ce7e9b906b3d700a1a8db1772d0341a62dbe51b"),
        8: bytes.fromhex("cfde439a2c06af3479ca6bdc60429b90553d65300c5cfcc40004a08c6b5ad81a"),
    }
    first = tpm2policy.policy_pcr(ZERO, "sha256", values)
    assert first.hex() == "76532a0e16f7e6bf6b02918c11f75d99d729fab0cc81d0df2c4284a2c4fe6e05"
    second = tpm2policy.policy_pcr(first, "sha256", values)
    assert second.hex() == "97e64bcabb64c1fa4b726528644926c8029f5b4458b0575c98c04fe225629a0b"


def test_policy_auth_value_matches_systemds_test_vectors():
    once = tpm2policy.policy_auth_value(ZERO)
    assert once.hex() == "8fcd2169ab92694e0c633f1ab772842b8241bbc20288981fc7ac1eddc1fddb0e"
    twice = tpm2policy.policy_auth_value(once)
    assert twice.hex() == "759ebd5ed65100e0b4aa2d04b4b789c2672d92ecc9cdda4b5fa16a303132e008"


def test_sealing_policy_order_and_empty_selection():
    values = {7: PCR7, 15: ZERO}
    assert tpm2policy.sealing_policy("sha256", values, pin=False).hex() == policy(values)
    assert tpm2policy.sealing_policy("sha256", values, pin=True).hex() == policy(values, pin=True)
    # No PCR: no PolicyPCR at all; a PIN alone is PolicyAuthValue from zero.
    assert tpm2policy.sealing_policy("sha256", {}, pin=False) == ZERO
    assert tpm2policy.sealing_policy("sha256", {}, pin=True) == tpm2policy.policy_auth_value(ZERO)
    sha1 = {7: hashlib.sha1(b"a").digest()}
    assert tpm2policy.sealing_policy("sha1", sha1, pin=False).hex() == policy(sha1, bank="sha1")


def test_policy_refuses_wrong_sizes_and_pcrs():
    with pytest.raises(ValueError, match="a sha256 value has 32"):
        tpm2policy.policy_pcr(ZERO, "sha256", {7: b"short"})
    with pytest.raises(ValueError, match="out of range"):
        tpm2policy.pcr_selection("sha256", [24])
    with pytest.raises(ValueError, match="64 hex digits"):
        tpm2policy.parse_pcr_value("abcd\n", "sha256")
    with pytest.raises(ValueError, match="not hexadecimal"):
        tpm2policy.parse_pcr_value("zz" * 32, "sha256")
    assert tpm2policy.parse_pcr_value(PCR7.hex().upper() + "\n", "sha256") == PCR7


# --- the verdict -----------------------------------------------------------------------------


def test_tpm2_match_is_unattended(m, capsys):
    code, data = m.status()
    assert code == 0 and data["unattended"] is True, data["warnings"]
    assert set(data) >= {
        "config", "keystore", "datasets", "tpm2", "armed", "initrd", "last_boot", "warnings",
        "unattended", "exit",
    }  # fmt: skip
    assert data["warnings"] == []
    token = data["tpm2"]["tokens"][0]
    assert token["prediction"] == "match" and token["predicted"] == policy({7: PCR7, 15: ZERO})
    assert data["keystore"]["recovery_key"] is True
    assert data["keystore"]["human_slots"] == [0, 1]
    code, out = m.text(capsys)
    assert code == 0
    assert (
        "TPM2 token 1: will unseal at the next boot if the firmware/boot chain is unchanged" in out
    )
    assert "verdict: the next boot is expected to unlock unattended (TPM2 token 1) [exit 0]" in out


def test_json_output_is_the_same_document(m, capsys):
    code, out = m.text(capsys, "--json")
    data = json.loads(out)
    assert code == data["exit"] == 0
    assert data["tpm2"]["tokens"][0]["prediction"] == "match"


def test_pcr7_changed_warns_and_needs_a_person(m, capsys):
    m.set_pcr(7, hashlib.sha256(b"a new db entry").digest())
    code, data = m.status()
    assert code == 1 and not data["unattended"]
    assert has(data, "TPM2 policy of token 1 will not match the next boot: PCR 7 changed")
    assert has(data, "re-enroll: lczfs-unlockd enroll tpm2")
    assert data["tpm2"]["tokens"][0]["candidates"] == [7]
    _, out = m.text(capsys)
    assert "WARNING: TPM2 policy of token 1 will not match" in out
    assert "[exit 1]" in out


def test_the_measurement_pcr_is_predicted_zero_whatever_it_is_now(m):
    m.set_pcr(15, ZERO)
    assert m.status()[0] == 0
    m.set_pcr(15, hashlib.sha256(b"anything").digest())
    assert m.status()[0] == 0


def test_measure_pcr_configured_elsewhere(m):
    # measure_pcr = 14: PCR 15 is no longer zero at the unseal, and in the
    # running system systemd extends it after the unlock: unpredictable.
    m.config_path.write_text(CONFIG_TEXT + "measure_pcr = 14\n")
    m.write_initrd(newc(initrd_entries(m.config_path.read_bytes())))
    code, data = m.status()
    assert data["tpm2"]["measure_pcr"] == 14
    token = data["tpm2"]["tokens"][0]
    assert code == 1 and token["prediction"] == "unpredictable"
    assert "PCR 15 moves after the unlock" in token["detail"]
    assert has(data, "TPM2 token 1 is not bound to the measurement PCR 14")
    m.tokens["1"] = tpm2_token(2, [7, 14], policy({7: ZERO, 14: ZERO}))
    code, data = m.status()
    assert code == 1 and has(data, "TPM2 policy of token 1 will not match the next boot: PCR 7")
    m.config_path.write_text(CONFIG_TEXT + "measure_pcr = false\n")
    m.write_initrd(newc(initrd_entries(m.config_path.read_bytes())))
    assert m.status()[1]["tpm2"]["measure_pcr"] is None


def test_mismatch_on_the_measurement_pcr_alone(m):
    m.tokens["1"] = tpm2_token(2, [15], policy({15: PCR15_NOW}))
    code, data = m.status()
    assert code == 1 and data["tpm2"]["tokens"][0]["candidates"] == []
    assert has(data, "will not match the next boot: even with PCR 15 at zero")


def test_a_pin_needs_a_person(m):
    m.tokens["1"] = tpm2_token(
        2, [7, 15], policy({7: PCR7, 15: ZERO}, pin=True), **{"tpm2-pin": True}
    )
    code, data = m.status()
    assert data["tpm2"]["tokens"][0]["prediction"] == "match"
    assert code == 1 and data["warnings"] == []


def test_signed_and_pcrlock_policies_cannot_be_predicted(m, capsys):
    m.tokens["1"] = tpm2_token(2, [], "00" * 32, tpm2_pubkey="UEVN", tpm2_pubkey_pcrs=[11])
    m.tokens["3"] = tpm2_token(2, [], "00" * 32, tpm2_pcrlock=True)
    code, data = m.status()
    assert code == 1
    kinds = {t["token"]: (t["prediction"], t["policy"]) for t in data["tpm2"]["tokens"]}
    assert kinds == {1: ("unpredictable", "signed"), 3: ("unpredictable", "pcrlock")}
    _, out = m.text(capsys)
    assert "signed PCR policy: depends on the PCR signature" in out
    assert "pcrlock policy: depends on the pcrlock policy file" in out


def test_no_tpm(m):
    shutil.rmtree(m.sysfs)
    code, data = m.status()
    assert code == 1 and data["tpm2"]["present"] is False
    assert has(data, "no TPM2 on this machine")


def test_pcrs_not_in_sysfs(m):
    (m.sysfs / "pcr-sha256" / "7").unlink()
    code, data = m.status()
    assert code == 1 and has(data, "TPM2 token 1: cannot predict the next boot: cannot read PCR 7")


def test_sha1_bank(m):
    value = hashlib.sha1(b"db").digest()
    m.set_pcr(7, value, bank="sha1")
    m.tokens["1"] = tpm2_token(
        2, [7, 15], policy({7: value, 15: bytes(20)}, bank="sha1"), **{"tpm2-pcr-bank": "sha1"}
    )
    assert m.status()[0] == 0


def test_policy_hash_list_of_newer_systemd(m):
    # One digest in a list: as a plain one.
    m.tokens["1"]["tpm2-policy-hash"] = [policy({7: PCR7, 15: ZERO})]
    assert m.status()[0] == 0
    # Sharded: every shard must unseal, each sealed to its own policy; one
    # digest that matches proves nothing about the others.
    for hashes in (["ab" * 32, policy({7: PCR7, 15: ZERO})], [policy({7: PCR7, 15: ZERO})] * 2):
        m.tokens["1"]["tpm2-policy-hash"] = hashes
        code, data = m.status()
        assert code == 1 and data["tpm2"]["tokens"][0]["prediction"] == "unpredictable"


def test_hostile_token_fields_are_no_traceback(m, capsys):
    m.tokens["1"]["tpm2-pcrs"] = "7; rm -rf /"
    m.tokens["1"]["tpm2-pcr-bank"] = "SHA256\x1b[2J\x1b]0;pwned\x07" + "A" * 100_000
    m.tokens["1"]["tpm2-policy-hash"] = {"x": 1}
    code, data = m.status()
    assert code == 1 and data["tpm2"]["tokens"][0]["prediction"] == "unknown"
    # The screen, not a json.dumps (which escapes control characters itself).
    code, out = m.text(capsys)
    assert code == 1 and "\x1b" not in out and "\x07" not in out
    line = next(x for x in out.splitlines() if x.startswith("  token 1:"))
    assert "(SHA256… (" in line and len(line) < 400  # bounded, the escapes cut or shown
    code, out = m.text(capsys, "--json")
    assert "\x1b" not in json.loads(out)["keystore"]["tokens"][1]["bank"]


@pytest.mark.parametrize("digit", ["\u00b2", "\u0663", "9" * 5000, "+7", " 7"])
def test_non_ascii_numbers_from_the_header(m, digit):
    m.tokens["1"]["tpm2-pcrs"] = [digit]
    assert m.status()[1]["tpm2"]["tokens"][0]["prediction"] == "unknown"
    armed_layout(m, m.now + 3600)
    m.tokens["5"]["lczfs_tpm2_token"] = digit
    code, data = m.status()
    assert data["armed"]["armed"] is False and has(data, "the daemon will not use")
    # luksadmin's own numbers (key slot keys): no traceback ("²" is refused
    # there with a ValueError; luksadmin takes "٣" as 3, which is its own matter).
    m.keyslots[digit] = slot()
    code, data = m.status()
    if digit == "\u00b2":
        assert code == 2 and has(data, "cannot read the LUKS header")


@pytest.mark.parametrize(
    "text", ["aa bb cc" + "dd" * 28 + "\n", "\u00e9" * 64, "0x" + "00" * 31, "00" * 32 + " \n"]
)
def test_sysfs_pcr_must_be_exact_hex(m, text):
    (m.sysfs / "pcr-sha256" / "7").write_text(text)
    code, data = m.status()
    assert code == 1 and data["tpm2"]["tokens"][0]["prediction"] == "unknown"
    assert has(data, "cannot read PCR 7")


@pytest.mark.parametrize(
    ("pcr", "why"),
    [(10, "IMA"), (11, "systemd-pcrphase"), (16, "debug"), (23, "application")],
)
def test_pcrs_that_move_after_the_unlock_are_unpredictable(m, pcr, why):
    m.set_pcr(pcr, PCR7)
    m.tokens["1"] = tpm2_token(2, [7, pcr, 15], policy({7: PCR7, pcr: PCR7, 15: ZERO}))
    code, data = m.status()
    token = data["tpm2"]["tokens"][0]
    assert code == 1 and token["prediction"] == "unpredictable", data["warnings"]
    assert why in token["detail"] and "unpredictable from the running system" in token["detail"]
    assert not has(data, "will not match")


def test_initrd_written_after_this_boot_for_pcr_4_and_9(m):
    m.set_pcr(9, PCR15_NOW)
    m.tokens["1"] = tpm2_token(2, [7, 9, 15], policy({7: PCR7, 9: PCR15_NOW, 15: ZERO}))
    m.boot_time = m.initrd.stat().st_mtime + 60  # the initrd predates this boot
    assert m.status()[0] == 0
    m.boot_time = m.initrd.stat().st_mtime - 60  # rebuilt since
    code, data = m.status()
    assert code == 1 and has(data, "was written after this boot started")
    m.tokens["1"] = tpm2_token(2, [7, 15], policy({7: PCR7, 15: ZERO}))
    assert m.status()[0] == 0  # PCR 7 alone does not measure the initrd


def test_measure_pcr_off_while_a_token_pins_pcr_15(m):
    m.config_path.write_text(CONFIG_TEXT + "measure_pcr = false\n")
    m.write_initrd(newc(initrd_entries(m.config_path.read_bytes())))
    m.set_pcr(15, ZERO)
    _, data = m.status()
    assert has(data, "TPM2 token 1 includes PCR 15 but keystore.measure_pcr = false")
    assert data["tpm2"]["tokens"][0]["prediction"] == "unpredictable"


def test_token_without_the_measurement_pcr_warns(m):
    m.tokens["1"] = tpm2_token(2, [7], policy({7: PCR7}))
    code, data = m.status()
    assert code == 0 and has(data, "TPM2 token 1 is not bound to the measurement PCR 15")


@pytest.mark.parametrize(
    ("keyslots", "phrase"),
    [
        (["9"], "TPM2 token 1 is not used at boot: none of its key slots exists"),
        ([], "token 1 (systemd-tpm2, key slot none) is a leftover of a one-time unlock"),
    ],
)
def test_tpm2_token_without_an_existing_slot_does_not_count(m, keyslots, phrase):
    m.tokens["1"]["keyslots"] = keyslots
    code, data = m.status()
    assert code == 1 and data["unattended_by"] == [] and has(data, phrase), data["warnings"]


def test_tpm2_token_on_a_priority_ignore_slot_does_not_count(m):
    m.keyslots["2"] = slot("argon2id", priority=0)  # not pbkdf2: no one-time leftover
    code, data = m.status()
    assert code == 1 and has(data, "priority ignore")


def test_clevis_and_priority_ignore_slots_are_not_human(m):
    m.keyslots = {"0": slot(priority=0), "1": slot(), "2": slot("pbkdf2")}
    m.tokens["3"] = {"type": "clevis", "keyslots": ["1"], "jwe": {}}
    m.tokens["0"] = {"type": "systemd-recovery", "keyslots": ["2"]}
    m.tokens["1"] = tpm2_token(2, [7, 15], policy({7: PCR7, 15: ZERO}))
    code, data = m.status()
    assert data["keystore"]["human_slots"] == []
    assert code == 2 and has(data, "only token-bound key slots")


def test_measure_pcr_required_without_a_tpm_is_broken(m):
    text = CONFIG_TEXT + 'unlock = ["keyfile", "passphrase"]\nkeyfile = "/etc/ks.key"\n'
    m.tokens.pop("1")
    shutil.rmtree(m.sysfs)
    for extra, want in (("", 0), ("measure_pcr = 15\n", 2)):
        m.config_path.write_text(text + extra)
        m.write_initrd(newc([*initrd_entries((text + extra).encode()), reg("etc/ks.key", b"k")]))
        code, data = m.status()
        assert code == want, data["warnings"]
    assert has(data, "requires the measurement: the daemon will fail the unlock")


@pytest.mark.parametrize("missing", TSS2)
def test_initrd_without_the_tss2_libraries_is_broken(m, missing):
    libs = tuple(x for x in TSS2 if x != missing)
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode(), tss2=libs)))
    code, data = m.status()
    name = missing.removesuffix(".so.0")
    assert code == 2 and has(data, f"does not contain the tpm2-tss library {name}")
    assert has(data, f"initrd {m.initrd} does not contain")
    # Neither a TPM2 token nor a required measurement: not needed.
    m.tokens.pop("1")
    assert not has(m.status()[1], "tpm2-tss")


def test_no_recovery_key_warns(m):
    del m.tokens["0"]
    code, data = m.status()
    assert has(data, "no recovery key")
    assert code == 0  # a warning, not a reason to fail the next boot
    assert data["keystore"]["recovery_key"] is False


def test_only_token_bound_key_slots_is_broken(m, capsys):
    m.keyslots = {"2": slot("pbkdf2")}
    m.tokens = {"1": m.tokens["1"]}
    code, data = m.status()
    assert code == 2 and has(data, "only token-bound key slots")
    _, out = m.text(capsys)
    assert "WARNING: DANGER: the keystore" in out and "token-bound" in out


def test_fido2_and_pkcs11_need_a_person(m, capsys):
    m.tokens = {
        "0": {"type": "systemd-recovery", "keyslots": ["1"]},
        "1": {"type": "systemd-fido2", "keyslots": ["2"], "fido2-clientPin-required": True},
        "2": {"type": "systemd-pkcs11", "keyslots": ["0"], "pkcs11-uri": "pkcs11:token=a\nb"},
    }
    assert m.status()[0] == 1
    _, out = m.text(capsys)
    assert "FIDO2 (PIN, touch)" in out and "PKCS#11 pkcs11:token=a\\nb" in out


# --- config and keystore --------------------------------------------------------------------------


def test_invalid_config_is_broken(m, capsys):
    m.config_path.write_text('pool = "rpool"\n')
    code, data = m.status()
    assert code == 2 and data["config"]["valid"] is False
    assert data["keystore"] is None and has(data, "the configuration is not usable")
    code, out = m.text(capsys)
    assert code == 2 and "INVALID" in out


def test_missing_config_is_broken(m):
    m.config_path.unlink()
    code, data = m.status()
    assert code == 2 and "does not exist" in data["config"]["error"]


def test_missing_keystore_is_broken(m):
    m.existing.discard(DEVICE)
    code, data = m.status()
    assert code == 2 and has(data, f"keystore {DEVICE} does not exist")


def test_unreadable_header_is_broken(m):
    def boom(device):
        raise luksadmin.LuksAdminError(f"{device}: cannot read the LUKS header: bad\nline")

    probe = m.probe()
    probe.metadata = boom
    st = ops_status.collect(str(m.config_path), probe=probe)
    assert st.data["exit"] == 2
    assert any("cannot read the LUKS header" in w and "\\n" in w for w in st.warnings)


# --- the one-time unlock ----------------------------------------------------------------------------


def armed_layout(m: Machine, expires: float) -> None:
    m.keyslots["3"] = slot("pbkdf2", priority=0)  # arm-reboot sets priority ignore
    m.tokens["1"] = tpm2_token(2, [7, 15], "ab" * 32)  # the normal token: mismatch now
    m.tokens["4"] = tpm2_token(3, [7, 15], policy({7: PCR7, 15: ZERO}))
    m.tokens["5"] = {
        "type": "lczfs-armed",
        "keyslots": ["3"],
        "lczfs_tpm2_token": "4",
        "armed_at": int(m.now) - 60,
        "expires": int(expires),
    }


def test_armed_unlock_is_unattended(m, capsys):
    armed_layout(m, m.now + 3600)
    code, data = m.status()
    assert code == 0, data["warnings"]
    assert data["armed"]["armed"] is True and data["armed"]["token"] == 4
    assert data["armed"]["expires_iso"] == "2027-01-15T09:00:00Z"
    assert data["unattended_by"] == ["the one-time TPM2 unlock (arm-reboot, token 4)"]
    _, out = m.text(capsys)
    assert "one-time unlock (arm-reboot): armed, key slot 3 (token 4)" in out


def test_expired_armed_unlock_warns(m):
    armed_layout(m, m.now - 1)
    code, data = m.status()
    assert code == 1 and data["armed"]["expired"] is True
    assert has(data, "expired")


def test_broken_armed_marker_warns(m):
    armed_layout(m, m.now + 3600)
    m.tokens["5"]["lczfs_tpm2_token"] = "9"
    code, data = m.status()
    assert has(data, "lczfs-armed marker the daemon will not use")
    # The daemon's token method never tries a token any marker names, by
    # number or through its key slot (keystore._marker_tokens): not token 4.
    assert code == 1 and data["unattended_by"] == []
    m.tokens["5"]["lczfs_tpm2_token"] = "4"
    m.tokens["5"]["expires"] = "tomorrow"
    assert m.status()[1]["unattended_by"] == []


NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"note": "x"}, "fields are not exactly"),
        ({"armed_at": None}, "fields are not exactly"),
        ({"expires": NOW - 60 + 30 * 86400}, "at most 7 days"),
        ({"armed_at": True}, "armed_at is not a time"),
        ({"lczfs_tpm2_token": "5"}, "names the marker itself"),
    ],
)
def test_armed_marker_is_checked_as_the_daemon_checks_it(m, change, why):
    armed_layout(m, NOW + 3600)
    m.tokens["5"].update(change)
    m.tokens["5"] = {k: v for k, v in m.tokens["5"].items() if v is not None}
    m.config_path.write_text(CONFIG_TEXT + 'unlock = ["passphrase"]\n')
    m.write_initrd(newc(initrd_entries(m.config_path.read_bytes())))
    code, data = m.status()
    assert code == 1 and data["unattended_by"] == [] and has(data, why), data["warnings"]


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.keyslots.update({"3": slot("pbkdf2")}),  # priority normal
        lambda m: m.keyslots.update({"3": slot("argon2id", priority=0)}),
        lambda m: m.tokens.update({"6": {"type": "systemd-recovery", "keyslots": ["3"]}}),
        lambda m: m.tokens["4"].update({"keyslots": ["3", "2"]}),
    ],
)
def test_armed_slot_is_checked_as_the_daemon_checks_it(m, change):
    armed_layout(m, m.now + 3600)
    change(m)
    _, data = m.status()
    assert data["armed"]["armed"] is False and has(data, "the daemon will not use")


def test_armed_needs_the_plugin_and_no_pin(m):
    armed_layout(m, m.now + 3600)
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode(), plugin=False)))
    assert m.status()[0] == 1
    armed_layout(m, m.now + 3600)
    m.tokens["4"] = tpm2_token(
        3, [7, 15], policy({7: PCR7, 15: ZERO}, pin=True), **{"tpm2-pin": True}
    )
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode())))
    code, data = m.status()
    assert code == 1 and data["unattended_by"] == []


def test_one_time_leftovers_warn(m):
    m.keyslots["3"] = slot("pbkdf2", priority=0)
    m.tokens["4"] = tpm2_token(3, [7, 15], "ab" * 32)  # T without its marker
    m.tokens["6"] = {"type": "lczfs-armed", "keyslots": [], "lczfs_tpm2_token": "4",
                     "armed_at": 1, "expires": 2}  # fmt: skip
    code, data = m.status()
    assert code == 0, data["warnings"]
    for n in (4, 6):
        assert any(
            w.startswith(f"token {n} (")
            and "leftover of a one-time unlock: run lczfs-unlockd disarm" in w
            for w in data["warnings"]
        )


# --- the encryption roots ---------------------------------------------------------------------------


def test_auto_picks_the_roots_under_the_mount_point(m, capsys):
    data = m.status()[1]["datasets"]
    assert data["targets"] == [f"{POOL}/crypt"]
    assert [r["name"] for r in data["encryption_roots"]] == [f"{POOL}/crypt", f"{POOL}/other"]
    _, out = m.text(capsys)
    assert f"{POOL}/crypt  keylocation=file:///bootsecrets/{POOL}/crypt.key" in out
    assert "<- auto" in out


def test_auto_with_nothing_to_load_is_broken(m):
    m.zfs = f"{POOL}/other\t{POOL}/other\tprompt\tpassphrase\tunavailable\n"
    code, data = m.status()
    assert code == 2 and has(data, "no encryption root of rpool has its keylocation under")


def test_configured_datasets(m):
    m.config_path.write_text(
        f'pool = "{POOL}"\ndatasets = ["{POOL}/crypt", "{POOL}/gone"]\n'
        + CONFIG_TEXT.split("\n", 1)[1]
    )
    m.write_initrd(newc(initrd_entries(m.config_path.read_bytes())))
    code, data = m.status()
    assert code == 2 and has(data, f"datasets: {POOL}/gone does not exist")
    assert [e["exists"] for e in data["datasets"]["configured"]] == [True, False]
    m.config_path.write_text(
        f'pool = "{POOL}"\ndatasets = ["{POOL}/crypt/root"]\n' + CONFIG_TEXT.split("\n", 1)[1]
    )
    m.write_initrd(newc(initrd_entries(m.config_path.read_bytes())))
    code, data = m.status()
    assert code == 2 and has(data, "is not an encryption root")


def test_forged_zfs_output_is_refused_not_a_traceback(m):
    m.zfs += f"{POOL}/x\t{POOL}/x\tfile:///bootsecrets/a\nb\thex\tavailable\n"
    code, data = m.status()
    assert data["datasets"]["error"] and "not 5 tab-separated fields" in data["datasets"]["error"]
    assert code == 1 and has(data, "cannot list the datasets of pool rpool")
    m.zfs = "otherpool/x\t-\tnone\tnone\t-\n"
    assert "unasked or twice" in m.status()[1]["datasets"]["error"]


def test_zfs_failure(m):
    m.zfs_error = CommandError("zfs list -r rpool", 1, "cannot open 'rpool': no such pool")
    code, data = m.status()
    assert code == 1 and "no such pool" in data["datasets"]["error"]


def test_dataset_names_are_escaped(m, capsys):
    m.zfs += f"{POOL}/\x1b[2J\t{POOL}/\x1b[2J\tprompt\tpassphrase\tunavailable\n"
    _, out = m.text(capsys)
    assert "\x1b" not in out and f"{POOL}/\\x1b[2J" in out


# --- the initrd ----------------------------------------------------------------------------------


def test_initrd_without_the_daemon_is_broken(m):
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode(), daemon=False)))
    code, data = m.status()
    assert code == 2
    assert has(data, f"initrd {m.initrd} does not contain the daemon (lczfs_unlockd/__init__.py)")
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode(), unit=False)))
    assert has(m.status()[1], "does not contain the unit lczfs-unlockd.service")


def test_initrd_with_another_config_is_broken(m):
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode() + b"# old\n")))
    code, data = m.status()
    assert code == 2 and has(data, "has another config than")
    assert has(data, "rebuild it (dracut --force / nixos-rebuild boot)")
    assert data["initrd"]["config"] == "different"


def test_initrd_without_a_config(m):
    entries = [e for e in initrd_entries(b"") if e[0] != "etc/lczfs-unlockd.toml"]
    m.write_initrd(newc(entries))
    code, data = m.status()
    assert code == 2 and has(data, "does not contain the config /etc/lczfs-unlockd.toml")


def test_initrd_without_the_tpm2_plugin(m):
    m.write_initrd(newc(initrd_entries(CONFIG_TEXT.encode(), plugin=False)))
    code, data = m.status()
    assert code == 1 and has(data, "does not contain the TPM2 token plugin")


def test_no_initrd_found(m):
    m.initrd.unlink()
    code, data = m.status()
    assert code == 1 and has(data, "no initrd found") and data["initrd"]["found"] is False


def test_nixos_symlinked_config(m):
    store = "nix/store/abc-lczfs-unlockd.toml"
    entries = [e for e in initrd_entries(b"") if e[0] != "etc/lczfs-unlockd.toml"]
    entries += [reg(store, CONFIG_TEXT.encode()), link("etc/lczfs-unlockd.toml", "/" + store)]
    m.write_initrd(newc(entries))
    assert m.status()[0] == 0


def test_symlink_loop_is_missing_not_a_hang(m):
    entries = [e for e in initrd_entries(b"") if e[0] != "etc/lczfs-unlockd.toml"]
    entries += [link("etc/lczfs-unlockd.toml", "a"), link("etc/a", "lczfs-unlockd.toml")]
    m.write_initrd(newc(entries))
    assert m.status()[1]["initrd"]["config"] == "missing"


def test_gzip_main_archive_after_an_early_microcode_cpio(m):
    early = newc([reg("kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 100)])
    main = gzip.compress(newc(initrd_entries(CONFIG_TEXT.encode())))
    m.write_initrd(early + bytes(512 - len(early) % 512) + main + bytes(300))
    code, data = m.status()
    assert code == 0, data["warnings"]
    assert data["initrd"]["compression"] == "gzip"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_main_archive(m):
    packed = subprocess.run(
        ["zstd", "-q", "-c"], input=newc(initrd_entries(CONFIG_TEXT.encode())),
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    m.write_initrd(newc([reg("early.bin")]) + packed + bytes(1000))
    code, data = m.status()
    assert code == 0, data["warnings"]
    assert data["initrd"]["compression"] == "zstd"
    m.write_initrd(packed[:-30])
    code, data = m.status()
    assert code == 2 and has(data, "cannot read it"), data["warnings"]


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_legacy_lz4_main_archive_with_padding(m):
    packed = subprocess.run(
        ["lz4", "-l", "-q", "-c"], input=newc(initrd_entries(CONFIG_TEXT.encode())),
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    m.write_initrd(packed + bytes(512))
    code, data = m.status()
    assert code == 0, data["warnings"]
    assert data["initrd"]["compression"] == "lz4"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not an archive at all", "neither a cpio archive nor a known compression"),
        (newc([reg("a", b"abc" * 100)])[:200], "runs past the end"),
        (newc([reg("a", b"abc")])[:-20], "ends without its TRAILER!!!"),
        (b"070701" + b"Z" * 104, "not hexadecimal"),
        (gzip.compress(b"garbage" * 10), "is not cpio"),
        (b"\x1f\x8b" + b"\x00" * 50, "cannot unpack its gzip archive"),
    ],
)
def test_damaged_initrds_are_reported(m, data, why):
    m.write_initrd(data)
    code, status = m.status()
    assert code == 2 and has(status, "cannot read it") and has(status, why), status["warnings"]


def test_key_file_in_the_initrd_is_unattended(m):
    m.tokens = {"0": {"type": "systemd-recovery", "keyslots": ["1"]}}
    shutil.rmtree(m.sysfs)
    text = CONFIG_TEXT + 'keyfile = "/etc/keystore.key"\n'
    m.config_path.write_text(text)
    m.write_initrd(newc(initrd_entries(text.encode())))
    code, data = m.status()
    assert code == 1 and data["initrd"]["keyfile"] is False
    m.write_initrd(newc([*initrd_entries(text.encode()), reg("etc/keystore.key", b"k" * 64)]))
    code, data = m.status()
    assert code == 0 and data["unattended_by"] == ["the key file /etc/keystore.key in the initrd"]


# --- the last boot -------------------------------------------------------------------------------


def journal(*messages: str | list[int]) -> str:
    return "\n".join(json.dumps({"MESSAGE": msg, "PRIORITY": "6"}) for msg in messages) + "\n"


def test_last_boot_success_and_timings(m, capsys):
    m.journal = journal(
        "importing pool rpool ...",
        "importing pool rpool: done in 0.81 s",
        "keystore opened with token",
        "opening the keystore: done in 1.20 s",
        "not json",
        "unlocked rpool/crypt (hex); root checked (rpool/crypt/root); measured into PCR 15 "
        "(sha256) in 2.4 s; keystore closed",
    ).replace('"not json"}', "")
    (m.root / "root-checked").write_text("")
    code, data = m.status()
    lb = data["last_boot"]
    assert code == 0 and lb["result"] == "unlocked" and lb["elapsed"] == 2.4
    assert lb["keystore_method"] == "token" and lb["root_checked"] and not lb["root_refused"]
    assert lb["steps"] == [
        {"step": "importing pool rpool", "seconds": 0.81},
        {"step": "opening the keystore", "seconds": 1.2},
    ]
    _, out = m.text(capsys)
    assert "last boot: unlocked rpool/crypt (hex)" in out
    assert "steps: importing pool rpool 0.81 s, opening the keystore 1.20 s" in out


def test_last_boot_failure_warns(m):
    m.journal = journal(list(b"failed: cannot open the keystore\x1b[0m; nothing is left open"))
    (m.root / "root-refused").write_text("")
    code, data = m.status()
    assert data["last_boot"]["result"] == "failed"
    assert has(data, "the daemon failed in this boot: failed: cannot open the keystore\\x1b[0m")
    assert has(data, "the root check refused this boot's root")
    assert code == 0  # the verdict is about the next boot


def test_no_journal(m, capsys):
    def boom():
        raise AssertionError("the journal must not be read")

    probe = m.probe()
    probe.journal = boom
    assert ops_status.main(["--config", str(m.config_path), "--no-journal"], probe=probe) == 0
    assert "journal not read (--no-journal)" in capsys.readouterr().out


def test_journal_failure_is_shown(m):
    probe = m.probe()

    def fail() -> str:
        raise CommandError("journalctl -b", 1, "No journal files were found.")

    probe.journal = fail
    st = ops_status.collect(str(m.config_path), probe=probe)
    assert "No journal files were found." in st.data["last_boot"]["error"]


# --- the command line ------------------------------------------------------------------------------


def test_help_is_enough_on_its_own(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "lczfs-unlockd status" in out and "exit status: 0" in out and "--initrd" in out


def test_default_initrds(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    found = ops_status.default_initrds(str(boot))
    assert found[0] == "/nix/var/nix/profiles/system/initrd"
    assert found[2:] == [str(boot / "initrd.img")]
    for age, name in ((300, "initrd.img-6.1.0-old"), (100, "initramfs-6.9.0.img"),
                      (200, "initrd.img-6.5.0")):  # fmt: skip
        (boot / name).write_bytes(b"")
        t = 1_700_000_000 - age
        import os

        os.utime(boot / name, (t, t))
    found = ops_status.default_initrds(str(boot))
    assert found[2:] == [str(boot / n) for n in
                         ("initrd.img", "initramfs-6.9.0.img", "initrd.img-6.5.0",
                          "initrd.img-6.1.0-old")]  # fmt: skip


def test_default_initrd_of_another_kernel_warns(m):
    real = m.initrd.parent / "initrd.img-6.9.0"
    m.initrd.rename(real)
    m.initrd.symlink_to(real.name)  # Debian's /boot/initrd.img
    code, data = m.status()
    assert code == 0 and has(data, "not the running kernel's (6.1.0-test)")
    m.release = "6.9.0"
    assert m.status()[1]["warnings"] == []
    # --initrd: what the operator asked about, no guess.
    m.release = "6.1.0-test"
    st = ops_status.collect(str(m.config_path), initrd=str(real), probe=m.probe())
    assert st.data["exit"] == 0 and st.warnings == []


# --- review: the initrd reader's bounds --------------------------------------------------


def bomb(kind: str, size: int) -> bytes:
    import bz2
    import lzma

    zeros = bytes(size)
    return {
        "gzip": lambda: gzip.compress(zeros),
        "xz": lambda: lzma.compress(zeros),
        "lzma": lambda: lzma.compress(zeros, format=lzma.FORMAT_ALONE),
        "bzip2": lambda: bz2.compress(zeros),
    }[kind]()


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2"])
def test_in_process_decompression_bomb_is_bounded_while_it_unpacks(m, monkeypatch, kind):
    import tracemalloc

    monkeypatch.setattr(ops_status, "MAX_INITRD", 4 << 20)
    m.write_initrd(newc([reg("early.bin")]) + bomb(kind, 64 << 20))
    tracemalloc.start()
    try:
        code, data = m.status()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 1 and has(data, "unpacks to more than 4 MiB"), data["warnings"]
    assert has(data, "cannot be known")
    assert peak < 16 << 20  # never the 64 MiB in one piece


def fake_tool(tmp_path: Path, monkeypatch, name: str, script: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    import os

    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_zstd_is_killed_at_the_byte_cap(m, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(ops_status, "MAX_INITRD", 4 << 20)
    monkeypatch.setattr(ops_status, "DECOMPRESS_TIMEOUT", 20.0)
    pid_file = tmp_path / "pid"
    fake_tool(tmp_path, monkeypatch, "zstd", f"echo $$ > {pid_file}\nexec cat /dev/zero\n")
    m.write_initrd(newc([reg("early.bin")]) + b"\x28\xb5\x2f\xfd" + b"\x01" * 100)
    code, data = m.status()
    assert code == 1 and has(data, "unpacks to more than 4 MiB"), data["warnings"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_zstd_tries_share_one_deadline(m, tmp_path, monkeypatch):
    monkeypatch.setattr(ops_status, "DECOMPRESS_TIMEOUT", 1.0)
    runs = tmp_path / "runs"
    fake_tool(tmp_path, monkeypatch, "zstd", f"echo run >> {runs}\nsleep 0.4\nexit 1\n")
    # Trailing zeros: up to 9 tries (0 to 8 zeros given back).
    m.write_initrd(newc([reg("early.bin")]) + b"\x28\xb5\x2f\xfd" + b"\x01" * 100 + bytes(64))
    code, data = m.status()
    assert code == 1 and has(data, "did not finish within"), data["warnings"]
    assert len(runs.read_text().split()) < 9


def test_missing_decompressor_cannot_be_known(m, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    m.write_initrd(b"\x28\xb5\x2f\xfd" + b"\x01" * 100)
    code, data = m.status()
    assert code == 1 and has(data, "zstd not found"), data["warnings"]


def test_memory_error_is_a_warning_not_a_traceback(m, monkeypatch):
    class Boom:
        eof = False

        def decompress(self, *args):
            raise MemoryError

    monkeypatch.setattr(ops_status.zlib, "decompressobj", lambda **kw: Boom())
    m.write_initrd(gzip.compress(newc(initrd_entries(CONFIG_TEXT.encode()))))
    code, data = m.status()
    assert code == 1 and has(data, "not enough memory"), data["warnings"]


def test_unreadable_initrd_cannot_be_known(m):
    import os

    m.initrd.unlink()
    os.mkfifo(m.initrd)
    code, data = m.status()
    assert code == 1 and has(data, "not a regular file"), data["warnings"]


def test_zero_padding_is_skipped_in_c(m):
    class Counting(bytes):
        calls = 0

        def __getitem__(self, index):
            Counting.calls += 1
            return super().__getitem__(index)

    archive = newc([reg("a")])
    data = Counting(archive + bytes(1 << 20) + archive)
    names: dict = {}
    assert ops_status._parse_all(data, 0, 0, names) == len(data)
    assert list(names) == ["a"] and Counting.calls < 100


def test_json_has_no_infinity(m, capsys):
    m.journal = journal(
        "keystore: done in " + "9" * 400 + " s",
        "unlocked x in " + "9" * 400 + ".5 s; keystore closed",
        "opening: done in 1.5 s",
    )
    _, out = m.text(capsys, "--json")

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads(out, parse_constant=refuse)
    assert data["last_boot"]["steps"] == [{"step": "opening", "seconds": 1.5}]


def test_symlink_dot_dot_is_clamped_at_the_root(m):
    store = "nix/store/abc-lczfs-unlockd.toml"
    entries = [e for e in initrd_entries(b"") if e[0] != "etc/lczfs-unlockd.toml"]
    entries += [reg(store, CONFIG_TEXT.encode()),
                link("etc/lczfs-unlockd.toml", "../../../../" + store)]  # fmt: skip
    m.write_initrd(newc(entries))
    code, data = m.status()
    assert code == 0 and data["initrd"]["config"] == "same", data["warnings"]


def newc_links(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """newc with (name, mode, data, inode, nlink) given."""
    out = bytearray()
    for name, mode, data, ino, nlink in [*entries, ("TRAILER!!!", 0, b"", 0, 1)]:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 8, 1, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + raw
        out += bytes(-len(out) % 4) + data
        out += bytes(-len(out) % 4)
    return bytes(out)


def test_hard_linked_config_has_its_data_on_the_last_link(m):
    rest = [(n, mode, d, 100 + i, 1) for i, (n, mode, d) in enumerate(initrd_entries(b""))
            if n != "etc/lczfs-unlockd.toml"]  # fmt: skip
    f = stat.S_IFREG | 0o644
    m.write_initrd(
        newc_links(
            [
                *rest,
                ("etc/lczfs-unlockd.toml", f, b"", 7, 2),
                ("etc/other-name", f, CONFIG_TEXT.encode(), 7, 2),
            ]
        )
    )
    code, data = m.status()
    assert code == 0 and data["initrd"]["config"] == "same", data["warnings"]


def test_key_file_must_be_a_non_empty_regular_file_and_is_not_read(m):
    text = CONFIG_TEXT + 'unlock = ["keyfile", "passphrase"]\nkeyfile = "/etc/ks.key"\n'
    m.tokens.pop("1")
    m.config_path.write_text(text)
    m.write_initrd(newc([*initrd_entries(text.encode()), reg("etc/ks.key", b"")]))
    code, data = m.status()
    assert code == 1 and data["initrd"]["keyfile"] is False
    m.write_initrd(newc([*initrd_entries(text.encode()), reg("etc/ks.key", b"secret")]))
    archive = ops_status.read_initrd(str(m.initrd), ["etc/lczfs-unlockd.toml"], ["/etc/ks.key"])
    assert "/etc/ks.key" not in archive.contents
    assert archive.entries["/etc/ks.key"].size == 6
    assert m.status()[0] == 0


def test_tss2_libraries_of_a_packaged_build_are_found_by_file_name(monkeypatch):
    """Nix's _build_paths.py names the libraries and the TCTI by store path."""
    import os

    from lczfs_unlockd import ops_status, paths

    store = "/nix/store/abc-tpm2-tss/lib"
    monkeypatch.setattr(paths, "LIBTSS2_ESYS", (f"{store}/libtss2-esys.so.0",))
    monkeypatch.setattr(paths, "LIBTSS2_TCTILDR", (f"{store}/libtss2-tctildr.so.0",))
    monkeypatch.setattr(paths, "TPM2_TCTI", f"{store}/libtss2-tcti-device.so.0:/dev/tpmrm0")
    names = {os.path.basename(s) for _, sonames in ops_status.tss2_libraries() for s in sonames}
    assert names == set(TSS2)
