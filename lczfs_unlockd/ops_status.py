"""``lczfs-unlockd status``: will the next boot unlock, and unattended?

One screen (or ``--json``) for the running system: the config, the
keystore's header (key slots, tokens, the recovery key, an armed one-time
unlock), the pool's encryption roots and which ones the daemon would load,
whether each TPM2 token's PCR policy will match at the next boot, whether
the initrd on disk carries the daemon and this config, and the last boot's
result from the journal.  The exit status is the verdict: 0 unattended, 1 a
person is needed (or it cannot be known), 2 expected to fail.

Read-only: it runs ``cryptsetup luksDump``, ``zfs list``, ``journalctl``
and a decompressor, reads sysfs and the initrd, and changes nothing.  What
it prints from the disk (a header's JSON, dataset names, the journal, the
initrd) is escaped and bounded; no key material is read or shown (a
token's sealed blob is not even looked at).

Everything it asks the machine goes through :class:`Probe`, so that the
tests give it fakes: no ZFS, TPM or journal is needed on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import mmap
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import config, keystore, luksadmin, paths, process, tpm2policy
from .errors import UnlockError
from .keyformat import key_file_path
from .ops_common import check_marker, load_config
from .text import bound, escape

EXIT_UNATTENDED = 0
EXIT_PERSON = 1
EXIT_BROKEN = 2

UNIT = "lczfs-unlockd.service"
CONFIG_IN_INITRD = "etc/lczfs-unlockd.toml"
TPM2_PLUGIN = "libcryptsetup-token-systemd-tpm2.so"
TPM_SYSFS = "/sys/class/tpm/tpm0"
NIXOS_INITRDS = ("/nix/var/nix/profiles/system/initrd", "/run/current-system/initrd")
QUERY_TIMEOUT = 60.0
DECOMPRESS_TIMEOUT = 120.0
MAX_TEXT = 300  # bytes of one value from the disk shown
MAX_ZFS_OUTPUT = 16 * 1024 * 1024
MAX_DATASETS = 100_000
MAX_JOURNAL = 8 * 1024 * 1024
JOURNAL_LINES = 5000
MAX_INITRD = 1024 * 1024 * 1024  # an initrd file, and the archive unpacked
MAX_ENTRIES = 500_000
MAX_SMALL_FILE = 1024 * 1024  # the config read from the initrd
ARMED_TOKEN = "lczfs-armed"


def show(value: object, limit: int = MAX_TEXT) -> str:
    """A value from the disk, printable and bounded."""
    return bound(escape(str(value)), limit)


# --- what is asked of the machine ------------------------------------------------


def _zfs_list(pool: str) -> str:
    columns = "name,encryptionroot,keylocation,keyformat,keystatus"
    argv = [paths.ZFS, "list", "-H", "-p", "-o", columns, "-t", "filesystem,volume", "-r", pool]
    return process.run(argv, check=True, timeout=QUERY_TIMEOUT).stdout


def _journal() -> str:
    result = process.run(
        ["journalctl", "-b", "-u", UNIT, "-o", "json", "--no-pager", "-n", str(JOURNAL_LINES)],
        check=True,
        timeout=QUERY_TIMEOUT,
    )
    return result.stdout


def default_initrds(boot: str = "/boot") -> list[str]:
    """Where the next boot's initrd is, most likely first.

    NixOS: the system profile's (what the boot loader's default entry
    boots, also after ``nixos-rebuild boot``), then the running
    generation's.  Debian: /boot/initrd.img, the symlink its default boot
    entry follows to the newest kernel's.  Otherwise the newest
    initrd.img-* or initramfs-*.img in /boot (dracut's names on Debian and
    Fedora): a kernel installed since this boot is the one booted next.
    """
    found = [
        p
        for p in glob.glob(os.path.join(glob.escape(boot), "initrd.img-*"))
        + glob.glob(os.path.join(glob.escape(boot), "initramfs-*.img"))
        if not p.endswith(("kdump.img", ".old-dkms", ".bak"))
    ]

    def newest_first(p: str) -> float:
        try:
            return -os.stat(p).st_mtime
        except OSError:
            return 0.0

    return [*NIXOS_INITRDS, os.path.join(boot, "initrd.img"), *sorted(found, key=newest_first)]


def _boot_time() -> float:
    """When this boot started (Unix seconds): /proc/stat's btime."""
    try:
        with open("/proc/stat", "rb") as f:
            m = re.search(rb"^btime ([0-9]{1,12})$", f.read(1 << 20), re.M)
    except OSError:
        return 0.0
    return float(m[1]) if m else 0.0


@dataclass
class Probe:
    """Everything ``status`` asks the machine; the tests replace parts of it."""

    metadata: Callable[[str], luksadmin.Metadata] = luksadmin.metadata
    exists: Callable[[str], bool] = os.path.exists
    zfs_list: Callable[[str], str] = _zfs_list
    journal: Callable[[], str] = _journal
    initrds: Callable[[], list[str]] = default_initrds
    tpm_sysfs: str = TPM_SYSFS
    now: Callable[[], float] = time.time
    release: Callable[[], str] = lambda: os.uname().release
    realpath: Callable[[str], str] = os.path.realpath
    boot_time: Callable[[], float] = _boot_time
    mtime: Callable[[str], float] = os.path.getmtime
    # None: paths.ROOT_CHECKED_FLAG / ROOT_REFUSED_FLAG, read at run time.
    flags: tuple[str, str] | None = None


@dataclass
class Status:
    """What ``status`` found: the JSON document, plus the verdict's inputs."""

    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # reasons for exit 2
    unknown: list[str] = field(default_factory=list)  # what keeps exit 0 from being known
    unattended_by: list[str] = field(default_factory=list)

    def warn(self, text: str, *, broken: bool = False, unknown: bool = False) -> None:
        self.warnings.append(text)
        if broken:
            self.broken.append(text)
        if unknown:
            self.unknown.append(text)


# --- 1. the config ---------------------------------------------------------------


def _config(path: str, st: Status) -> config.Config | None:
    try:
        cfg = load_config(path)
    except UnlockError as exc:
        st.data["config"] = {"path": path, "valid": False, "error": str(exc), "summary": []}
        st.warn(f"the configuration is not usable: {exc}", broken=True)
        return None
    st.data["config"] = {
        "path": path,
        "valid": True,
        "error": None,
        "summary": [escape(line) for line in config.summary(cfg)],
    }
    return cfg


# --- 2. the keystore's header ----------------------------------------------------


def small_number(value: object) -> int | None:
    """A header's "N" (a key slot or token number): ASCII digits only.

    ``str.isdigit`` and ``int`` accept far more ("²", "٣", 5000 digits):
    a ValueError or a number nothing else in the header means."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,2}", value):
        return int(value)
    return None


def _int_list(value: object, hi: int = 31) -> list[int] | None:
    """A JSON list of small integers (or their strings), or None if it is not one."""
    if not isinstance(value, list) or len(value) > 32:
        return None
    out = []
    for v in value:
        if isinstance(v, str):
            number = small_number(v)
            if number is None:
                return None
            v = number
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
            return None
        out.append(v)
    return out


def _hex_list(value: object) -> list[str] | None:
    """``tpm2-policy-hash``: a hex string (one per blob in newer systemd: a list of them)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items[:16]:
        if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{2,256}", v):
            return None
        out.append(v.lower())
    return out or None


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    return fields.get(name) is True


