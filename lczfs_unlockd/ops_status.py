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
import json
import mmap
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import config, luksadmin, paths, process, tpm2policy
from .errors import UnlockError
from .keyformat import key_file_path
from .ops_common import load_config
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


def default_initrds() -> list[str]:
    """Where the next boot's initrd is, most likely first.

    NixOS: the system profile's (what the boot loader's default entry
    boots, also after ``nixos-rebuild boot``), then the running
    generation's.  dracut: the running kernel's image in /boot (Debian's
    and Fedora's names); a newer kernel installed since has its own.
    """
    release = os.uname().release
    return [
        *NIXOS_INITRDS,
        f"/boot/initrd.img-{release}",
        f"/boot/initramfs-{release}.img",
    ]


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


def _int_list(value: object, hi: int = 31) -> list[int] | None:
    """A JSON list of small integers (or their strings), or None if it is not one."""
    if not isinstance(value, list) or len(value) > 32:
        return None
    out = []
    for v in value:
        if isinstance(v, str) and v.isdigit() and len(v) <= 3:
            v = int(v)
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
    pubkey_pcrs = _int_list(fields.get("tpm2_pubkey_pcrs", []), tpm2policy.MAX_PCR)
    signed = bool(fields.get("tpm2_pubkey")) or bool(pubkey_pcrs)
    pcrlock = _flag(fields, "tpm2_pcrlock")
    return {
        "pcrs": pcrs,
        "bank": bank.lower() if isinstance(bank, str) else show(bank, 40),
        "policy_hash": _hex_list(fields.get("tpm2-policy-hash")),
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
            entry[key] = value if isinstance(value, int) else show(value, 40)
    return entry


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
    except UnlockError as exc:
        ks["error"] = show(exc, 1000)
        st.warn(f"cannot read the LUKS header of {device}: {ks['error']}", broken=True)
        return None
    human = meta.human_slots()
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
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _armed(meta: luksadmin.Metadata | None, probe: Probe, st: Status) -> int | None:
    """The armed marker, checked as the daemon checks it; returns its TPM2 token's number."""
    markers = [] if meta is None else [t for t in meta.tokens.values() if t.type == ARMED_TOKEN]
    if not markers:
        st.data["armed"] = {"armed": False}
        return None
    marker = markers[0]
    f = marker.fields
    raw_token, expires, armed_at = f.get("lczfs_tpm2_token"), f.get("expires"), f.get("armed_at")
    token = int(raw_token) if isinstance(raw_token, str) and raw_token.isdigit() else None
    tpm2 = meta.tokens.get(token) if meta is not None and token is not None else None
    info: dict[str, Any] = {
        "armed": False,
        "marker": marker.id,
        "keyslots": list(marker.keyslots),
        "token": token,
        "armed_at": armed_at if isinstance(armed_at, int) else None,
        "expires": expires if isinstance(expires, int) else None,
        "expires_iso": None,
        "expired": None,
        "valid": False,
    }
    st.data["armed"] = info
    valid = (
        tpm2 is not None
        and tpm2.type == "systemd-tpm2"
        and len(marker.keyslots) == 1
        and marker.keyslots[0] in tpm2.keyslots
        and isinstance(expires, int)
        and not isinstance(expires, bool)
        and 0 < expires < 2**40
    )
    if not valid:
        st.warn(
            f"token {marker.id} is an lczfs-armed marker the daemon will not use (its TPM2 "
            "token or key slot is missing or it has no valid expiry): lczfs-unlockd disarm"
        )
        return None
    assert isinstance(expires, int)
    info["valid"] = True
    info["expires_iso"] = _iso(expires)
    info["expired"] = probe.now() >= expires
    if info["expired"]:
        st.warn(
            f"the one-time unlock (arm-reboot) expired at {info['expires_iso']}: the next boot "
            "will not use it and destroys it; lczfs-unlockd disarm removes it now"
        )
        return None
    info["armed"] = True
    return token


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
    predicted = tpm2policy.sealing_policy(bank, values, pin=details["pin"]).hex()
    out["predicted"] = predicted
    if predicted in hashes:
        return "match", out
    out["candidates"] = [p for p in pcrs if p != measured]
    return "mismatch", out


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
    tokens = [] if meta is None else [t for t in meta.tokens.values() if t.type == "systemd-tpm2"]
    if not tokens:
        return
    if not present:
        st.warn(
            f"no TPM2 on this machine ({probe.tpm_sysfs} does not exist): the systemd-tpm2 "
            f"token(s) {', '.join(str(t.id) for t in tokens)} cannot unseal"
        )
        for t in tokens:
            info["tokens"].append({"token": t.id, "prediction": "unknown", "detail": "no TPM2"})
        return
    for t in sorted(tokens, key=lambda t: t.id):
        details = _tpm2_details(t.fields)
        prediction, out = predict(details, probe.tpm_sysfs, measured)
        entry = {"token": t.id, "prediction": prediction, **details, **out}
        info["tokens"].append(entry)
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
# --no-sparse: a sparse output file whose end is zeros is only extended to its
# full size at the very end, which a complaint about the padding skips.
_TOOLS: dict[str, Callable[[str, str], list[str]]] = {
    "zstd": lambda src, dst: ["zstd", "-d", "-q", "-f", "--no-sparse", "-o", dst, src],
    "lz4": lambda src, dst: ["lz4", "-d", "-q", "-f", "--no-sparse", src, dst],
}
_CHUNK = 1 << 20


class InitrdError(Exception):
    """The initrd cannot be read or is not a cpio archive (the message says why)."""


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

    def find(self, suffix: str) -> list[str]:
        return [n for n in self.names if n == suffix or n.endswith("/" + suffix)]


def _resolve(
    names: Mapping[str, Entry], buffers: Sequence[bytes | mmap.mmap], name: str
) -> Entry | None:
    """An entry by path, following symlinks inside the archive (8 hops at most)."""
    name = name.strip("/")
    for _ in range(8):
        entry = names.get(name)
        if entry is None or not stat.S_ISLNK(entry.mode) or entry.size > 4096:
            return entry
        raw = bytes(buffers[entry.source][entry.offset : entry.offset + entry.size])
        target = raw.decode("utf-8", "surrogateescape")
        base = "" if target.startswith("/") else os.path.dirname(name)
        name = os.path.normpath(os.path.join(base, target)).strip("/")
    return None


def _hexfield(header: bytes, index: int) -> int:
    raw = header[6 + 8 * index : 14 + 8 * index]
    if not re.fullmatch(rb"[0-9a-fA-F]{8}", raw):
        raise InitrdError(f"cpio header field {index} is not hexadecimal ({show(raw)})")
    return int(raw, 16)


def parse_cpio(data: bytes | mmap.mmap, pos: int, source: int, names: dict[str, Entry]) -> int:
    """One newc cpio archive from ``pos`` to its TRAILER!!!; returns where it ends."""
    end = len(data)
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
        names[name.removeprefix("./").strip("/")] = Entry(mode, source, data_start, size)


def _parse_all(data: bytes | mmap.mmap, pos: int, source: int, names: dict[str, Entry]) -> int:
    """Concatenated cpio archives from ``pos`` (zero padding between them); returns
    where something that is not a cpio archive starts (or the end)."""
    while pos < len(data):
        if data[pos] == 0:
            pos += 1
            continue
        if bytes(data[pos : pos + 6]) not in _CPIO_MAGICS:
            return pos
        pos = parse_cpio(data, pos, source, names)
    return pos


def _compression(head: bytes) -> str | None:
    for magic, name in _COMPRESSIONS:
        if head.startswith(magic):
            return name
    return None


def _decompress_into(
    kind: str, data: bytes | mmap.mmap, start: int, out: BinaryIO, workdir: str
) -> None:
    """The compressed rest of the initrd from ``start``, unpacked into ``out``.

    gzip, xz, lzma and bzip2 in-process, bounded while they unpack; zstd
    and lz4 through their programs, with a deadline, in a private directory.
    """
    if kind not in _TOOLS:
        import bz2
        import lzma

        dec: Any
        if kind == "gzip":
            dec = zlib.decompressobj(wbits=31)
        elif kind == "bzip2":
            dec = bz2.BZ2Decompressor()
        else:
            dec = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
        written = 0
        try:
            for offset in range(start, len(data), _CHUNK):
                chunk = dec.decompress(bytes(data[offset : offset + _CHUNK]))
                written += len(chunk)
                if written > MAX_INITRD:
                    raise InitrdError(f"it unpacks to more than {MAX_INITRD >> 20} MiB")
                out.write(chunk)
                if dec.eof:  # what follows is padding
                    break
        except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
            raise InitrdError(f"cannot unpack its {kind} archive: {exc}") from None
        return
    # Zero padding after the stream: lz4 complains after a complete output,
    # zstd deletes its output.  zstd gets the stream without the trailing
    # zeros, then with up to 8 of them back (a frame may end in zero bytes).
    end = len(data)
    while kind == "zstd" and end > start and data[end - 1] == 0:
        end -= 1
    src, dst = os.path.join(workdir, "packed"), os.path.join(workdir, "unpacked")
    result: process.Result | None = None
    for extra in range(9 if end < len(data) else 1):
        with open(src, "wb") as f:
            for offset in range(start, end, _CHUNK):
                f.write(data[offset : min(offset + _CHUNK, end)])
            f.write(bytes(min(extra, len(data) - end)))
        try:
            result = process.run(_TOOLS[kind](src, dst), check=False, timeout=DECOMPRESS_TIMEOUT)
        except UnlockError as exc:
            raise InitrdError(f"cannot unpack its {kind} archive: {exc}") from None
        if os.path.exists(dst):
            break
    # A truncated archive leaves a partial output: the cpio parse fails on it.
    if not os.path.exists(dst):
        assert result is not None
        raise InitrdError(f"cannot unpack its {kind} archive: {show(result.error(), 500)}")
    if os.path.getsize(dst) > MAX_INITRD:
        raise InitrdError(f"it unpacks to more than {MAX_INITRD >> 20} MiB")
    with open(dst, "rb") as f:
        shutil.copyfileobj(f, out)


def _mapped(stack: contextlib.ExitStack, f: BinaryIO) -> bytes | mmap.mmap:
    f.flush()
    if os.fstat(f.fileno()).st_size == 0:
        return b""
    return stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def read_initrd(path: str, wanted: Sequence[str] = ()) -> Initrd:
    """Every entry of an initrd (early uncompressed cpio archives such as the
    microcode, then the main one, compressed or not), and the content of the
    ``wanted`` paths, symlinks inside the archive followed (NixOS links
    /etc files into its store)."""
    try:
        # O_NONBLOCK: a FIFO put there must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise InitrdError(f"cannot read it: {exc.strerror}") from None
    names: dict[str, Entry] = {}
    compression = "none"
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(os.fdopen(fd, "rb"))
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InitrdError("not a regular file")
        if st.st_size > MAX_INITRD:
            raise InitrdError(f"larger than {MAX_INITRD >> 20} MiB")
        buffers = [_mapped(stack, f)]
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
            _decompress_into(kind, data, pos, out, workdir)
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
        return Initrd(names, compression, contents)


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
    keyfile = cfg.keystore.keyfile
    wanted = [CONFIG_IN_INITRD, *([keyfile] if keyfile else [])]
    try:
        archive = read_initrd(path, wanted)
    except (InitrdError, OSError) as exc:
        info["error"] = show(exc, 500)
        st.warn(f"initrd {path}: cannot read it: {info['error']}", broken=True)
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
    info["keyfile"] = archive.contents[keyfile] is not None if keyfile else None
    return info


# --- 6. the last boot ------------------------------------------------------------------

_DONE = re.compile(r"^(.{1,200}): done in (\d+(?:\.\d+)?) s$")
_SUCCESS = re.compile(r" in (\d+(?:\.\d+)?) s; keystore closed$")


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


def _verdict(cfg: config.Config | None, meta: luksadmin.Metadata | None, st: Status) -> int:
    if cfg is None or meta is None:
        return EXIT_BROKEN if st.broken else EXIT_PERSON
    initrd = st.data.get("initrd") or {}
    initrd_ok = initrd.get("found") and not initrd.get("error")
    methods = cfg.keystore.unlock
    tpm2 = st.data.get("tpm2") or {}
    matching = {t["token"]: t for t in tpm2.get("tokens", []) if t["prediction"] == "match"}
    armed = st.data.get("armed") or {}
    if initrd_ok and armed.get("armed") and armed.get("token") in matching:
        st.unattended_by.append(f"the one-time TPM2 unlock (arm-reboot, token {armed['token']})")
    # A valid marker's token is destroyed before the configured methods run
    # (expired or not): it is never one of them.
    armed_token = armed.get("token") if armed.get("valid") else None
    if initrd_ok and config.UnlockMethod.TOKEN in methods and initrd.get("tpm2_plugin"):
        for n, t in sorted(matching.items()):
            if n != armed_token and not t["pin"]:
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
                how = "a passphrase or key opens it" if s["human"] else "token-bound"
                lines.append(
                    f"  key slot {s['id']}: {s['type']} {s['kdf']}"
                    + (f", token {tokens}" if tokens else "")
                    + f" ({how})"
                )
            lines += [f"  {_token_line(t)}" for t in ks["tokens"]]
            lines.append(f"  recovery key: {'yes' if ks['recovery_key'] else 'NO'}")
    armed = d.get("armed")
    if armed and armed.get("marker") is not None:
        state = "armed" if armed["armed"] else "expired" if armed["expired"] else "not usable"
        lines.append(
            f"one-time unlock (arm-reboot): {state}, key slot "
            f"{', '.join(map(str, armed['keyslots']))} (token {armed['token']}), expires "
            f"{armed['expires_iso'] or '?'}"
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
        help="the initrd to check (default: NixOS's system profile's, else "
        "/boot/initrd.img-$(uname -r) or /boot/initramfs-$(uname -r).img)",
    )
    parser.add_argument(
        "--no-journal", action="store_true", help="do not read the last boot from the journal"
    )
    return parser


def main(argv: Sequence[str], probe: Probe | None = None) -> int:
    args = _parser().parse_args(list(argv))
    st = collect(args.config, initrd=args.initrd, journal=not args.no_journal, probe=probe)
    if args.json:
        print(json.dumps(st.data, indent=2, ensure_ascii=False), flush=True)
    else:
        print("\n".join(render(st)), flush=True)
    return int(st.data["exit"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
