"""lczfs-unlockd in a real systemd initrd: QEMU (TCG), Debian trixie kernel
with zfs.ko (DKMS) and dm-crypt, pools provisioned in the guest.

Each test boots once (40-70 s under TCG) and asserts what a user would see:
key status, no mapping, nothing mounted at the keystore's mount point, the
keystore's units masked, the unit's result and status, the journal, time.
Run: ``.venv/bin/python -m pytest -m vm tests/vm -x -q`` (root; cold cache
builds the guest first, ~12 min).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable

import pytest
from lczfsvm import build, scenarios
from lczfsvm.vm import Guest, Result

pytestmark = pytest.mark.vm

Boot = Callable[[str], Result]

MAPPER = "secretsroot"
MOUNTPOINT = "/bootsecrets"
KEYSTORE_UNITS = ("systemd-cryptsetup@secretsroot.service", "bootsecrets.mount")
SEED_CRYPT = ["rpool/crypt", "rpool/crypt/local", "rpool/crypt/local/root",
              "rpool/crypt/local/nix", "rpool/crypt/safe", "rpool/crypt/safe/persist"]  # fmt: skip


# --- what every boot must show ------------------------------------------------------
def assert_clean(r: Result) -> None:
    """Keystore closed, unmounted; no secret in /run or the journal."""
    assert not any(MAPPER in m for m in r.mappings()), f"mapping left: {r.mappings()}"
    assert not r.report["dev_mapper"] or r.report["dev_mapper"] == ["control"], r.report[
        "dev_mapper"
    ]
    assert r.mounts_at(MOUNTPOINT) == [], r.mounts_at(MOUNTPOINT)
    assert r.report["needle_hits"] == [], f"secret found under /run: {r.report['needle_hits']}"
    assert r.report["needle_hits_journal_text"] == [], "secret found in the journal"


def assert_unlocked(r: Result, datasets: list[str]) -> None:
    assert r.unit["ActiveState"] == "active", r.describe() + "\n" + r.journal
    assert r.unit["Result"] == "success", r.describe()
    ks = r.keystatus()
    for ds in datasets:
        assert ks.get(ds) == "available", f"{ds}: {ks.get(ds)}\n{r.journal}"
    assert "unlocked" in r.status, r.status
    assert_clean(r)
    for unit in KEYSTORE_UNITS:
        assert r.report["units"][unit]["is_enabled"] == "masked-runtime", (
            unit,
            r.report["units"][unit],
        )


def assert_failed(r: Result, *words: str) -> None:
    assert r.unit["ActiveState"] == "failed", r.describe() + "\n" + r.journal
    assert r.unit["Result"] != "success", r.describe()
    assert r.unit["ExecMainStatus"] not in ("", "0"), r.unit
    text = r.status.lower()
    for w in words:
        assert re.search(w, text), f"status {r.status!r} does not match {w!r}\n{r.journal}"
    assert_clean(r)
    for ds, status in r.keystatus().items():
        assert status != "available" or not ds.startswith("rpool/crypt"), (ds, status)


def assert_no_secret_on_console(r: Result, guest: Guest) -> None:
    """No secret (keys, passphrase, the keystore's volume key) on the serial console."""
    console = (r.workdir / "console.log").read_bytes()
    shown = [n.hex()[:16] for n in guest.secrets.needles if len(n) >= 8 and n in console]
    assert shown == [], f"secrets on the console (hex prefixes): {shown}"


BASE_INITRD_PATHS = (
    "usr/bin/lczfs-unlockd", "usr/lib/systemd/system/lczfs-unlockd.service",
    "etc/systemd/system/initrd.target.wants/lczfs-unlockd.service",
    "usr/lib/systemd/system/sysroot.mount.d/lczfs-unlockd.conf",
    "usr/lib/python3/dist-packages/lczfs_unlockd/cli.py",
    "usr/lib/python3/dist-packages/libzfs_core/__init__.py",
    "usr/lib/python3/dist-packages/pystemd/dbuslib", "lczfs_unlockd/text.py",
    "libcryptsetup.so.12", "libzfs_core.so.3", "libnvpair.so.3",
    # The PCR measurement's tpm2-tss libraries (ctypes, by soname).
    "libtss2-esys.so.0", "libtss2-tctildr.so.0", "libtss2-tcti-device.so.0",
    "libtss2-mu.so.0", "libtss2-rc.so.0",
    "usr/bin/systemd-ask-password", "usr/sbin/zpool",
    # Test only (build.TEST_INSTALL): the report's second unseal.
    "usr/sbin/cryptsetup",
)  # fmt: skip


def test_dracut_module_in_base_initrd(guest: Guest) -> None:
    listing = (guest.base_initrd.parent / "lsinitrd.txt").read_text()
    for path in BASE_INITRD_PATHS:
        assert path in listing, path


@pytest.mark.parametrize("which", ["signed", "pcrlock"])
def test_dracut_module_copies_the_files_the_config_names(guest: Guest, which: str) -> None:
    """The signed-policy and pcrlock scenarios' base initrds: built with a config
    naming tpm2_signature or tpm2_pcrlock, whose file the module copied in."""
    if which == "signed":
        config, path = scenarios._signed_initrd(guest), scenarios.SIGNATURE
    else:
        config, path = scenarios._pcrlock_initrd(guest), scenarios.PCRLOCK
    listing = (build.base_initrd(guest.root, config).parent / "lsinitrd.txt").read_text()
    for p in ("etc/lczfs-unlockd.toml", path.lstrip("/"),
              "usr/lib/systemd/system/sysroot.mount.d/lczfs-unlockd.conf"):  # fmt: skip
        assert p in listing, p


# --- the PCR measurement, computed here from what provisioning recorded ---------------
DIGEST_SIZE = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def extend(bank: str, value: bytes, digest: bytes) -> bytes:
    return hashlib.new(bank, value + digest).digest()


def expected_pcr15(guest: Guest, bank: str, name: str) -> str:
    """PCR 15 after systemd-cryptsetup's tpm2-measure-pcr=yes of the seed0
    keystore: extend(0, HMAC_bank(volume key, "cryptsetup:NAME:UUID"))."""
    vk = guest.secrets.bytes("seed0-keystore.vk")
    uuid = guest.records["seed0-keystore-uuid"]
    digest = hmac.new(vk, f"cryptsetup:{name}:{uuid}".encode(), bank).digest()
    return extend(bank, bytes(DIGEST_SIZE[bank]), digest).hex()


def measure_log(r: Result) -> list[dict[str, object]]:
    """The records of /run/log/systemd/tpm2-measure.log (JSON-SEQ: RS, JSON, LF)."""
    text = r.report["tpm"]["measure_log"] or ""
    return [json.loads(chunk) for chunk in text.split("\x1e") if chunk.strip()]


def replay(records: list[dict[str, object]], pcr: int, bank: str) -> str:
    value = bytes(DIGEST_SIZE[bank])
    for rec in records:
        if rec.get("pcr") != pcr:
            continue
        for d in rec["digests"]:  # type: ignore[attr-defined]
            if d["hashAlg"] == bank:
                value = extend(bank, value, bytes.fromhex(d["digest"]))
    return value.hex()


def pcr_banks(r: Result) -> dict[str, dict[str, str]]:
    """PCR values by bank: every bank the TPM allocated (swtpm: sha1, sha256, sha384, sha512)."""
    pcrs: dict[str, dict[str, str]] = r.report["tpm"]["pcrs"]
    assert "sha256" in pcrs, pcrs
    assert set(pcrs) <= set(DIGEST_SIZE), pcrs
    return pcrs


def assert_measured(r: Result, guest: Guest, name: str = MAPPER) -> None:
    """PCR 15 moved, equals the replay of the log and the value computed from the volume key."""
    records = measure_log(r)
    uuid = guest.records["seed0-keystore-uuid"]
    ours = [rec for rec in records if rec.get("pcr") == 15]
    assert len(ours) == 1, records
    content = ours[0]["content"]
    assert ours[0]["content_type"] == "systemd", ours[0]
    assert content["string"] == f"cryptsetup:{name}:{uuid}", content  # type: ignore[index]
    assert content["eventType"] == "volume-key", content  # type: ignore[index]
    for bank, values in pcr_banks(r).items():
        value = values["15"]
        assert value != "0" * 2 * DIGEST_SIZE[bank], (bank, value)
        assert value == replay(records, 15, bank), (bank, value, records)
        assert value == expected_pcr15(guest, bank, name), (bank, value)
    banks = {d["hashAlg"] for d in ours[0]["digests"]}  # type: ignore[attr-defined]
    assert set(pcr_banks(r)) <= banks, (banks, pcr_banks(r))
    line = f'with "cryptsetup:{name}:{uuid}" and the volume key'
    assert re.search(r"extended PCR 15 \([^)]*\) " + re.escape(line), r.journal), r.journal


def assert_pcr15_untouched(r: Result) -> None:
    for bank, values in pcr_banks(r).items():
        assert values["15"] == "0" * 2 * DIGEST_SIZE[bank], (bank, values)
    assert not [rec for rec in measure_log(r) if rec.get("pcr") == 15], measure_log(r)
    assert "extended PCR" not in r.journal, r.journal


# --- the matrix --------------------------------------------------------------------
def test_passphrase_at_console(boot: Boot, guest: Guest) -> None:
    r = boot("passphrase")
    assert len(r.prompts) == 1
    assert_unlocked(r, SEED_CRYPT)
    assert guest.secrets.passphrase not in r.journal


def test_keyfile_no_prompt(boot: Boot) -> None:
    r = boot("keyfile")
    assert_unlocked(r, SEED_CRYPT)
    assert "Please enter" not in r.console


def test_debug_log(boot: Boot) -> None:
    r = boot("debug")
    assert_unlocked(r, SEED_CRYPT)
    assert "debug" in r.journal.lower()


def test_tpm2_token_no_prompt_measured_into_pcr15(boot: Boot, guest: Guest) -> None:
    """The token opens the keystore; then PCR 15 holds the volume key's
    measurement (as systemd-cryptsetup's tpm2-measure-pcr=yes), so the token,
    sealed to PCR 15 all zero, cannot be unsealed again in this boot."""
    r = boot("tpm2")
    assert_unlocked(r, SEED_CRYPT)
    assert "Please enter" not in r.console
    assert "keystore opened with token" in r.journal, r.journal
    assert_measured(r, guest)
    unseal = r.report["second_unseal"]
    assert unseal["rc"] not in (0, -1), unseal  # failed, not timed out or missing
    # The token is sealed to PCR 7 as provisioning saw it: the same here (SeaBIOS).
    assert r.report["tpm"]["pcrs"]["sha256"]["7"] == guest.records["pcr7-sha256"].lower()
    assert_no_secret_on_console(r, guest)


def test_tpm2_unmeasured_leaves_pcr15_and_the_token_unsealable(boot: Boot, guest: Guest) -> None:
    """The control for the test above: measure_pcr = false."""
    r = boot("tpm2-unmeasured")
    assert_unlocked(r, SEED_CRYPT)
    assert "Please enter" not in r.console
    assert_pcr15_untouched(r)
    unseal = r.report["second_unseal"]
    assert unseal["rc"] == 0, unseal
    assert_no_secret_on_console(r, guest)


def test_tpm2_signed_pcr_policy(boot: Boot, guest: Guest) -> None:
    """Signature A (for this boot's PCR 11), named by the config, copied into
    the initrd by the dracut module: the token opens the keystore, no prompt."""
    r = boot("tpm2-signed")
    assert_unlocked(r, ["rpool/crypt"])
    assert "Please enter" not in r.console
    assert "keystore opened with token" in r.journal, r.journal
    # Not a UKI: nothing measured into PCR 11, as when A was signed.
    pcr11 = r.report["tpm"]["pcrs"]["sha256"]["11"]
    assert pcr11 == guest.records["pcr11-sha256"].lower() == "0" * 64, pcr11
    assert_no_secret_on_console(r, guest)


def test_tpm2_signed_pcr_policy_for_another_kernel_falls_back_to_the_passphrase(
    boot: Boot, guest: Guest
) -> None:
    r = boot("tpm2-signed-changed")
    assert len(r.prompts) == 1, r.prompts
    assert_unlocked(r, ["rpool/crypt"])
    assert "token did not open" in r.journal or "no token could open" in r.journal, r.journal
    assert "keystore opened with passphrase" in r.journal, r.journal
    assert guest.secrets.passphrase not in r.journal
    assert_no_secret_on_console(r, guest)


def test_tpm2_pcrlock_policy(boot: Boot, guest: Guest) -> None:
    """A pcrlock policy (PCRs 0, 2, 7 predicted by systemd-pcrlock, kept in an
    NV index), its JSON at the path the config names, copied in by the dracut
    module (the plugin's own default paths hold nothing): no prompt."""
    r = boot("tpm2-pcrlock")
    assert_unlocked(r, ["rpool/crypt"])
    assert "Please enter" not in r.console
    assert "keystore opened with token" in r.journal, r.journal
    assert_no_secret_on_console(r, guest)


def test_tpm2_pcrlock_policy_for_another_firmware_falls_back_to_the_passphrase(
    boot: Boot, guest: Guest
) -> None:
    r = boot("tpm2-pcrlock-stale")
    assert len(r.prompts) == 1, r.prompts
    assert_unlocked(r, ["rpool/crypt"])
    assert "token did not open" in r.journal or "no token could open" in r.journal, r.journal
    assert "keystore opened with passphrase" in r.journal, r.journal
    assert_no_secret_on_console(r, guest)


def assert_refused(r: Result, guest: Guest, *words: str) -> str:
    """The daemon refused root=zfs:rpool/crypt/local/root; returns its message."""
    prefix = "refusing root dataset rpool/crypt/local/root: "
    assert_failed(r, re.escape(prefix))
    lines = [line for line in r.journal.splitlines() if prefix in line]
    assert lines, r.journal
    message = lines[0].split(prefix, 1)[1]
    for w in words:
        assert re.search(w, message), (w, message)
    # The token was used, so the keystore was measured before the verdict.
    assert_measured(r, guest)
    assert r.report["root_refused"] is True, r.report["root_refused"]
    assert r.report["root_checked"] is False, r.report["root_checked"]
    # The pool stays imported (only the keys are unloaded).
    assert "rpool" in str(r.report["zpool_list"]["out"]), r.report["zpool_list"]
    # The distribution's sysroot.mount fails on the drop-in's assertion.
    sysroot = r.report["sysroot"]
    assert sysroot["start"]["rc"] != 0, sysroot
    assert sysroot["after"]["AssertResult"] == "no", sysroot
    assert "lczfs-unlockd.conf" in sysroot["after"]["DropInPaths"], sysroot
    assert sysroot["mounted"] == [] and sysroot["left_mounted"] == [], sysroot
    assert r.mounts_at("/sysroot") == []
    assert_no_secret_on_console(r, guest)
    return message


def test_evil_maid_unencrypted_root_is_refused(boot: Boot, guest: Guest) -> None:
    r = boot("evil-unencrypted-root")
    assert "is now an unencrypted impostor" in r.report["journal"]["out"]
    assert_refused(r, guest, r"not encrypted")
    ks = r.keystatus()
    # The real encryption root, loaded by this run (datasets = auto), unloaded again.
    assert ks.get("rpool/crypt-real") == "unavailable", ks
    assert ks.get("rpool/crypt/local/root") == "-", ks  # the impostor: no key at all
    # systemd tried sysroot.mount itself first (this report runs after it).
    sysroot = r.report["sysroot"]
    assert sysroot["before"]["AssertResult"] == "no", sysroot
    assert sysroot["units"]["initrd-root-fs.target"]["ActiveState"] != "active", sysroot
    assert sysroot["units"]["emergency.target"]["ActiveState"] == "active", sysroot


def test_evil_maid_foreign_encryption_root_is_refused(boot: Boot, guest: Guest) -> None:
    r = boot("evil-foreign-root")
    assert "is now an encryption root of the attacker's" in r.report["journal"]["out"]
    # Names the encryption root found (the impostor is its own) and the one expected.
    assert_refused(r, guest, r"rpool/crypt/local/root", r"rpool/crypt(?!/)")
    ks = r.keystatus()
    assert ks.get("rpool/crypt") == "unavailable", ks
    assert ks.get("rpool/crypt/local/root") == "unavailable", ks


def test_tpm2_token_with_pin_asked_again_after_a_wrong_one(boot: Boot, guest: Guest) -> None:
    r = boot("tpm2-pin")
    assert_unlocked(r, ["rpool/crypt"])
    assert "keystore opened with token" in r.journal, r.journal
    # Asked for the PIN (not the passphrase), twice: the wrong one was refused.
    assert len(r.prompts) == 2, r.prompts
    assert "security token PIN" in r.console
    # systemd's TPM2 plugin cannot tell a wrong PIN from a failing TPM.
    assert "refused this PIN or failed" in r.journal, r.journal
    assert guest.secrets.tpm2_pin not in r.journal


def test_ext4_journal_needing_recovery_is_mounted_without_replay(boot: Boot) -> None:
    r = boot("ext4-needs-recovery")
    assert_unlocked(r, ["rpool/crypt"])
    assert "mounted with noload" in r.journal, r.journal


def test_dry_run(boot: Boot) -> None:
    r = boot("dry-run")
    assert r.unit["ActiveState"] == "active", r.describe() + "\n" + r.journal
    assert "would unlock" in r.status, r.status
    assert "rpool/crypt" in r.status
    # Nothing loaded, pool left as found (not imported), nothing masked.
    assert all(v != "available" for v in r.keystatus().values()), r.keystatus()
    assert str(r.report["zpool_list"]["out"]).strip() == "", r.report["zpool_list"]
    for unit in KEYSTORE_UNITS:
        assert "masked" not in r.report["units"][unit]["is_enabled"], r.report["units"][unit]
    assert_clean(r)


def test_disabled_on_kernel_cmdline(boot: Boot) -> None:
    r = boot("disabled")
    assert r.unit["ActiveState"] == "active", r.describe() + "\n" + r.journal
    assert "disabled" in r.status, r.status
    assert str(r.report["zpool_list"]["out"]).strip() == "", r.report["zpool_list"]
    for unit in KEYSTORE_UNITS:
        assert "masked" not in r.report["units"][unit]["is_enabled"], r.report["units"][unit]
    assert_clean(r)


def test_wrong_passphrase_fails_after_tries(boot: Boot) -> None:
    r = boot("wrong-passphrase")
    assert len(r.prompts) == 3
    assert_failed(r, r"passphrase|keystore|key")


def test_pool_disk_missing(boot: Boot) -> None:
    r = boot("disk-missing")
    assert_failed(r, r"rpool")
    assert "virtio-seed0" in r.status or "virtio-seed0" in r.journal, r.status
    # rd.lczfs.timeout=20s: fail at the deadline, not long after (one scan
    # of slack: a zpool scan takes seconds under TCG).
    waited = r.journal_time(r"failed:") - r.journal_time(r"importing pool rpool")
    assert 19 <= waited <= 30, f"failed {waited:.1f} s after the pool wait started"


def test_pool_disk_hotplugged_late(boot: Boot) -> None:
    r = boot("disk-late")
    assert_unlocked(r, SEED_CRYPT)
    assert r.daemon_seconds() >= 5, r.daemon_seconds()


def test_mirror_degraded_after_grace(boot: Boot) -> None:
    r = boot("mirror-degraded")
    assert_unlocked(r, SEED_CRYPT)
    assert "DEGRADED" in str(r.report["zpool_list"]["out"]), r.report["zpool_list"]
    assert r.daemon_seconds() >= 5, r.daemon_seconds()
    assert re.search(r"(?i)degraded", r.journal), r.journal


@pytest.mark.parametrize("which", ["missing", "trunc", "garbage", "wrong"])
def test_bad_key_file(boot: Boot, which: str) -> None:
    r = boot(f"keyfile-{which}")
    assert_failed(r, f"rpool/bad/{which}")
    assert f"{which}.key" in r.status or f"{which}.key" in r.journal, r.status


def test_corrupt_luks_header(boot: Boot) -> None:
    r = boot("luks-corrupt")
    assert_failed(r, r"luks|keystore|header")


def test_sigterm_at_prompt(boot: Boot) -> None:
    r = boot("sigterm-at-prompt")
    assert r.unit["ActiveState"] == "failed", r.describe()
    assert_clean(r)


def test_key_formats_and_hostile_kdf_cost(boot: Boot) -> None:
    """Auto-discovered roots: raw, hex and passphrase load; the broken key
    files and an attacker's pbkdf2iters=2^32 are each named; none stops the rest."""
    r = boot("key-formats")
    assert "created rpool/evil with pbkdf2iters=4294967296" in r.report["journal"]["out"]
    assert r.unit["ActiveState"] == "failed", r.describe()
    assert r.unit["StatusErrno"] not in ("", "0"), r.unit
    ks = r.keystatus()
    for ds in ("rpool/crypt", "rpool/fmt/raw", "rpool/fmt/hex", "rpool/fmt/pass"):
        assert ks.get(ds) == "available", (ds, ks.get(ds), r.journal)
    for ds in ("rpool/evil", "rpool/bad/missing", "rpool/bad/wrong"):
        assert ks.get(ds) == "unavailable", (ds, ks.get(ds))
    assert (
        "rpool/evil has pbkdf2iters=4294967296, more than max_pbkdf2iters = 100000000" in r.journal
    ), r.journal
    assert "Traceback" not in r.journal
    assert r.status.startswith("failed:"), r.status
    # Well inside one pbkdf2 call of 2^32 iterations, which is hours.
    assert r.daemon_seconds() < 120, r.daemon_seconds()
    assert_clean(r)


def test_hung_zpool_ends_at_the_deadline(boot: Boot) -> None:
    r = boot("hung-zpool")
    assert r.unit["ActiveState"] == "failed", r.describe() + "\n" + r.journal
    assert "did not finish within" in r.status, r.status
    # The stand-in sleeps in D state: killed, not reaped, reported, left.
    assert "state D" in r.journal, r.journal
    waited = r.journal_time(r"failed:") - r.journal_time(r"importing pool rpool")
    assert 19 <= waited <= 35, f"failed {waited:.1f} s after the pool wait started"
    assert_clean(r)  # the report let the stand-in go and removed its device


def test_kdf_cost_from_the_disk_is_ended_by_systemds_timeouts(boot: Boot) -> None:
    """No EXTEND_TIMEOUT_USEC during a C call: systemd's start timeout fires,
    SIGTERM cannot interrupt the KDF, TimeoutStopSec later SIGKILL ends it."""
    r = boot("slow-kdf")
    journal = str(r.report["journal"]["out"])
    assert r.unit["Result"] == "timeout", r.describe()
    assert r.unit["ActiveState"] == "failed", r.describe()
    assert "start operation timed out. Terminating." in journal, journal[-3000:]
    assert "State 'stop-sigterm' timed out. Killing." in journal, journal[-3000:]
    assert "with signal SIGKILL" in journal, journal[-3000:]
    assert_clean(r)


def test_duplicate_pool_name_fails_at_once_naming_both(boot: Boot, guest: Guest) -> None:
    r = boot("duplicate-pool")
    assert_failed(r, r"more than one pool named rpool", r"pool_guid")
    for disk in ("seed0", "dup0"):
        assert f"GUID {guest.guids[disk]}" in r.journal, (disk, r.journal)
    waited = r.journal_time(r"failed:") - r.journal_time(r"importing pool rpool")
    assert waited < 15, f"failed only {waited:.1f} s after the pool wait started"
    assert str(r.report["zpool_list"]["out"]).strip() == "", r.report["zpool_list"]


def test_pool_guid_picks_the_right_pool(boot: Boot, guest: Guest) -> None:
    r = boot("pool-guid")
    assert_unlocked(r, SEED_CRYPT)
    assert not any(d["name"] == "rpool/other" for d in r.report["datasets"])


def test_mirror_online(boot: Boot) -> None:
    r = boot("mirror-online")
    assert_unlocked(r, SEED_CRYPT)
    assert "ONLINE" in str(r.report["zpool_list"]["out"])


def test_handoff_to_sysroot_mount(boot: Boot) -> None:
    r = boot("handoff")
    assert_unlocked(r, SEED_CRYPT)
    sysroot = r.mounts_at("/sysroot")
    assert sysroot and "rpool/crypt/local/root" in sysroot[-1], sysroot
    # The daemon vouched for the root: sysroot.mount's drop-in let it mount.
    assert r.report["root_checked"] is True and r.report["root_refused"] is False
    assert "Encrypted ZFS password" not in r.console
    assert_ordered(r)


def assert_ordered(r: Result) -> None:
    """The unit file's ordering, as systemd ran it in this boot.

    Type=notify sends READY=1 only when everything is done, so "before X"
    means X left 'inactive' no earlier than lczfs-unlockd became active.
    """

    def stamp(props: dict[str, str], name: str) -> int:
        return int(props.get(name) or 0)

    ours = r.unit
    started = stamp(ours, "InactiveExitTimestampMonotonic")
    ready = stamp(ours, "ActiveEnterTimestampMonotonic")
    assert 0 < started <= ready, ours
    order = r.report["ordering"]
    for unit in ("systemd-udevd.service", "systemd-udev-trigger.service"):
        up = stamp(order[unit], "ActiveEnterTimestampMonotonic")
        assert 0 < up <= started, (unit, order[unit], ours)
    after_us = [u for u, p in order.items() if u.startswith(("zfs-", "sysroot", "initrd"))]
    ran = [u for u in after_us if stamp(order[u], "InactiveExitTimestampMonotonic")]
    # This boot imports the pool the distribution's way too and mounts the
    # root; the report is taken before initrd.target.
    assert {"zfs-import.target", "sysroot.mount", "initrd-root-fs.target"} <= set(ran), order
    for unit in ran:
        assert stamp(order[unit], "InactiveExitTimestampMonotonic") >= ready, (
            f"{unit} started before lczfs-unlockd was done",
            order[unit],
            ours,
        )