def _tpm2_details(fields: Mapping[str, Any]) -> dict[str, Any]:
    pcrs = _int_list(fields.get("tpm2-pcrs", []), tpm2policy.MAX_PCR)
    bank = fields.get("tpm2-pcr-bank", "sha256")
    # Only a bank name tpm2policy knows is kept as it is; anything else is
    # shown escaped and bounded (and predicts "unknown").
    bank = (
        bank.lower()
        if isinstance(bank, str) and bank.lower() in tpm2policy.BANK_ALGORITHMS
        else show(bank, 40)
    )
    raw_hash = fields.get("tpm2-policy-hash")
    pubkey_pcrs = _int_list(fields.get("tpm2_pubkey_pcrs", []), tpm2policy.MAX_PCR)
    signed = bool(fields.get("tpm2_pubkey")) or bool(pubkey_pcrs)
    pcrlock = _flag(fields, "tpm2_pcrlock")
    return {
        "pcrs": pcrs,
        "bank": bank,
        "policy_hash": _hex_list(raw_hash),
        # Newer systemd seals one blob per shard, each to its own policy: a
        # list of more than one digest.
        "sharded": isinstance(raw_hash, list) and len(raw_hash) > 1,
        "pin": _flag(fields, "tpm2-pin"),
        "pcrlock": pcrlock,
        "pubkey_pcrs": pubkey_pcrs,
        "signed": signed,
        "policy": "pcrlock" if pcrlock else "signed" if signed else "pcr",
    }


def _token_entry(token: luksadmin.Token) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": token.id, "type": token.type, "keyslots": list(token.keyslots)}
    f = token.fields
    if token.type == "systemd-tpm2":
        entry.update(_tpm2_details(f))
    elif token.type == "systemd-fido2":
        entry.update(
            {
                "pin": _flag(f, "fido2-clientPin-required"),
                "presence": f.get("fido2-up-required", True) is not False,
                "verification": _flag(f, "fido2-uv-required"),
            }
        )
    elif token.type == "systemd-pkcs11":
        entry["uri"] = show(f.get("pkcs11-uri", "?"))
    elif token.type == ARMED_TOKEN:
        for key in ("lczfs_tpm2_token", "armed_at", "expires"):
            value = f.get(key)
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40
            entry[key] = value if ok else show(value, 40)
    return entry


def human_slots(meta: luksadmin.Metadata) -> list[int]:
    """Key slots a person can open: luksadmin's (no device token), less those
    whose only tokens are clevis (a Tang server or a TPM2 opens them, not a
    person) and those with priority ignore (0: no passphrase try, no
    any-token try uses them; arm-reboot's one-time slot is one)."""
    out = []
    for s in meta.human_slots():
        tokens = meta.tokens_of(s)
        if tokens and all(t.type == "clevis" for t in tokens):
            continue
        if meta.keyslots[s].priority == keystore.PRIORITY_IGNORE:
            continue
        out.append(s)
    return out


def _keystore(cfg: config.Config, probe: Probe, st: Status) -> luksadmin.Metadata | None:
    device = cfg.keystore.device
    ks: dict[str, Any] = {"device": device, "present": probe.exists(device), "error": None}
    st.data["keystore"] = ks
    if not ks["present"]:
        st.warn(
            f"keystore {device} does not exist: is the pool imported and the zvol "
            f"{cfg.keystore.volume} there (keystore.volume, keystore.partition)?",
            broken=True,
        )
        return None
    try:
        meta = probe.metadata(device)
    except (UnlockError, ValueError, RecursionError) as exc:
        # ValueError, RecursionError: what the adapter's checks missed.
        ks["error"] = show(exc, 1000)
        st.warn(f"cannot read the LUKS header of {device}: {ks['error']}", broken=True)
        return None
    human = human_slots(meta)
    recovery = [
        t.id
        for t in meta.tokens.values()
        if t.type == luksadmin.RECOVERY_TOKEN and any(s in meta.keyslots for s in t.keyslots)
    ]
    ks.update(
        {
            "luks_version": meta.version,
            "uuid": show(meta.uuid, 64),
            "keyslots": [
                {
                    "id": s.id,
                    "type": s.type,
                    "kdf": s.kdf,
                    "priority": s.priority if s.priority in (0, 1, 2) else None,
                    "tokens": [t.id for t in meta.tokens_of(s.id)],
                    "human": s.id in human,
                }
                for s in sorted(meta.keyslots.values(), key=lambda s: s.id)
            ],
            "tokens": [_token_entry(t) for t in sorted(meta.tokens.values(), key=lambda t: t.id)],
            "human_slots": human,
            "recovery_key": bool(recovery),
        }
    )
    if not meta.keyslots:
        st.warn(f"keystore {device} has no key slot at all: nothing can open it", broken=True)
    elif not human:
        st.warn(
            f"DANGER: the keystore {device} has only token-bound key slots "
            f"({', '.join(map(str, sorted(meta.keyslots)))}): without the TPM2/FIDO2/PKCS#11 "
            "device nothing opens it, and the data is lost with the device; add a passphrase "
            "now: lczfs-unlockd enroll passphrase",
            broken=True,
        )
    if meta.version == 2 and not recovery:
        st.warn(
            f"no recovery key on the keystore {device}: if the passphrase is forgotten, the "
            "pool's data is lost; enroll one and keep it offline: lczfs-unlockd enroll recovery"
        )
    return meta


# --- the one-time unlock (arm-reboot) ----------------------------------------------


def _iso(seconds: int) -> str:
    try:
        when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, ValueError, OSError):  # past the year 9999
        return f"@{seconds}"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def marker_named(meta: luksadmin.Metadata) -> set[int]:
    """The tokens the daemon's token method never tries (keystore._marker_tokens):
    those any marker names, valid or not, by number or through its key slots."""
    markers = {n for n, t in meta.tokens.items() if t.type == ARMED_TOKEN}
    named: set[int] = set()
    slots: set[int] = set()
    for m in markers:
        t = meta.tokens[m]
        number = small_number(t.fields.get("lczfs_tpm2_token"))
        if number is not None:
            named.add(number)
        slots |= set(t.keyslots)
    named |= {n for n, t in meta.tokens.items() if slots & set(t.keyslots)}
    return named - markers


def _armed(meta: luksadmin.Metadata | None, probe: Probe, st: Status) -> int | None:
    """The markers, each checked as the daemon checks it (keystore.armed and
    _one_time): every valid one is consumed and destroyed at the next real
    boot, the first one in time is tried.  Returns that one's TPM2 token."""
    markers = (
        [] if meta is None else sorted(n for n, t in meta.tokens.items() if t.type == ARMED_TOKEN)
    )
    info: dict[str, Any] = {"armed": False, "markers": []}
    st.data["armed"] = info
    if meta is not None:
        for n in keystore.one_time_leftovers(meta.keyslots, meta.tokens):
            t = meta.tokens[n]
            slots = ", ".join(map(str, t.keyslots)) or "none"
            st.warn(
                f"token {n} ({show(t.type, 64)}, key slot {slots}) is a leftover of a "
                "one-time unlock: run lczfs-unlockd disarm (nothing uses it, the daemon "
                "passes over it)"
            )
    if meta is None or not markers:
        return None
    now = probe.now()
    chosen: int | None = None
    for n in markers:
        entry: dict[str, Any] = {"marker": n, "valid": False, "error": None}
        info["markers"].append(entry)
        try:
            unlock = check_marker(meta, n)
        except ValueError as exc:
            entry["error"] = show(exc, 300)
            st.warn(
                f"token {n} is an lczfs-armed marker the daemon will not use ({entry['error']}): "
                "lczfs-unlockd disarm"
            )
            continue
        expired = now >= unlock.expires
        early = now < unlock.armed_at - keystore.CLOCK_SKEW
        entry.update(
            {
                "valid": True,
                "keyslots": [unlock.slot],
                "token": unlock.token,
                "armed_at": unlock.armed_at,
                "expires": unlock.expires,
                "expires_iso": _iso(unlock.expires),
                "expired": expired,
            }
        )
        if expired:
            st.warn(
                f"the one-time unlock (arm-reboot, marker {n}) expired at {entry['expires_iso']}: "
                "the next boot will not use it and destroys it; lczfs-unlockd disarm removes it "
                "now"
            )
        elif early:
            st.warn(
                f"the clock is before the one-time unlock (arm-reboot, marker {n}) was armed "
                f"({_iso(unlock.armed_at)}): the daemon will not trust it and destroys it; check "
                "the clock, then lczfs-unlockd disarm and arm-reboot again"
            )
        elif chosen is None:
            chosen = n
    # What the screen shows: the marker the daemon tries, else the first one.
    shown = next((e for e in info["markers"] if e["marker"] == chosen), info["markers"][0])
    info.update({k: v for k, v in shown.items() if k != "error"})
    info.setdefault("token", None)
    info["armed"] = chosen is not None
    return info["token"] if chosen is not None else None


