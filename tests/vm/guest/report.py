#!/usr/bin/python3 -I
"""Test only, runs in the guest's initrd: write what a user would see as JSON
to the report disk (virtio serial "lczfsreport"), then power off.

With --sigterm-at-prompt: wait until lczfs-unlockd asks for a password, then
send it SIGTERM (the report unit writes the report afterwards).

What a scenario asks for beyond the usual (/etc/lczfs-test/checks.json, from
vm.Checks), so that ordinary boots stay fast:
  tpm      the PCR values of every bank (sysfs) and the measurement log
  unseal   DEVICE: a second unseal of its systemd-tpm2 token, check-only
  sysroot  start sysroot.mount, record its result, unmount /sysroot if it
           mounted (ordered before sysroot.mount, the start ignores ordering)
  luks_dump  [DEVICE...]: each LUKS header's JSON metadata after the daemon
           (cryptsetup luksDump --dump-json-metadata)
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import tomllib

UNIT = "lczfs-unlockd.service"
# Units the daemon must start after (udev) or finish before (everything that
# imports the pool, needs its keys, or leaves the initrd).
ORDERED_UNITS = (
    "systemd-udevd.service", "systemd-udev-trigger.service",
    "zfs-import-scan.service", "zfs-import-cache.service", "zfs-import.target",
    "zfs-load-key.service", "sysroot.mount", "initrd-root-fs.target", "initrd.target",
)  # fmt: skip
MAGIC = b"LCZFSREPORT1"
CONFIG = "/etc/lczfs-unlockd.toml"
UNITS = "/etc/lczfs-test/units.json"  # the harness's list (Boot.units), when it has one
CHECKS = "/etc/lczfs-test/checks.json"  # the harness's extra checks (Boot.checks)
# The daemon's verdicts on the root, which sysroot.mount's drop-in asserts.
ROOT_CHECKED = "/run/lczfs-unlockd/root-checked"
ROOT_REFUSED = "/run/lczfs-unlockd/root-refused"
MEASURE_LOG = "/run/log/systemd/tpm2-measure.log"
TPM_SYSFS = "/sys/class/tpm/tpm0"
REPORT_PCRS = (7, 11, 15)


def run(*cmd: str, timeout: float = 60) -> dict[str, object]:
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, errors="replace"
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"rc": -1, "out": "", "err": str(e)}
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def unit_props(unit: str, props: list[str]) -> dict[str, str]:
    r = run("systemctl", "show", unit, "-p", ",".join(props))
    out: dict[str, str] = {}
    for line in str(r["out"]).splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def wait_daemon_done(limit: float = 120) -> None:
    """After= orders us after the start job; make sure the process is gone too."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        p = unit_props(UNIT, ["ActiveState", "SubState", "MainPID"])
        if p.get("MainPID", "0") == "0" and p.get("ActiveState") not in (
            "activating",
            "deactivating",
        ):
            return
        time.sleep(0.2)


def systemd_escape(*args: str) -> str:
    r = run("systemd-escape", *args)
    if r["rc"] != 0:
        raise RuntimeError(f"systemd-escape {' '.join(args)}: {r['err']}")
    return str(r["out"]).strip()


