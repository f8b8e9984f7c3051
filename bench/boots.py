"""Guest boots: lczfs-unlockd against the seed's unit chain, late disks, memory.

Every boot is initrd-only (no root= on the command line): the bench's report
unit (guest/bench-report.service, POSIX sh) runs once the unlock under test is
over, writes systemd's timestamps and the journal to the report disk and
powers off.  Both sides boot the same kernel and golden disk (seed0: the
seed's layout, LUKS2 argon2id keystore), unlock the keystore with the same
key file (keyslot 1), and have the distribution's own zfs-import-scan /
zfs-import-cache masked (NixOS has neither; on the lczfs side they would only
run after the daemon anyway).

* ``lczfs``: the harness's base initrd (dracut with this project's module
  and the current daemon package) + config + key file.
* ``seed``: the same dracut run without the module + the seed's five units
  (guest/seed/) + crypttab + the key file.
* ``poll``: the initrd without the module + NixOS's zfs-import-rpool loop
  (1-second polling) importing only; for late disks.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import size
from .common import GUEST, build, cpio, log, qemu, spread, vm

KEYFILE = "/etc/lczfs-unlockd/keystore.key"
SEED_PART = "/dev/disk/by-id/virtio-seed0-part1"
UNITS_DIR = "usr/lib/systemd/system"
WANTS = "etc/systemd/system"
SEED_UNITS = (
    "zfs-import-rpool-volumes.service",
    "zfs-import-rpool.service",
    "bootsecrets.mount",
    "mask-bootsecrets.service",
    "mask-secretsroot.service",
)
ZVOL_DEVICE = r"dev-zvol-rpool-volumes-bootsecrets\x2dpart1.device"
BOOT_TIMEOUT = 400.0


@dataclass(frozen=True)
class Spec:
    kind: str  # lczfs | seed | poll
    late: bool = False  # disk hot-plugged hotplug_delay s after the unit under test starts
    instrumented: bool = False  # lczfs only: --timings, through guest/lczfs/launch.py
    hotplug_delay: float = 3.0
    cmdline: str = ""

    @property
    def name(self) -> str:
        return self.kind + ("-late" if self.late else "") + ("-instr" if self.instrumented else "")


def _common(a: cpio.Archive, key: bytes) -> None:
    build.poweroff_links(a)
    a.file(KEYFILE.lstrip("/"), key, 0o400)
    a.copy(GUEST / "bench-report.sh", "usr/lib/lczfs-bench/bench-report.sh", 0o755)
    a.copy(GUEST / "bench-report.service", f"{UNITS_DIR}/bench-report.service", 0o644)
    a.symlink(
        f"{WANTS}/initrd.target.wants/bench-report.service",
        "/usr/lib/systemd/system/bench-report.service",
    )
    for unit in ("zfs-import-scan.service", "zfs-import-cache.service"):
        a.symlink(f"{WANTS}/{unit}", "/dev/null")


def _wants(a: cpio.Archive, target: str, unit: str) -> None:
    a.symlink(f"{WANTS}/{target}.wants/{unit}", f"/usr/lib/systemd/system/{unit}")


class Initrds:
    """Builds (once per run) the initrds of each kind."""

    def __init__(self, guest: vm.Guest, work: Path) -> None:
        self.guest = guest
        self.work = work
        self.with_img = build.base_initrd(guest.root)
        self._without_img: Path | None = None  # only the seed and poll sides need it
        self._lczfs_overlay: dict[bool, bytes] = {}
        self._done: dict[str, Path] = {}

    @property
    def without_img(self) -> Path:
        if self._without_img is None:
            self._without_img = size.without_initrd(self.guest.root, self.with_img)
        return self._without_img

    def _lczfs(self, spec: Spec) -> bytes:
        devices = [SEED_PART] if spec.late else []
        if spec.late not in self._lczfs_overlay:
            config = vm.toml_config(
                unlock=("keyfile", "passphrase"), keyfile=KEYFILE, devices=devices
            )
            self._lczfs_overlay[spec.late] = build.overlay(
                build.Overlay(config=config, report=False)
            )
        a = cpio.Archive()
        _common(a, self.guest.secrets.bytes("keystore.key"))
        if spec.instrumented:
            a.copy(GUEST / "lczfs" / "launch.py", "usr/lib/lczfs-bench/launch.py", 0o644)
            a.copy(
                GUEST / "lczfs" / "bench.conf",
                "etc/systemd/system/lczfs-unlockd.service.d/bench.conf",
                0o644,
            )
        with_overlay = cpio.append(self.with_img.read_bytes(), self._lczfs_overlay[spec.late])
        return cpio.append(with_overlay, a.to_bytes())

    def _seed(self, spec: Spec) -> bytes:
        a = cpio.Archive()
        _common(a, self.guest.secrets.bytes("keystore.key"))
        seed = GUEST / "seed"
        a.copy(seed / "zfs-import-rpool.sh", "usr/lib/lczfs-bench/zfs-import-rpool.sh", 0o755)
        if spec.kind == "poll":
            # NixOS's import loop alone: the chain's keystore units would
            # deadlock without the seed's early import (they wait for the zvol).
            unit = (
                (seed / "zfs-import-rpool.service")
                .read_text()
                .replace("zfs-import-rpool.sh", "zfs-import-rpool.sh --import-only")
            )
            a.file(f"{UNITS_DIR}/zfs-import-rpool.service", unit, 0o644)
            _wants(a, "initrd.target", "zfs-import-rpool.service")
        else:
            a.copy(seed / "crypttab", "etc/crypttab", 0o644)
            for unit in SEED_UNITS:
                a.copy(seed / unit, f"{UNITS_DIR}/{unit}", 0o644)
            # WantedBy= of the seed's units (NixOS writes these links too).
            _wants(a, "cryptsetup.target", "zfs-import-rpool-volumes.service")
            _wants(a, ZVOL_DEVICE, "zfs-import-rpool-volumes.service")
            _wants(a, "zfs-import-rpool.service", "bootsecrets.mount")
            # NixOS: requiredBy sysroot's mounts and zfs-import.target; an
            # initrd-only boot pulls it in from initrd.target.
            _wants(a, "initrd.target", "zfs-import-rpool.service")
            _wants(a, "zfs-import.target", "zfs-import-rpool.service")
            for unit in ("mask-bootsecrets.service", "mask-secretsroot.service"):
                _wants(a, "initrd-switch-root.target", unit)
                # bench: also from initrd.target (no switch-root in these boots).
                _wants(a, "initrd.target", unit)
        return cpio.append(self.without_img.read_bytes(), a.to_bytes())

    def get(self, spec: Spec) -> Path:
        key = f"{spec.kind}-{spec.late}-{spec.instrumented}"
        if key not in self._done:
            data = self._lczfs(spec) if spec.kind == "lczfs" else self._seed(spec)
            path = self.work / f"initrd-{spec.name}.img"
            path.write_bytes(data)
            self._done[key] = path
        return self._done[key]


# --- one boot -------------------------------------------------------------------


def _parse_report(data: bytes) -> dict[str, Any] | None:
    if not data.startswith(b"LCZFSBENCH1 "):
        return None
    header, _, rest = data.partition(b"\n")
    text = rest[: int(header.split()[1])].decode(errors="replace")
    sections: dict[str, str] = {}
    for chunk in re.split(r"^=== ", text, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        sections[name.strip()] = body
    out: dict[str, Any] = {"units": {}, "journal": [], "raw": {}}
    for name, body in sections.items():
        if name.startswith("unit ") or name == "manager":
            props = dict(line.split("=", 1) for line in body.splitlines() if "=" in line)
            if name == "manager":
                out["manager"] = props
            else:
                out["units"][name[5:]] = props
        elif name == "journal":
            for line in body.splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        out["journal"].append(json.loads(line))
        elif name in ("timing", "launcher"):
            out[name] = json.loads(body) if body.strip() else None
        else:
            out["raw"][name] = body
    return out


def _us(props: dict[str, str] | None, key: str) -> float | None:
    if not props:
        return None
    value = props.get(key, "")
    return int(value) / 1e6 if value.isdigit() and int(value) > 0 else None


def _journal_time(report: dict[str, Any], pattern: str, after: float = 0.0) -> float | None:
    rx = re.compile(pattern)
    for entry in report["journal"]:
        msg = entry.get("MESSAGE")
        if not isinstance(msg, str) or not rx.search(msg):
            continue
        ts = entry.get("_SOURCE_MONOTONIC_TIMESTAMP") or entry.get("__MONOTONIC_TIMESTAMP")
        t = int(ts) / 1e6
        if t >= after:
            return t
    return None


def _consumed_peak(report: dict[str, Any], unit: str) -> str | None:
    """systemd's "<unit>: Consumed ... CPU time, <N> memory peak." line, as logged."""
    rx = re.compile(re.escape(unit) + r"\.service: Consumed .*?([\d.]+[KMG]?) memory peak")
    for entry in report["journal"]:
        m = rx.search(str(entry.get("MESSAGE", "")))
        if m:
            return m.group(1)
    return None