# --- 3. the encryption roots ---------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    name: str
    encryption_root: str
    keylocation: str
    keyformat: str
    keystatus: str


def parse_zfs_list(text: str, pool: str) -> list[Dataset]:
    """``zfs list -H -p -o name,encryptionroot,keylocation,keyformat,keystatus``.

    As zpool.parse_properties: a value with a tab or newline in it (zfs
    prints them raw) shows as a line of the wrong shape or a dataset that
    is not in the pool, or a repeated one: the whole answer is refused.
    """
    if len(text) > MAX_ZFS_OUTPUT:
        raise ValueError(f"zfs list printed more than {MAX_ZFS_OUTPUT} bytes")
    out: list[Dataset] = []
    seen: set[str] = set()
    for line in text.splitlines():
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 5:
            raise ValueError(
                f"zfs list printed a line that is not 5 tab-separated fields ({show(line)}): "
                "the pool's metadata is not what zfs wrote"
            )
        name = fields[0]
        if (name != pool and not name.startswith(pool + "/")) or name in seen:
            raise ValueError(
                f"zfs list printed {show(name)} unasked or twice (a property value with a "
                "newline in it?): the pool's metadata is not what zfs wrote"
            )
        seen.add(name)
        if len(out) >= MAX_DATASETS:
            raise ValueError(f"more than {MAX_DATASETS} datasets in {pool}")
        out.append(Dataset(*fields))
    return out


def is_target(d: Dataset, mountpoint: str) -> bool:
    """The daemon's ``datasets = "auto"`` rule (keys._targets): an encryption
    root whose keylocation is a file beneath the keystore's mount point."""
    return (
        d.encryption_root not in ("-", "")
        and d.encryption_root == d.name
        and key_file_path(d.keylocation, mountpoint) is not None
    )


def _datasets(cfg: config.Config, probe: Probe, st: Status) -> None:
    mp = cfg.keystore.mountpoint
    info: dict[str, Any] = {
        "pool": cfg.pool,
        "mode": "auto" if cfg.datasets is None else "list",
        "error": None,
        "encryption_roots": [],
        "targets": [],
        "configured": [],
    }
    st.data["datasets"] = info
    try:
        listed = parse_zfs_list(probe.zfs_list(cfg.pool), cfg.pool)
    except (UnlockError, ValueError) as exc:
        info["error"] = show(exc, 1000)
        st.warn(f"cannot list the datasets of pool {cfg.pool}: {info['error']}", unknown=True)
        return
    by_name = {d.name: d for d in listed}
    roots = [d for d in listed if d.encryption_root == d.name]
    for d in roots:
        info["encryption_roots"].append(
            {
                "name": show(d.name),
                "keylocation": show(d.keylocation),
                "keyformat": show(d.keyformat, 40),
                "keystatus": show(d.keystatus, 40),
                "auto": is_target(d, mp),
            }
        )
    if cfg.datasets is None:
        info["targets"] = [show(d.name) for d in roots if is_target(d, mp)]
        if not info["targets"]:
            st.warn(
                f"no encryption root of {cfg.pool} has its keylocation under {mp}: the daemon "
                f"(datasets = auto) will load no key and fail; set keylocation=file://{mp}/<key>",
                broken=True,
            )
        return
    for name in cfg.datasets:
        ds = by_name.get(name)
        entry = {
            "name": name,
            "exists": ds is not None,
            "encryption_root": ds is not None and ds.encryption_root == ds.name,
            "keylocation_ok": ds is not None and key_file_path(ds.keylocation, mp) is not None,
        }
        info["configured"].append(entry)
        if ds is None:
            st.warn(
                f"datasets: {name} does not exist in pool {cfg.pool}: fix datasets", broken=True
            )
        elif not entry["encryption_root"]:
            st.warn(
                f"datasets: {name} is not an encryption root (its encryptionroot is "
                f"{show(ds.encryption_root)}): list that one instead",
                broken=True,
            )
        elif not entry["keylocation_ok"]:
            st.warn(
                f"datasets: {name} has keylocation={show(ds.keylocation)}, not a file under {mp}: "
                f"zfs set keylocation=file://{mp}/<key> {name}",
                broken=True,
            )
        else:
            info["targets"].append(name)


# --- 4. the TPM2 prediction -------------------------------------------------------------


def measure_pcr(cfg: config.Config) -> int | None:
    """The PCR the daemon extends after the unlock (measure.py): zero at the next
    boot's unseal, whatever it is now.  None: the daemon measures nothing."""
    pcr = cfg.keystore.measure_pcr
    if pcr is False:
        return None
    if pcr is None or pcr is True:
        return config.DEFAULT_MEASURE_PCR
    return int(pcr)


def _read_pcr(sysfs: str, bank: str, pcr: int) -> bytes:
    path = os.path.join(sysfs, f"pcr-{bank}", str(pcr))
    with open(path, "rb") as f:
        text = f.read(1024).decode("ascii", "replace")
    return tpm2policy.parse_pcr_value(text, bank)


# PCRs whose value in the running system is not what the next boot's unseal
# sees, because something extends them after the keystore is unlocked
# (systemd's "Linux TPM PCR Registry", systemd-cryptenroll(1)): the
# measurement PCR is handled apart (zero at the unseal).
MOVING_PCRS: dict[int, str] = {
    10: "IMA extends it with every file it measures",
    11: "systemd-pcrphase extends it at leave-initrd, sysinit and ready",
    15: "systemd-pcrmachine, systemd-pcrfs and systemd-cryptsetup extend it in the running system",
    16: "the debug PCR: anyone may extend it",
    17: "DRTM", 18: "DRTM", 19: "DRTM", 20: "DRTM", 21: "DRTM", 22: "DRTM",
    23: "the application PCR: anyone may extend or reset it",
}  # fmt: skip


def predict(
    details: Mapping[str, Any], sysfs: str, measured: int | None
) -> tuple[str, dict[str, Any]]:
    """For one systemd-tpm2 token: "match", "mismatch", "unpredictable" or "unknown"."""
    out: dict[str, Any] = {"candidates": [], "predicted": None}
    if details["policy"] == "signed":
        out["detail"] = (
            "signed PCR policy: depends on the PCR signature the boot carries (the UKI's "
            ".pcrsig, keystore.tpm2_signature), not predictable from the PCRs"
        )
        return "unpredictable", out
    if details["policy"] == "pcrlock":
        out["detail"] = (
            "pcrlock policy: depends on the pcrlock policy file and NV index "
            "(keystore.tpm2_pcrlock), not predictable from the PCRs"
        )
        return "unpredictable", out
    pcrs, bank, hashes = details["pcrs"], details["bank"], details["policy_hash"]
    if pcrs is None or hashes is None or bank not in tpm2policy.BANK_ALGORITHMS:
        out["detail"] = "the token's tpm2-pcrs, tpm2-pcr-bank or tpm2-policy-hash is invalid"
        return "unknown", out
    if details["sharded"]:
        out["detail"] = (
            f"{len(hashes)} policy digests (a blob per shard, each sealed to its own policy): "
            "every one must unseal, and which PCR values each shard saw is not in the header"
        )
        return "unpredictable", out
    moving = [p for p in pcrs if p != measured and p in MOVING_PCRS]
    if moving:
        out["detail"] = (
            "; ".join(f"PCR {p} moves after the unlock ({MOVING_PCRS[p]})" for p in moving)
            + ": unpredictable from the running system"
        )
        return "unpredictable", out
    values: dict[int, bytes] = {}
    for pcr in pcrs:
        if pcr == measured:
            values[pcr] = bytes(tpm2policy.digest_size(bank))
            continue
        try:
            values[pcr] = _read_pcr(sysfs, bank, pcr)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            out["detail"] = (
                f"cannot read PCR {pcr} ({bank}) from {sysfs}/pcr-{bank}/{pcr}: {show(reason)} "
                "(a kernel older than 5.12 has no PCRs in sysfs)"
            )
            return "unknown", out
    try:
        predicted = tpm2policy.sealing_policy(bank, values, pin=details["pin"]).hex()
    except ValueError as exc:
        out["detail"] = f"cannot compute the policy: {show(exc)}"
        return "unknown", out
    out["predicted"] = predicted
    if predicted in hashes:
        return "match", out
    out["candidates"] = [p for p in pcrs if p != measured]
    return "mismatch", out