def keystore_units(config: str = CONFIG, explicit: str = UNITS) -> list[str]:
    """The units the daemon masks: the harness's list, or those the config names.

    From the config: keystore.name's systemd-cryptsetup@ unit, keystore.mountpoint's
    mount unit (the daemon's defaults when unset or without a config) and the
    mask extras; named by systemd's own systemd-escape.
    """
    if os.path.exists(explicit):
        with open(explicit) as f:
            return [str(u) for u in json.load(f)]
    try:
        with open(config, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        cfg = {}
    keystore = cfg.get("keystore", {})
    return [
        systemd_escape(
            "--template=systemd-cryptsetup@.service", keystore.get("name", "lczfs-keystore")
        ),
        systemd_escape("--path", "--suffix=mount", keystore.get("mountpoint", "/bootsecrets")),
        *cfg.get("mask", []),
    ]


def scan_for_needles(needles: list[bytes], top: str = "/run") -> list[dict[str, str]]:
    hits = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                if os.path.getsize(path) > 256 * 1024 * 1024:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            for n in needles:
                if n and n in data:
                    hits.append({"path": path, "needle": n.hex()})
    return hits


def keystatus() -> list[dict[str, str]]:
    r = run(
        "zfs",
        "list",
        "-H",
        "-p",
        "-t",
        "filesystem,volume",
        "-o",
        "name,encryption,encryptionroot,keyformat,keylocation,keystatus,mounted",
    )
    cols = [
        "name",
        "encryption",
        "encryptionroot",
        "keyformat",
        "keylocation",
        "keystatus",
        "mounted",
    ]
    return [dict(zip(cols, line.split("\t"), strict=False)) for line in str(r["out"]).splitlines()]


def find_report_disk() -> str | None:
    for serial in glob.glob("/sys/block/*/serial"):
        try:
            with open(serial) as f:
                if f.read().strip() == "lczfsreport":
                    return "/dev/" + serial.split("/")[3]
        except OSError:
            pass
    return None


def write_report(data: bytes) -> None:
    for _ in range(100):
        dev = find_report_disk()
        if dev and os.path.exists(dev):
            break
        time.sleep(0.1)
    else:
        print("lczfs-test: no report disk; report on the console only", flush=True)
        sys.stdout.write("LCZFSREPORT-BEGIN\n" + data.decode() + "\nLCZFSREPORT-END\n")
        return
    fd = os.open(dev, os.O_WRONLY | os.O_SYNC)
    try:
        os.write(fd, MAGIC + b" %d\n" % len(data) + data)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checks(path: str = CHECKS) -> dict[str, object]:
    try:
        with open(path) as f:
            return dict(json.load(f))
    except FileNotFoundError:
        return {}


def tpm_state(sysfs: str = TPM_SYSFS, log: str = MEASURE_LOG) -> dict[str, object]:
    """PCRs 7, 11 and 15 of every bank the TPM has, and the measurement log (JSON-SEQ)."""
    pcrs: dict[str, dict[str, str]] = {}
    for d in sorted(glob.glob(f"{sysfs}/pcr-*")):
        values = {}
        for n in REPORT_PCRS:
            try:
                with open(f"{d}/{n}") as f:
                    values[str(n)] = f.read().strip().lower()
            except OSError as e:
                values[str(n)] = f"error: {e}"
        pcrs[os.path.basename(d).removeprefix("pcr-")] = values
    try:
        with open(log, "rb") as f:
            text: str | None = f.read().decode(errors="replace")
    except FileNotFoundError:
        text = None
    return {"tpmrm0": os.path.exists("/dev/tpmrm0"), "pcrs": pcrs, "measure_log": text}


def second_unseal(device: str) -> dict[str, object]:
    """The same TPM2 token again, after the daemon: check-only, nothing mapped."""
    start = time.monotonic()
    if not os.path.exists(device):
        return {"rc": -1, "out": "", "err": f"{device} does not exist", "seconds": 0.0}
    r = run(
        "cryptsetup", "open", "--test-passphrase", "--token-only",
        "--token-type", "systemd-tpm2", device, timeout=120,
    )  # fmt: skip
    r["seconds"] = round(time.monotonic() - start, 2)
    return r


def luks_dump(devices: list[str]) -> dict[str, dict[str, object]]:
    """The LUKS2 headers as the daemon left them (e.g. a one-time key slot gone)."""
    out = {}
    for device in devices:
        if not os.path.exists(device):
            out[device] = {"rc": -1, "out": "", "err": f"{device} does not exist"}
        else:
            out[device] = run("cryptsetup", "luksDump", "--dump-json-metadata", device)
    return out


def under_sysroot() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [
            line
            for line in f.read().splitlines()
            if line.split()[4] == "/sysroot" or line.split()[4].startswith("/sysroot/")
        ]


def try_sysroot(late: bool) -> dict[str, object]:
    """The distribution's sysroot.mount: does it mount, after the daemon's verdict?

    Late (lczfs.test.report=late, ordered after sysroot.mount): systemd has
    tried it already ("before"); start it once more.  Early (ordered before
    it): its start job waits for this unit, so the start ignores ordering.
    Whatever it mounted is recorded, then unmounted.
    """
    props = ["LoadState", "ActiveState", "SubState", "Result", "AssertResult",
             "ConditionResult", "DropInPaths"]  # fmt: skip
    before = unit_props("sysroot.mount", props)
    cmd = ["systemctl", "start"]
    if not late:
        cmd.append("--job-mode=ignore-dependencies")
    start = run(*cmd, "sysroot.mount", timeout=90)
    after = unit_props("sysroot.mount", props)
    mounted = under_sysroot()
    umount = run("umount", "-R", "/sysroot") if mounted else None
    others = ("initrd-root-fs.target", "emergency.target", "emergency.service")
    return {
        "late": late,
        "before": before,
        "start": start,
        "after": after,
        "mounted": mounted,
        "umount": umount,
        "left_mounted": under_sysroot(),
        "units": {u: unit_props(u, ["ActiveState", "Result"]) for u in others},
    }


def sigterm_at_prompt() -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if glob.glob("/run/systemd/ask-password/ask.*"):
            time.sleep(1)  # let the console agent print the prompt
            print(
                f"lczfs-test: password prompt seen at {uptime():.2f} s, sending SIGTERM", flush=True
            )
            r = run("systemctl", "kill", "--signal=SIGTERM", UNIT)
            return int(r["rc"])  # type: ignore[call-overload]
        time.sleep(0.1)
    return 1


def main() -> int:
    if "--sigterm-at-prompt" in sys.argv:
        return sigterm_at_prompt()
    t_start = uptime()
    # The hung-zpool scenario's stand-in sleeps in D state reading a
    # suspended device: let it go now (it then dies of the SIGKILL it was
    # sent), so the unit can finish stopping and the guest can power off.
    hung = os.path.exists("/dev/mapper/lczfs-hung")
    if hung:
        run("dmsetup", "resume", "lczfs-hung")
    wait_daemon_done()
    if hung:
        time.sleep(1)
        run("dmsetup", "remove", "--retry", "lczfs-hung")
    props = unit_props(
        UNIT,
        [
            "ActiveState",
            "SubState",
            "Result",
            "StatusText",
            "StatusErrno",
            "ExecMainStatus",
            "ExecMainCode",
            "NRestarts",
            "InactiveExitTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
            "ExecMainStartTimestampMonotonic",
            "ExecMainExitTimestampMonotonic",
            "InactiveEnterTimestampMonotonic",
            "LoadState",
        ],
    )
    # What the unit file orders lczfs-unlockd against, as this boot ran it.
    stamps = ["LoadState", "ActiveState", "InactiveExitTimestampMonotonic",
              "ActiveEnterTimestampMonotonic"]  # fmt: skip
    ordering = {unit: unit_props(unit, stamps) for unit in ORDERED_UNITS}
    checks = load_checks()
    extra: dict[str, object] = {
        "root_checked": os.path.exists(ROOT_CHECKED),
        "root_refused": os.path.exists(ROOT_REFUSED),
    }
    if checks.get("tpm"):
        extra["tpm"] = tpm_state()
    if checks.get("unseal"):
        extra["second_unseal"] = second_unseal(str(checks["unseal"]))
    if checks.get("luks_dump"):
        extra["luks_dump"] = luks_dump([str(d) for d in checks["luks_dump"]])  # type: ignore[attr-defined]
    if checks.get("sysroot"):
        with open("/proc/cmdline") as f:
            late = "lczfs.test.report=late" in f.read().split()
        extra["sysroot"] = try_sysroot(late)
    masked: dict[str, object] = {}
    for unit in keystore_units():
        masked[unit] = {
            "is_enabled": str(run("systemctl", "is-enabled", unit)["out"]).strip(),
            "show": unit_props(unit, ["LoadState", "ActiveState", "UnitFileState", "FragmentPath"]),
        }
    with open("/etc/lczfs-test/needles.json") as f:
        needles = [bytes.fromhex(n) for n in json.load(f)]
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    with open("/proc/cmdline") as f:
        cmdline = f.read().strip()
    report = {
        "uptime_at_report": t_start,
        "cmdline": cmdline,
        "unit": props,
        "datasets": keystatus(),
        "zpool_list": run("zpool", "list", "-H", "-o", "name,health"),
        "zpool_status": run("zpool", "status", "-P"),
        "dmsetup_ls": run("dmsetup", "ls"),
        "dev_mapper": sorted(os.listdir("/dev/mapper")) if os.path.isdir("/dev/mapper") else [],
        "mountinfo": mountinfo,
        "units": masked,
        **extra,
        "ordering": ordering,
        "transient_units": sorted(
            os.path.relpath(p, "/run/systemd")
            for d in ("transient", "system", "generator")
            for p in glob.glob(f"/run/systemd/{d}/*")
        ),
        "journal_unit": run("journalctl", "-b", "-u", UNIT, "-o", "cat", "--no-pager"),
        "journal_unit_short": run(
            "journalctl", "-b", "-u", UNIT, "-o", "short-monotonic", "--no-pager"
        ),
        "journal": run("journalctl", "-b", "-o", "short-monotonic", "--no-pager"),
        "failed_units": run("systemctl", "list-units", "--failed", "--no-legend", "--plain"),
        "needle_hits": scan_for_needles(needles),
        "needle_hits_journal_text": [],
        "uptime_at_end": uptime(),
    }
    journal_text = (str(report["journal"]["out"]) + str(report["journal_unit"]["out"])).encode()  # type: ignore[index]
    report["needle_hits_journal_text"] = [n.hex() for n in needles if n and n in journal_text]
    write_report(json.dumps(report).encode())
    print(f"lczfs-test: report written at {uptime():.2f} s; powering off", flush=True)
    run("systemctl", "poweroff", "--force", "--force")
    return 0


if __name__ == "__main__":
    sys.exit(main())