def keyslot_pbkdf_memory(guest: vm.Guest) -> int | None:
    """The keystore's argon2id memory cost, from the provisioning boot's luksDump."""
    log_path = guest.golden / "run" / "console.log"
    if not log_path.exists():
        return None
    text = log_path.read_text(errors="replace")
    m = re.search(r"PBKDF:\s+argon2id.*?Memory:\s+(\d+)", text, re.S)
    return int(m.group(1)) * 1024 if m else None


def run_boot(guest: vm.Guest, initrds: Initrds, spec: Spec, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    initrd = initrds.get(spec)
    return qemu.retry_on_crash(spec.name, lambda: _run_boot_once(guest, initrd, spec, work))


def _run_boot_once(guest: vm.Guest, initrd: Path, spec: Spec, work: Path) -> dict[str, Any]:
    seed = qemu.overlay_image(guest.golden / "seed0.qcow2", work / "seed0.qcow2")
    report_disk = qemu.raw_image(work / "report.raw")
    disks = [qemu.Disk(report_disk, "lczfsreport", "raw")]
    if not spec.late:
        disks.insert(0, qemu.Disk(seed, "seed0"))
    m = qemu.Machine(guest.kernel, initrd, work, disks=disks, cmdline=spec.cmdline)
    started = time.monotonic()
    hotplugged_at = None
    try:
        m.start()
        if spec.late:
            # Plug once the unit under test polls and coldplug is over (the
            # disk driver loaded, udev idle: basic.target comes after
            # systemd-udev-settle, which zfs-load-module pulls in).
            m.expect(r"Reached target [^\n]*basic\.target", BOOT_TIMEOUT)
            if spec.kind == "lczfs":
                m.expect(r"waiting for rpool", BOOT_TIMEOUT)
            else:
                m.expect(r"Start(ing|ed) [^\n]*zfs-import-rpool", BOOT_TIMEOUT)
            time.sleep(spec.hotplug_delay)
            m.hotplug(qemu.Disk(seed, "seed0"))
            hotplugged_at = m.elapsed()
        m.wait(BOOT_TIMEOUT)
    finally:
        m.close()
    report = _parse_report(report_disk.read_bytes())
    if report is None:
        tail = "\n".join(m.console_text().splitlines()[-30:])
        raise RuntimeError(f"{spec.name}: no report; console {work}/console.log:\n{tail}")
    result = {
        "name": spec.name,
        "wall_seconds": time.monotonic() - started,
        "hotplugged_at_wall": hotplugged_at,
    }
    result.update(_metrics(spec, report))
    (work / "report.json").write_text(json.dumps(report))
    return result


STEPS = ("pool", "keystore_device", "keystore_open", "mount", "keys")


def timing_metrics(
    timing: dict[str, Any], launcher: dict[str, Any] | None, start: float | None
) -> dict[str, Any]:
    """An instrumented boot's numbers from the daemon's ``--timings`` file.

    ``timing`` is ``{"events": {name: {"t", "rss"}}, "VmHWM", "VmPeak"}``
    (lczfs_unlockd/cli.py), every event the first time it happened;
    ``launcher`` the stamp of guest/lczfs/launch.py's first line; ``start``
    the process start (systemd's ExecMainStartTimestampMonotonic).
    """
    ev: dict[str, dict[str, float]] = timing.get("events") or {}

    def t(name: str) -> float | None:
        return ev[name]["t"] if name in ev else None

    def between(a: str, b: str) -> float | None:
        ta, tb = t(a), t(b)
        return tb - ta if ta is not None and tb is not None else None

    out: dict[str, Any] = {"vmhwm_bytes": timing.get("VmHWM"), "vmpeak_bytes": timing.get("VmPeak")}
    if start:
        if launcher and "launcher" in launcher:
            out["start_to_launcher_s"] = launcher["launcher"] - start  # interpreter ready
        for key, event in (
            ("start_to_imported_s", "main"),  # cli.main entered: the daemon's modules imported
            ("start_to_first_action_s", "first_subprocess"),  # the pool scan or import
        ):
            if event in ev:
                out[key] = ev[event]["t"] - start
    out["pyzfs_import_s"] = between("pyzfs_import", "pyzfs_imported")
    out["first_lzc_call_s"] = between("lzc_load_key", "lzc_load_key_done")
    out["pyzfs_import_to_first_lzc_end_s"] = between("pyzfs_import", "lzc_load_key_done")
    out["kdf_s"] = between("kdf", "kdf_done")
    out["step_s"] = {step: between(step, f"{step}_done") for step in STEPS}
    # Every sample is taken in Python, so none lies inside libcryptsetup's
    # activation call (kdf and kdf_done are just before and after it): the
    # largest of them is the peak outside the PBKDF.  Anything between the two
    # (a sample from a callback, say) is left out all the same.
    lo, hi = t("kdf"), t("kdf_done")
    outside = [
        e["rss"]
        for e in ev.values()
        if e.get("rss") and not (lo is not None and hi is not None and lo < e["t"] < hi)
    ]
    out["rss_outside_pbkdf_bytes"] = max(outside, default=None)
    out["rss_bytes"] = {name: e.get("rss") for name, e in ev.items()}
    return {k: v for k, v in out.items() if v is not None}


def _metrics(spec: Spec, r: dict[str, Any]) -> dict[str, Any]:
    u = r["units"]
    userspace = _us(r.get("manager"), "UserspaceTimestampMonotonic") or 0.0
    out: dict[str, Any] = {"userspace_start": userspace, "keystatus": r["raw"].get("keystatus")}
    out["dmsetup"] = r["raw"].get("dmsetup", "").strip()
    out["bootsecrets_mounted"] = bool(r["raw"].get("mounts", "").strip())
    if spec.kind == "lczfs":
        d = u.get("lczfs-unlockd.service", {})
        out["ok"] = d.get("Result") == "success" and d.get("ActiveState") == "active"
        out["status"] = d.get("StatusText")
        out["unit_start"] = _us(d, "ExecMainStartTimestampMonotonic")
        out["end"] = _us(d, "ActiveEnterTimestampMonotonic")  # READY=1: keys loaded, closed
        out["keys_loaded"] = _journal_time(r, r"^(<\d>)?loaded key of ")
        peak = d.get("MemoryPeak", "")
        out["memory_peak_cgroup_bytes"] = int(peak) if peak.isdigit() else None
        if r.get("timing"):
            out["timing"] = r["timing"]
            out["launcher"] = r.get("launcher")
            out.update(timing_metrics(r["timing"], r.get("launcher"), out["unit_start"]))
    else:
        imp = u.get("zfs-import-rpool.service", {})
        if spec.kind == "seed":
            crypt = u.get("systemd-cryptsetup@secretsroot.service", {})
            mask = u.get("mask-secretsroot.service", {})
            early = u.get("zfs-import-rpool-volumes.service", {})
            out["unit_start"] = _us(early, "InactiveExitTimestampMonotonic")
            out["keys_loaded"] = _us(imp, "ActiveEnterTimestampMonotonic")
            out["keystore_closed"] = _us(crypt, "InactiveEnterTimestampMonotonic")
            out["cryptsetup_memory_peak"] = _consumed_peak(r, "systemd-cryptsetup@secretsroot")
            ends = (
                out["keys_loaded"],
                out["keystore_closed"],
                _us(mask, "InactiveEnterTimestampMonotonic"),
            )
            out["end"] = max((t for t in ends if t), default=None)
            out["ok"] = (
                imp.get("Result") == "success"
                and mask.get("Result") == "success"
                and "rpool/crypt\tavailable" in (out["keystatus"] or "")
            )
        else:
            out["unit_start"] = _us(imp, "InactiveExitTimestampMonotonic")
            out["ok"] = imp.get("Result") == "success"
    if out.get("keys_loaded"):
        out["keys_loaded_from_userspace_s"] = out["keys_loaded"] - userspace
    if out.get("end"):
        out["unlock_from_userspace_s"] = out["end"] - userspace
        out["unlock_from_kernel_s"] = out["end"]
    if spec.late:
        disk = _journal_time(r, r"virtio_blk virtio\d+: \[vdb\]")
        udev = _us(u.get(r"dev-disk-by\x2did-virtio\x2dseed0\x2dpart1.device"),
                   "ActiveEnterTimestampMonotonic")  # fmt: skip
        if spec.kind == "lczfs":  # rd.lczfs.debug logs the commands
            imp_start = _journal_time(r, r"running zpool import -N", disk or 0.0)
            imported = _journal_time(r, r"importing pool rpool: done", disk or 0.0)
        else:
            imp_start = _journal_time(r, r"lczfs-bench: importing rpool", disk or 0.0)
            imported = _journal_time(r, r"lczfs-bench: rpool imported", disk or 0.0)
        out.update(disk_appeared=disk, udev_device=udev, import_start=imp_start, imported=imported)
        if disk and imported:
            out["late_disk_import_ms"] = (imported - disk) * 1000
        if disk and imp_start:
            out["late_disk_detect_ms"] = (imp_start - disk) * 1000
        if udev and imported:
            out["late_udev_import_ms"] = (imported - udev) * 1000
    return out


# --- the series -------------------------------------------------------------------


def series(
    boots: int = 5, late_boots: int = 2, instrumented: int = 1, keep: bool = False
) -> dict[str, Any]:
    guest = vm.Guest.get()
    work = Path(tempfile.mkdtemp(prefix="lczfs-bench-"))
    initrds = Initrds(guest, work)
    results: dict[str, list[dict[str, Any]]] = {}
    # Interleaved (lczfs, seed, lczfs, seed...) so that a slower host period
    # hits both sides alike.
    plan: list[Spec] = []
    for _ in range(boots):
        plan += [Spec("lczfs"), Spec("seed")]
    plan += [Spec("lczfs", instrumented=True)] * instrumented
    for _ in range(late_boots):
        plan += [Spec("lczfs", late=True, cmdline="rd.lczfs.debug"), Spec("poll", late=True)]
    for i, spec in enumerate(plan):
        log(f"boot {i + 1}/{len(plan)}: {spec.name}")
        try:
            res = run_boot(guest, initrds, spec, work / f"{i:02d}-{spec.name}")
        except Exception as exc:  # one failed boot is reported, not fatal
            log(f"{spec.name}: {exc}")
            res = {"name": spec.name, "ok": False, "error": str(exc)}
        brief = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in res.items()
            if k in ("ok", "unlock_from_userspace_s", "late_disk_import_ms", "vmhwm_bytes")
        }
        log(f"{spec.name}: {brief}")
        results.setdefault(spec.name, []).append(res)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    out = summarize(results, work if keep else None)
    out["keyslot_pbkdf_memory_bytes"] = keyslot_pbkdf_memory(guest)
    return out