def _required_measurement(cfg: config.Config) -> bool:
    """keystore.measure_pcr is a number: the daemon fails the unlock without a TPM2."""
    pcr = cfg.keystore.measure_pcr
    return isinstance(pcr, int) and not isinstance(pcr, bool)


def _tpm2(cfg: config.Config, meta: luksadmin.Metadata | None, probe: Probe, st: Status) -> None:
    measured = measure_pcr(cfg)
    present = probe.exists(probe.tpm_sysfs)
    info: dict[str, Any] = {
        "present": present,
        "sysfs": probe.tpm_sysfs,
        "measure_pcr": measured,
        "tokens": [],
    }
    st.data["tpm2"] = info
    if not present and _required_measurement(cfg):
        st.warn(
            f"no TPM2 on this machine ({probe.tpm_sysfs} does not exist) but keystore.measure_pcr "
            f"= {cfg.keystore.measure_pcr} requires the measurement: the daemon will fail the "
            'unlock; set keystore.measure_pcr = false (or "auto": leave it out) or fix the TPM',
            broken=True,
        )
    tokens = [] if meta is None else [t for t in meta.tokens.values() if t.type == "systemd-tpm2"]
    if not tokens:
        return
    assert meta is not None
    skipped = marker_named(meta)
    leftovers = set(keystore.one_time_leftovers(meta.keyslots, meta.tokens))  # warned of
    if not present:
        st.warn(
            f"no TPM2 on this machine ({probe.tpm_sysfs} does not exist): the systemd-tpm2 "
            f"token(s) {', '.join(str(t.id) for t in tokens)} cannot unseal"
        )
    for t in sorted(tokens, key=lambda t: t.id):
        details = _tpm2_details(t.fields)
        # What the token method can use (keystore._try_token): a token on a
        # key slot that exists (libcryptsetup ignores the others), whose slot
        # any-token does not pass over (priority ignore), that no marker names.
        slots = [s for s in t.keyslots if s in meta.keyslots]
        usable = [s for s in slots if meta.keyslots[s].priority != keystore.PRIORITY_IGNORE]
        if t.id in skipped:
            unused = "an lczfs-armed marker names it: the token method never tries it"
        elif not slots:
            unused = "none of its key slots exists"
        elif not usable:
            unused = "its key slots have priority ignore: the token method passes over them"
        else:
            unused = None
        if present:
            prediction, out = predict(details, probe.tpm_sysfs, measured)
        else:
            prediction, out = "unknown", {"candidates": [], "predicted": None, "detail": "no TPM2"}
        entry = {"token": t.id, "prediction": prediction, **details, **out, "unused": unused}
        info["tokens"].append(entry)
        pcrs = details["pcrs"]
        if pcrs is None or details["policy"] != "pcr":
            pass  # nothing known to warn of
        elif measured is None and config.DEFAULT_MEASURE_PCR in pcrs:
            st.warn(
                f"TPM2 token {t.id} includes PCR {config.DEFAULT_MEASURE_PCR} but "
                "keystore.measure_pcr = false: nothing moves that PCR after the unlock, so the "
                "token unseals again later in the same boot (a shell, a root put in its place); "
                "leave measure_pcr out (auto) or re-enroll: lczfs-unlockd enroll tpm2"
            )
        elif measured is not None and measured not in pcrs:
            st.warn(
                f"TPM2 token {t.id} is not bound to the measurement PCR {measured}: it unseals "
                "again after the unlock, in the running system too (anyone who gets root or a "
                "shell in this boot); re-enroll: lczfs-unlockd enroll tpm2"
            )
        if unused is not None and t.id not in skipped | leftovers:
            st.warn(f"TPM2 token {t.id} is not used at boot: {unused}")
        if not present:
            continue
        if prediction == "mismatch":
            cands = out["candidates"]
            which = (
                f"PCR {cands[0]}"
                if len(cands) == 1
                else f"one of PCRs {', '.join(map(str, cands))}"
            )
            changed = (
                f"{which} changed (firmware, Secure Boot state or boot loader update?)"
                if cands
                else f"even with PCR {measured} at zero (the token was enrolled against "
                "other PCR values)"
            )
            st.warn(
                f"TPM2 policy of token {t.id} will not match the next boot: {changed} — "
                "re-enroll: lczfs-unlockd enroll tpm2"
            )
        elif prediction == "unknown":
            st.warn(f"TPM2 token {t.id}: cannot predict the next boot: {out['detail']}")


# --- 5. the initrd ----------------------------------------------------------------------

_CPIO_MAGICS = (b"070701", b"070702")
_COMPRESSIONS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x02\x21\x4c\x18", "lz4"),  # the kernel's legacy lz4 format (lz4 -l)
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)
# Read from a pipe named /proc/self/fd/N, written to stdout: nothing on disk
# but what this module reads back, and the program killed at the byte cap.
_TOOLS: dict[str, Callable[[str], list[str]]] = {
    "zstd": lambda src: ["zstd", "-d", "-c", "-q", src],
    "lz4": lambda src: ["lz4", "-d", "-c", "-q", src],
}
_CHUNK = 1 << 20
_NONZERO = re.compile(rb"[^\x00]")


class InitrdError(Exception):
    """The initrd cannot be read or is not a cpio archive (the message says why).

    ``damaged``: the file itself is wrong (not cpio, truncated, corrupt); the
    next boot will not find the daemon in it.  Otherwise this host could not
    tell (unreadable, a decompressor missing or too slow, too large): the
    verdict is "cannot be known", not "will fail"."""

    def __init__(self, message: str, *, damaged: bool = True) -> None:
        super().__init__(message)
        self.damaged = damaged


@dataclass(frozen=True)
class Entry:
    mode: int
    source: int  # which buffer of the archive: the file, or its unpacked main part
    offset: int
    size: int


@dataclass
class Initrd:
    """The entries of an initrd, and the content of the few files asked for."""

    names: dict[str, Entry]
    compression: str
    contents: dict[str, bytes | None]  # asked-for path -> its bytes (symlinks followed)
    # asked-for path -> its entry, symlinks followed (the content not read)
    entries: dict[str, Entry | None] = field(default_factory=dict)

    def find(self, suffix: str) -> list[str]:
        return [n for n in self.names if n == suffix or n.endswith("/" + suffix)]


def clamp(path: str, base: str = "") -> str:
    """``path`` (relative to ``base``) as the kernel resolves it: ``..`` at
    the root stays at the root, so "../../nix/store/x" is "nix/store/x"."""
    parts: list[str] = [] if path.startswith("/") else [p for p in base.split("/") if p]
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def _resolve(
    names: Mapping[str, Entry], buffers: Sequence[bytes | mmap.mmap], name: str
) -> Entry | None:
    """An entry by path, following symlinks inside the archive (8 hops at most)."""
    name = clamp(name)
    for _ in range(8):
        entry = names.get(name)
        if entry is None or not stat.S_ISLNK(entry.mode) or entry.size > 4096:
            return entry
        raw = bytes(buffers[entry.source][entry.offset : entry.offset + entry.size])
        target = raw.decode("utf-8", "surrogateescape")
        name = clamp(target, os.path.dirname(name))
    return None


def _hexfield(header: bytes, index: int) -> int:
    raw = header[6 + 8 * index : 14 + 8 * index]
    if not re.fullmatch(rb"[0-9a-fA-F]{8}", raw):
        raise InitrdError(f"cpio header field {index} is not hexadecimal ({show(raw)})")
    return int(raw, 16)


def parse_cpio(data: bytes | mmap.mmap, pos: int, source: int, names: dict[str, Entry]) -> int:
    """One newc cpio archive from ``pos`` to its TRAILER!!!; returns where it ends.

    Hard links (a regular file with nlink > 1): newc stores the data with
    the last of the names sharing an inode and device, the others have size
    0; the kernel links them all to one file, and so does this parse (per
    archive: the kernel forgets the inodes at each TRAILER!!!)."""
    end = len(data)
    links: dict[tuple[int, int, int], list[str]] = {}
    while True:
        if pos + 110 > end:
            raise InitrdError("the cpio archive ends without its TRAILER!!! entry")
        header = bytes(data[pos : pos + 110])
        if header[:6] not in _CPIO_MAGICS:
            raise InitrdError(f"not a newc cpio header at offset {pos}")
        mode, size, namesize = _hexfield(header, 1), _hexfield(header, 6), _hexfield(header, 11)
        if namesize == 0 or namesize > 4096:
            raise InitrdError(f"cpio entry at offset {pos}: invalid name size {namesize}")
        name_end = pos + 110 + namesize
        data_start = (name_end + 3) & ~3
        data_end = data_start + size
        if data_end > end:
            raise InitrdError(f"cpio entry at offset {pos} runs past the end of the archive")
        name = bytes(data[pos + 110 : name_end]).rstrip(b"\0").decode("utf-8", "surrogateescape")
        pos = (data_end + 3) & ~3
        if name == "TRAILER!!!":
            return pos
        if len(names) >= MAX_ENTRIES:
            raise InitrdError(f"more than {MAX_ENTRIES} entries")
        name = clamp(name)
        entry = Entry(mode, source, data_start, size)
        names[name] = entry
        if stat.S_ISREG(mode) and _hexfield(header, 4) > 1:
            key = (_hexfield(header, 0), _hexfield(header, 7), _hexfield(header, 8))
            group = links.setdefault(key, [])
            group.append(name)
            if size > 0:
                for other in group:
                    names[other] = entry


def _parse_all(data: bytes | mmap.mmap, pos: int, source: int, names: dict[str, Entry]) -> int:
    """Concatenated cpio archives from ``pos`` (zero padding between them); returns
    where something that is not a cpio archive starts (or the end)."""
    while pos < len(data):
        found = _NONZERO.search(data, pos)  # padding skipped in C, not byte by byte
        if found is None:
            return len(data)
        pos = found.start()
        if bytes(data[pos : pos + 6]) not in _CPIO_MAGICS:
            return pos
        pos = parse_cpio(data, pos, source, names)
    return pos


def _compression(head: bytes) -> str | None:
    for magic, name in _COMPRESSIONS:
        if head.startswith(magic):
            return name
    return None


def _too_large() -> InitrdError:
    return InitrdError(f"it unpacks to more than {MAX_INITRD >> 20} MiB", damaged=False)


def _unpack_in_process(kind: str, data: bytes | mmap.mmap, start: int, out: BinaryIO) -> None:
    """gzip, xz, lzma, bzip2: at most _CHUNK bytes out of each call
    (``max_length``), the rest of the input kept by the decompressor, so a
    small stream of zeros never becomes one huge bytes object."""
    import bz2
    import lzma

    written = 0

    def emit(piece: bytes) -> None:
        nonlocal written
        written += len(piece)
        if written > MAX_INITRD:
            raise _too_large()
        out.write(piece)

    try:
        if kind == "gzip":
            inflate = zlib.decompressobj(wbits=31)
            for offset in range(start, len(data), _CHUNK):
                chunk = bytes(data[offset : offset + _CHUNK])
                while not inflate.eof:
                    piece = inflate.decompress(chunk, _CHUNK)
                    emit(piece)
                    chunk = inflate.unconsumed_tail
                    # A full piece may leave output inside zlib with no input left.
                    if not chunk and len(piece) < _CHUNK:
                        break
                if inflate.eof:  # what follows is padding
                    return
            return
        dec: bz2.BZ2Decompressor | lzma.LZMADecompressor
        if kind == "bzip2":
            dec = bz2.BZ2Decompressor()
        else:
            dec = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
        for offset in range(start, len(data), _CHUNK):
            emit(dec.decompress(bytes(data[offset : offset + _CHUNK]), _CHUNK))
            while not dec.eof and not dec.needs_input:
                emit(dec.decompress(b"", _CHUNK))
            if dec.eof:
                return
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise InitrdError(f"cannot unpack its {kind} archive: {exc}") from None


def _content_end(data: bytes | mmap.mmap, start: int) -> int:
    """Where the trailing zero padding after ``start`` begins."""
    end = len(data)
    while end > start:
        lo = max(start, end - _CHUNK)
        kept = bytes(data[lo:end]).rstrip(b"\0")
        if kept:
            return lo + len(kept)
        end = lo
    return start


def _run_tool(
    kind: str, data: bytes | mmap.mmap, start: int, stop: int, zeros: int, out: BinaryIO,
    deadline: float,
) -> tuple[int, str]:  # fmt: skip
    """One run of zstd/lz4 on data[start:stop] + ``zeros`` zero bytes, fed
    through a pipe by a thread; its stdout into ``out``, killed at the
    MAX_INITRD cap or at ``deadline`` (time.monotonic())."""
    read_end, write_end = os.pipe()
    argv = tuple(_TOOLS[kind](f"/proc/self/fd/{read_end}"))

    def feed() -> None:
        try:
            for offset in range(start, stop, _CHUNK):
                view = memoryview(bytes(data[offset : min(offset + _CHUNK, stop)]))
                while view:
                    view = view[os.write(write_end, view) :]
            if zeros:
                os.write(write_end, bytes(zeros))
        except OSError:  # the program exited or was killed: EPIPE
            pass
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed, name="feed-decompressor", daemon=True)

    def collect(child: subprocess.Popen[bytes], _limit: float | None) -> tuple[int, str]:
        nonlocal read_end
        os.close(read_end)  # the child has its copy
        read_end = -1
        feeder.start()
        assert child.stdout is not None and child.stderr is not None
        drainer, err = process._drain(child.stderr.fileno(), 4096)
        fd = child.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        written = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(argv, DECOMPRESS_TIMEOUT)
            if not poller.poll(min(left, 1.0) * 1000):
                continue
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > MAX_INITRD:
                raise _too_large()  # _supervised kills it
            out.write(chunk)
        returncode = child.wait(max(deadline - time.monotonic(), 0.1))
        drainer.join(1.0)
        return returncode, err.decode("utf-8", "replace")

    try:
        return process._supervised(argv, DECOMPRESS_TIMEOUT, collect, pass_fds=[read_end])
    except UnlockError as exc:  # not installed, or the deadline
        raise InitrdError(f"cannot unpack its {kind} archive: {exc}", damaged=False) from None
    finally:
        if read_end >= 0:  # the spawn failed: collect never ran
            os.close(read_end)
            os.close(write_end)
        elif feeder.is_alive():
            feeder.join(1.0)


def _decompress_into(kind: str, data: bytes | mmap.mmap, start: int, out: BinaryIO) -> None:
    """The compressed rest of the initrd from ``start``, unpacked into ``out``,
    at most MAX_INITRD bytes of it.

    gzip, xz, lzma and bzip2 in-process; zstd and lz4 through their
    programs, all tries within one DECOMPRESS_TIMEOUT.  Zero padding after
    the stream makes both programs fail after a complete output: they get
    the stream without its trailing zeros, then with up to 8 of them back
    (a stream may end in zero bytes), until one run succeeds.
    """
    if kind not in _TOOLS:
        _unpack_in_process(kind, data, start, out)
        return
    deadline = time.monotonic() + DECOMPRESS_TIMEOUT
    stop = _content_end(data, start)
    stderr = ""
    for zeros in range(min(len(data) - stop, 8) + 1):
        out.seek(0)
        out.truncate()
        returncode, stderr = _run_tool(kind, data, start, stop, zeros, out, deadline)
        if returncode == 0:
            return
    raise InitrdError(f"cannot unpack its {kind} archive: {show(stderr.strip(), 500)}")