def resummarize(saved: dict[str, Any]) -> dict[str, Any]:
    """The summary of a saved series, recomputed with this version's keys."""
    for rs in saved["boots"].values():
        for r in rs:
            if r.get("keys_loaded") and "keys_loaded_from_userspace_s" not in r:
                r["keys_loaded_from_userspace_s"] = r["keys_loaded"] - r["userspace_start"]
            timing = r.get("timing") or {}
            if "events" in timing:  # --timings
                r.update(timing_metrics(timing, r.get("launcher"), r.get("unit_start")))
            elif timing.get("rss") and "rss_outside_pbkdf_bytes" not in r:
                # The monkeypatching launcher before --timings: samples outside the PBKDF.
                r["rss_outside_pbkdf_bytes"] = max(timing["rss"].values())
    out = summarize(saved["boots"], None)
    out["workdir"] = saved.get("workdir")
    out["keyslot_pbkdf_memory_bytes"] = saved.get("keyslot_pbkdf_memory_bytes")
    return out


def _values(rs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rs if r.get("ok") and isinstance(r.get(key), int | float)]


def summarize(results: dict[str, list[dict[str, Any]]], work: Path | None) -> dict[str, Any]:
    lz, seed = results.get("lczfs", []), results.get("seed", [])
    out: dict[str, Any] = {"boots": results, "workdir": str(work) if work else None}
    out["unlock"] = spread(_values(lz, "unlock_from_userspace_s"))
    out["seed_chain"] = spread(_values(seed, "unlock_from_userspace_s"))
    out["unlock_from_kernel"] = spread(_values(lz, "unlock_from_kernel_s"))
    out["keys_loaded_lczfs"] = spread(_values(lz, "keys_loaded_from_userspace_s"))
    out["keys_loaded_seed"] = spread(_values(seed, "keys_loaded_from_userspace_s"))
    out["seed_chain_from_kernel"] = spread(_values(seed, "unlock_from_kernel_s"))
    out["userspace_start_lczfs"] = spread(_values(lz, "userspace_start"))
    out["userspace_start_seed"] = spread(_values(seed, "userspace_start"))
    ratios = [
        a / b
        for a, b in zip(
            _values(lz, "unlock_from_userspace_s"),
            _values(seed, "unlock_from_userspace_s"),
            strict=False,
        )
    ]
    out["ratio_pairs"] = spread(ratios)
    um, sm = out["unlock"]["median"], out["seed_chain"]["median"]
    out["unlock_ratio_median"] = um / sm if um and sm else None
    ukm, skm = out["unlock_from_kernel"]["median"], out["seed_chain_from_kernel"]["median"]
    out["unlock_ratio_from_kernel"] = ukm / skm if ukm and skm else None
    late = results.get("lczfs-late", [])
    poll = results.get("poll-late", [])
    out["late_disk_lczfs_ms"] = spread(_values(late, "late_disk_import_ms"))
    out["late_disk_detect_lczfs_ms"] = spread(_values(late, "late_disk_detect_ms"))
    out["late_disk_poll_ms"] = spread(_values(poll, "late_disk_import_ms"))
    out["late_disk_detect_poll_ms"] = spread(_values(poll, "late_disk_detect_ms"))
    out["late_udev_import_lczfs_ms"] = spread(_values(late, "late_udev_import_ms"))
    out["late_udev_import_poll_ms"] = spread(_values(poll, "late_udev_import_ms"))
    instr = results.get("lczfs-instr", [])
    for key in (
        "vmhwm_bytes",
        "start_to_launcher_s",
        "start_to_imported_s",
        "start_to_first_action_s",
        "pyzfs_import_to_first_lzc_end_s",
        "pyzfs_import_s",
        "first_lzc_call_s",
        "kdf_s",
    ):
        out[key] = spread(_values(instr, key))
    out["step_s"] = {
        step: spread(
            [
                r["step_s"][step]
                for r in instr
                if r.get("ok") and isinstance((r.get("step_s") or {}).get(step), int | float)
            ]
        )
        for step in STEPS
    }
    out["memory_peak_cgroup"] = spread(_values(lz + instr, "memory_peak_cgroup_bytes"))
    out["rss_outside_pbkdf_bytes"] = spread(_values(instr, "rss_outside_pbkdf_bytes"))
    out["seed_cryptsetup_memory_peak"] = [r.get("cryptsetup_memory_peak") for r in seed]
    return out