def _mapped(stack: contextlib.ExitStack, f: BinaryIO) -> bytes | mmap.mmap:
    f.flush()
    if os.fstat(f.fileno()).st_size == 0:
        return b""
    return stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def read_initrd(path: str, wanted: Sequence[str] = (), present: Sequence[str] = ()) -> Initrd:
    """Every entry of an initrd (early uncompressed cpio archives such as the
    microcode, then the main one, compressed or not), and the content of the
    ``wanted`` paths, symlinks inside the archive followed (NixOS links
    /etc files into its store); for the ``present`` paths only their entry
    (a key file's content is never read)."""
    try:
        return _read_initrd(path, wanted, present)
    except MemoryError:
        raise InitrdError("not enough memory to read it", damaged=False) from None


def _read_initrd(path: str, wanted: Sequence[str], present: Sequence[str]) -> Initrd:
    try:
        # O_NONBLOCK: a FIFO put there must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise InitrdError(f"cannot read it: {exc.strerror}", damaged=False) from None
    names: dict[str, Entry] = {}
    compression = "none"
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(os.fdopen(fd, "rb"))
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InitrdError("not a regular file", damaged=False)
        if st.st_size > MAX_INITRD:
            raise InitrdError(f"larger than {MAX_INITRD >> 20} MiB", damaged=False)
        try:
            buffers = [_mapped(stack, f)]
        except OSError as exc:
            raise InitrdError(f"cannot read it: {exc.strerror}", damaged=False) from None
        data = buffers[0]
        pos = _parse_all(data, 0, 0, names)
        if pos < len(data):
            kind = _compression(bytes(data[pos : pos + 6]))
            if kind is None:
                raise InitrdError(f"neither a cpio archive nor a known compression at {pos}")
            compression = kind
            workdir = tempfile.mkdtemp(prefix="lczfs-status-")
            stack.callback(shutil.rmtree, workdir, True)
            out = stack.enter_context(open(os.path.join(workdir, "cpio"), "w+b"))
            _decompress_into(kind, data, pos, out)
            buffers.append(_mapped(stack, out))
            inner = _parse_all(buffers[1], 0, 1, names)
            if inner < len(buffers[1]):
                raise InitrdError(f"the unpacked {kind} archive is not cpio at offset {inner}")
        contents: dict[str, bytes | None] = {}
        for want in wanted:
            entry = _resolve(names, buffers, want)
            if entry is None or not stat.S_ISREG(entry.mode) or entry.size > MAX_SMALL_FILE:
                contents[want] = None
            else:
                buf = buffers[entry.source]
                contents[want] = bytes(buf[entry.offset : entry.offset + entry.size])
        entries = {want: _resolve(names, buffers, want) for want in present}
        return Initrd(names, compression, contents, entries)


# What the daemon loads through ctypes (tpm2.py) or tctildr loads by name
# (dlopen): no dependency scan of an initrd builder sees them.
def tss2_libraries() -> list[tuple[str, tuple[str, ...]]]:
    tcti = paths.TPM2_TCTI.partition(":")[0]
    # A name ("device": tctildr loads libtss2-tcti-device.so.0) or, in
    # packaged builds (Nix's _build_paths.py), the library's own path.
    tcti_lib = os.path.basename(tcti) if "/" in tcti else f"libtss2-tcti-{tcti}.so.0"
    return [
        ("libtss2-esys", paths.LIBTSS2_ESYS),
        ("libtss2-tctildr", paths.LIBTSS2_TCTILDR),
        (tcti_lib.removesuffix(".so.0"), (tcti_lib,)),
    ]


def _running_kernel_check(path: str, probe: Probe, st: Status) -> None:
    """Warn when the default initrd (a symlink followed) is another kernel's."""
    real = os.path.basename(probe.realpath(path))
    m = re.fullmatch(r"(?:initrd\.img-(.+)|initramfs-(.+)\.img)", real)
    release = probe.release()
    if m and (m[1] or m[2]) != release:
        st.warn(
            f"initrd {path} is {show(real)}, not the running kernel's ({show(release)}): the "
            "next boot is expected to boot that kernel; check the boot loader's default entry, "
            "or pass --initrd"
        )


def _initrd(
    cfg: config.Config,
    config_path: str,
    chosen: str | None,
    meta: luksadmin.Metadata | None,
    probe: Probe,
    st: Status,
) -> dict[str, Any]:
    candidates = [chosen] if chosen else probe.initrds()
    path = next((p for p in candidates if probe.exists(p)), None)
    info: dict[str, Any] = {"path": path, "found": path is not None, "error": None}
    st.data["initrd"] = info
    if path is None:
        st.warn(
            f"no initrd found ({', '.join(candidates)}): cannot tell whether the next boot has "
            "the daemon; pass --initrd PATH"
        )
        return info
    if not chosen:
        _running_kernel_check(path, probe, st)
    keyfile = cfg.keystore.keyfile
    try:
        archive = read_initrd(path, [CONFIG_IN_INITRD], [keyfile] if keyfile else [])
    except (InitrdError, OSError) as exc:
        info["error"] = show(exc, 500)
        damaged = isinstance(exc, InitrdError) and exc.damaged
        st.warn(
            f"initrd {path}: cannot read it: {info['error']}"
            + ("" if damaged else " (whether the next boot has the daemon cannot be known)"),
            broken=damaged,
            unknown=not damaged,
        )
        return info
    info["compression"] = archive.compression
    info["entries"] = len(archive.names)
    info["daemon"] = bool(archive.find("lczfs_unlockd/__init__.py"))
    info["unit"] = bool(archive.find(UNIT))
    in_initrd = archive.contents[CONFIG_IN_INITRD]
    try:
        with open(config_path, "rb") as f:
            ours: bytes | None = f.read(MAX_SMALL_FILE + 1)
    except OSError:
        ours = None
    if in_initrd is None:
        info["config"] = "missing"
    elif in_initrd == ours:
        info["config"] = "same"
    else:
        info["config"] = "different"
    for what, ok in (
        ("the daemon (lczfs_unlockd/__init__.py)", info["daemon"]),
        (f"the unit {UNIT}", info["unit"]),
        (f"the config /{CONFIG_IN_INITRD}", info["config"] != "missing"),
    ):
        if not ok:
            st.warn(
                f"initrd {path} does not contain {what}: rebuild it (dracut --force / "
                "nixos-rebuild boot)",
                broken=True,
            )
    if info["config"] == "different":
        st.warn(
            f"initrd {path} has another config than {config_path}: rebuild it (dracut --force / "
            "nixos-rebuild boot)",
            broken=True,
        )
    has_tpm2 = meta is not None and any(t.type == "systemd-tpm2" for t in meta.tokens.values())
    info["tpm2_plugin"] = bool(archive.find(TPM2_PLUGIN)) if has_tpm2 else None
    if has_tpm2 and not info["tpm2_plugin"]:
        st.warn(
            f"initrd {path} does not contain the TPM2 token plugin {TPM2_PLUGIN}: no TPM2 token "
            "can unlock at boot; rebuild it with systemd's cryptsetup plugins"
        )
    # The measurement is required with a TPM2 token enrolled or a number in
    # keystore.measure_pcr (measure.py): without the libraries it fails the unlock.
    info["tss2"] = None
    if has_tpm2 or _required_measurement(cfg):
        missing = [
            name
            for name, sonames in tss2_libraries()
            if not any(archive.find(os.path.basename(s)) for s in sonames)
        ]
        info["tss2"] = not missing
        for name in missing:
            st.warn(
                f"initrd {path} does not contain the tpm2-tss library {name} (.so.0): the daemon "
                "cannot measure the unlock, which a TPM2 token or keystore.measure_pcr requires, "
                "so the unlock fails; rebuild it with tpm2-tss's libraries (dracut's tpm2-tss "
                "module)",
                broken=True,
            )
    info["keyfile"] = None
    if keyfile:
        entry = archive.entries.get(keyfile)
        # Present and not empty; its content is never read here.
        info["keyfile"] = entry is not None and stat.S_ISREG(entry.mode) and entry.size > 0
    return info


# --- 6. the last boot ------------------------------------------------------------------

# ASCII digits, bounded: float() of 400 nines is inf, which is not JSON.
_SECONDS = r"([0-9]{1,9}(?:\.[0-9]{1,9})?)"
_DONE = re.compile(r"^(.{1,200}): done in " + _SECONDS + " s$")
_SUCCESS = re.compile(r" in " + _SECONDS + " s; keystore closed$")


def _message(entry: Mapping[str, Any]) -> str | None:
    msg = entry.get("MESSAGE")
    if isinstance(msg, list) and all(isinstance(b, int) and 0 <= b < 256 for b in msg):
        return bytes(msg).decode("utf-8", "replace")
    return msg if isinstance(msg, str) else None


def parse_journal(text: str) -> dict[str, Any]:
    """The daemon's lines of this boot (journalctl -o json): its final line and step timings."""
    out: dict[str, Any] = {
        "result": None,
        "summary": None,
        "elapsed": None,
        "keystore_method": None,
        "steps": [],
    }
    for line in text[:MAX_JOURNAL].splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        msg = _message(entry)
        if msg is None:
            continue
        msg = msg[:4096]
        if m := _DONE.match(msg):
            out["steps"].append({"step": show(m[1], 200), "seconds": float(m[2])})
            continue
        if msg.startswith("keystore opened with "):
            out["keystore_method"] = show(msg.removeprefix("keystore opened with "), 200)
            continue
        result = None
        if m := _SUCCESS.search(msg):
            result, out["elapsed"] = "unlocked", float(m[1])
        elif msg.startswith("failed: "):
            result, out["elapsed"] = "failed", None
        elif msg.startswith("dry run: "):
            result = "dry run"
        elif msg.startswith("disabled by rd.lczfs=0"):
            result = "disabled"
        if result is not None:
            out["result"], out["summary"] = result, show(msg, 1000)
    return out


def _last_boot(skip: bool, probe: Probe, st: Status) -> None:
    checked, refused = probe.flags or (paths.ROOT_CHECKED_FLAG, paths.ROOT_REFUSED_FLAG)
    info: dict[str, Any] = {
        "skipped": skip,
        "error": None,
        "root_checked": probe.exists(checked),
        "root_refused": probe.exists(refused),
    }
    st.data["last_boot"] = info
    if info["root_refused"]:
        st.warn(f"the root check refused this boot's root ({refused} exists): see the journal")
    if skip:
        return
    try:
        info.update(parse_journal(probe.journal()))
    except UnlockError as exc:
        info["error"] = show(exc, 500)
        return
    if info["result"] == "failed":
        st.warn(f"the daemon failed in this boot: {info['summary']}")


# --- 7. the verdict ---------------------------------------------------------------------


def _boot_chain(probe: Probe, st: Status) -> None:
    """A token on PCR 4 or 9 (the boot loader, the kernel and its initrd)
    predicted from this boot's values, with an initrd written after this
    boot started: the next boot measures the new one, so the match is not
    known."""
    tokens = (st.data.get("tpm2") or {}).get("tokens", [])
    initrd = st.data.get("initrd") or {}
    bound = [t for t in tokens if t["prediction"] == "match" and {4, 9} & set(t["pcrs"] or [])]
    if not bound or not initrd.get("path"):
        return
    try:
        changed = probe.mtime(initrd["path"]) > probe.boot_time() > 0
    except OSError:
        return
    for t in bound:
        t["boot_chain_changed"] = changed
        if changed:
            st.warn(
                f"TPM2 token {t['token']} is bound to PCR 4/9 (boot loader, kernel, initrd) and "
                f"the initrd {initrd['path']} was written after this boot started: the next boot "
                "measures other values, so whether it unseals cannot be known from this boot; "
                "if it does not, unlock by hand and re-enroll: lczfs-unlockd enroll tpm2",
                unknown=True,
            )


def _verdict(cfg: config.Config | None, meta: luksadmin.Metadata | None, st: Status) -> int:
    if cfg is None or meta is None:
        return EXIT_BROKEN if st.broken else EXIT_PERSON
    initrd = st.data.get("initrd") or {}
    initrd_ok = initrd.get("found") and not initrd.get("error")
    methods = cfg.keystore.unlock
    tpm2 = st.data.get("tpm2") or {}
    matching = {
        t["token"]: t
        for t in tpm2.get("tokens", [])
        if t["prediction"] == "match" and not t.get("boot_chain_changed")
    }
    armed = st.data.get("armed") or {}
    # A TPM2 token unlocks only through systemd's plugin in the initrd, and
    # only without a PIN nobody is there to type: the one-time one as any.
    tpm2_ok = initrd_ok and initrd.get("tpm2_plugin")
    armed_token = matching.get(armed.get("token")) if armed.get("armed") else None
    if tpm2_ok and armed_token is not None and not armed_token["pin"]:
        st.unattended_by.append(f"the one-time TPM2 unlock (arm-reboot, token {armed['token']})")
    if tpm2_ok and config.UnlockMethod.TOKEN in methods:
        for n, t in sorted(matching.items()):
            # A marker's token (valid: destroyed first; invalid: skipped),
            # and tokens on missing or priority-ignore slots are never tried.
            if t["unused"] is None and not t["pin"]:
                st.unattended_by.append(f"TPM2 token {n}")
    if (
        initrd_ok
        and config.UnlockMethod.KEYFILE in methods
        and cfg.keystore.keyfile
        and initrd.get("keyfile")
    ):
        st.unattended_by.append(f"the key file {cfg.keystore.keyfile} in the initrd")
    if st.broken:
        return EXIT_BROKEN
    return EXIT_UNATTENDED if st.unattended_by and not st.unknown else EXIT_PERSON


def collect(
    config_path: str, *, initrd: str | None = None, journal: bool = True, probe: Probe | None = None
) -> Status:
    """Everything ``status`` shows, as the JSON document (``Status.data``)."""
    probe = probe or Probe()
    st = Status()
    cfg = _config(config_path, st)
    meta = None
    if cfg is not None:
        meta = _keystore(cfg, probe, st)
        _armed(meta, probe, st)
        _datasets(cfg, probe, st)
        _tpm2(cfg, meta, probe, st)
        _initrd(cfg, config_path, initrd, meta, probe, st)
        _boot_chain(probe, st)
    else:
        for key in ("keystore", "datasets", "tpm2", "armed", "initrd"):
            st.data[key] = None
    _last_boot(not journal, probe, st)
    code = _verdict(cfg, meta, st)
    st.data["warnings"] = st.warnings
    st.data["unattended"] = code == EXIT_UNATTENDED
    st.data["unattended_by"] = st.unattended_by
    st.data["exit"] = code
    return st


# --- the screen ---------------------------------------------------------------------------


def _token_line(t: Mapping[str, Any]) -> str:
    slots = ", ".join(map(str, t["keyslots"])) or "none"
    text = f"token {t['id']}: {show(t['type'], 64)} (key slot {slots})"
    if t["type"] == "systemd-tpm2":
        pcrs = "+".join(map(str, t["pcrs"] or [])) or "none"
        kind = {"pcr": "PCR", "signed": "signed PCR"}.get(t["policy"], t["policy"])
        text += f": PCRs {pcrs} ({t['bank']}), {kind} policy"
        if t["signed"]:
            text += f" (signed PCRs {'+'.join(map(str, t['pubkey_pcrs'] or [])) or '?'})"
        text += ", PIN" if t["pin"] else ", no PIN"
    elif t["type"] == "systemd-fido2":
        needs = [w for w, on in (("PIN", t["pin"]), ("touch", t["presence"])) if on]
        text += f": FIDO2 ({', '.join(needs) or 'nothing asked'})"
    elif t["type"] == "systemd-pkcs11":
        text += f": PKCS#11 {t['uri']}"
    elif t["type"] == luksadmin.RECOVERY_TOKEN:
        text += ": recovery key"
    elif t["type"] == ARMED_TOKEN:
        text += f": one-time unlock marker (TPM2 token {show(t.get('lczfs_tpm2_token'), 8)})"
    return text


def render(st: Status) -> list[str]:
    d = st.data
    lines: list[str] = []
    c = d["config"]
    lines.append(f"config {c['path']}: " + ("valid" if c["valid"] else f"INVALID: {c['error']}"))
    lines += [f"  {s}" for s in c["summary"]]
    ks = d.get("keystore")
    if ks:
        if not ks["present"]:
            lines.append(f"keystore {ks['device']}: MISSING")
        elif ks["error"]:
            lines.append(f"keystore {ks['device']}: unreadable header: {ks['error']}")
        else:
            lines.append(f"keystore {ks['device']}: LUKS{ks['luks_version']}, UUID {ks['uuid']}")
            for s in ks["keyslots"]:
                tokens = ", ".join(map(str, s["tokens"]))
                how = (
                    "a passphrase or key opens it"
                    if s["human"]
                    else "priority ignore: only a token named by number opens it"
                    if s["priority"] == keystore.PRIORITY_IGNORE
                    else "token-bound"
                )
                lines.append(
                    f"  key slot {s['id']}: {s['type']} {s['kdf']}"
                    + (f", token {tokens}" if tokens else "")
                    + f" ({how})"
                )
            lines += [f"  {_token_line(t)}" for t in ks["tokens"]]
            lines.append(f"  recovery key: {'yes' if ks['recovery_key'] else 'NO'}")
    armed = d.get("armed")
    for marker in (armed or {}).get("markers", []):
        if not marker["valid"]:
            lines.append(f"one-time unlock (arm-reboot): marker {marker['marker']} not usable")
            continue
        state = (
            "armed"
            if armed and armed["armed"] and armed["marker"] == marker["marker"]
            else "expired"
            if marker["expired"]
            else "not used"
        )
        lines.append(
            f"one-time unlock (arm-reboot): {state}, key slot "
            f"{', '.join(map(str, marker['keyslots']))} (token {marker['token']}), expires "
            f"{marker['expires_iso']}"
        )
    ds = d.get("datasets")
    if ds:
        lines.append(f"encryption roots of {ds['pool']} (datasets = {ds['mode']}):")
        if ds["error"]:
            lines.append(f"  cannot list them: {ds['error']}")
        for r in ds["encryption_roots"]:
            mark = "  <- auto" if ds["mode"] == "auto" and r["auto"] else ""
            lines.append(
                f"  {r['name']}  keylocation={r['keylocation']} keyformat={r['keyformat']} "
                f"keystatus={r['keystatus']}{mark}"
            )
        for e in ds["configured"]:
            lines.append(f"  configured {e['name']}: " + ("ok" if e["exists"] else "MISSING"))
        lines.append(f"  the daemon loads: {', '.join(ds['targets']) or 'nothing'}")
    tpm = d.get("tpm2")
    if tpm:
        where = tpm["sysfs"] if tpm["present"] else "none"
        pcr = tpm["measure_pcr"]
        lines.append(
            f"TPM2: {where}; the daemon measures the unlock into "
            + (f"PCR {pcr} (predicted zero at the next unseal)" if pcr is not None else "no PCR")
        )
        for t in tpm["tokens"]:
            n = t["token"]
            if t["prediction"] == "match":
                lines.append(
                    f"  TPM2 token {n}: will unseal at the next boot if the firmware/boot chain "
                    "is unchanged" + (" (with its PIN)" if t.get("pin") else "")
                )
            elif t["prediction"] == "mismatch":
                lines.append(f"  TPM2 token {n}: will NOT unseal (policy mismatch)")
            else:
                lines.append(f"  TPM2 token {n}: {t['prediction']}: {t.get('detail', '')}")
            if t.get("unused"):
                lines.append(f"    not used at boot: {t['unused']}")
    ini = d.get("initrd")
    if ini:
        if not ini["found"]:
            lines.append("initrd: not found")
        elif ini["error"]:
            lines.append(f"initrd {ini['path']}: {ini['error']}")
        else:
            parts = [
                f"{ini['compression'].replace('none', 'uncompressed')}, {ini['entries']} entries",
                "daemon" if ini["daemon"] else "NO daemon",
                "unit" if ini["unit"] else f"NO {UNIT}",
                {"same": "this config", "different": "ANOTHER config"}.get(
                    ini["config"], "NO config"
                ),
            ]
            if ini["tpm2_plugin"] is not None:
                parts.append("TPM2 token plugin" if ini["tpm2_plugin"] else "NO TPM2 token plugin")
            if ini["tss2"] is not None:
                parts.append("tpm2-tss" if ini["tss2"] else "NOT all of tpm2-tss")
            if ini["keyfile"] is not None:
                parts.append("the key file" if ini["keyfile"] else "NOT the key file")
            lines.append(f"initrd {ini['path']}: {', '.join(parts)}")
    lb = d["last_boot"]
    flags = f"root-checked {'yes' if lb['root_checked'] else 'no'}, "
    flags += f"root-refused {'YES' if lb['root_refused'] else 'no'}"
    if lb["skipped"]:
        lines.append(f"last boot: journal not read (--no-journal); {flags}")
    elif lb["error"]:
        lines.append(f"last boot: cannot read the journal: {lb['error']}; {flags}")
    else:
        lines.append(f"last boot: {lb['summary'] or 'no final line of the daemon'}; {flags}")
        if lb["keystore_method"]:
            lines.append(f"  keystore opened with {lb['keystore_method']}")
        if lb["steps"]:
            lines.append(
                "  steps: " + ", ".join(f"{s['step']} {s['seconds']:.2f} s" for s in lb["steps"])
            )
    for w in d["warnings"]:
        lines.append(f"WARNING: {w}")
    code = d["exit"]
    if code == EXIT_UNATTENDED:
        verdict = "the next boot is expected to unlock unattended (" + ", ".join(d["unattended_by"])
        verdict += ")"
    elif code == EXIT_PERSON:
        verdict = (
            "the next boot will need a person (passphrase, PIN or touch), or it cannot be known"
        )
    else:
        verdict = "the next boot is expected to FAIL, or something is dangerously wrong"
    lines.append(f"verdict: {verdict} [exit {code}]")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd status",
        description="Show whether the next boot will unlock the pool, and whether unattended: "
        "the config, the keystore's key slots and tokens (TPM2 policy, FIDO2, recovery key, an "
        "armed one-time unlock), the encryption roots the daemon would load, whether each TPM2 "
        "token's PCR policy matches the PCR values the next boot will present, whether the "
        "initrd on disk holds the daemon and this config, and the last boot's result. Changes "
        "nothing.",
        epilog="exit status: 0 the next boot is expected to unlock unattended; 1 it will need a "
        "person (passphrase, PIN, FIDO2 touch) or it cannot be known; 2 it is expected to fail "
        "or something is dangerously wrong (config invalid, keystore missing, initrd without "
        "the daemon or with another config, only token-bound key slots). "
        "example: lczfs-unlockd status --json | jq .warnings",
    )
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    parser.add_argument("--json", action="store_true", help="print it as one JSON object")
    parser.add_argument(
        "--initrd",
        metavar="PATH",
        help="the initrd to check (default: NixOS's system profile's, else /boot/initrd.img "
        "(Debian's default boot entry), else the newest /boot/initrd.img-* or "
        "/boot/initramfs-*.img; a warning when that is not the running kernel's)",
    )
    parser.add_argument(
        "--no-journal", action="store_true", help="do not read the last boot from the journal"
    )
    return parser


def main(argv: Sequence[str], probe: Probe | None = None) -> int:
    args = _parser().parse_args(list(argv))
    st = collect(args.config, initrd=args.initrd, journal=not args.no_journal, probe=probe)
    if args.json:
        # allow_nan=False: every number shown is bounded; jq refuses Infinity.
        print(json.dumps(st.data, indent=2, ensure_ascii=False, allow_nan=False), flush=True)
    else:
        print("\n".join(render(st)), flush=True)
    return int(st.data["exit"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
