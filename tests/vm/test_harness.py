"""The harness's own promises, on the host (no guest): a QEMU that dies of a
signal is a crash worth a retry; a guest that powers off, or one we kill at
the deadline, is not.  Every host command ends within its timeout, whole
process group included.  A new layout needs no private calls: a Guest
provisions the recipe it is given (not the project's disks), toml_config
names the keystore as told, a Boot's files and unit list reach its initrd,
and the report's unit list follows the config.

The QEMU here is a stand-in placed first on PATH: it serves the console and
QMP sockets the way QEMU does, then behaves as told (abort like QEMU's
``iotlb_to_section`` assertion on the CI machine, power off, or hang).  The
provisioning boot's QEMU is a stand-in Machine that writes the report a
provisioning script would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from lczfsvm import build, cache, cpio, proc, qemu, vm
from lczfsvm.paths import DRACUT_MODULE, GUEST_DIR, SYSROOT_DROPIN, UNIT

STUB = textwrap.dedent(
    """\
    #!{python}
    import json, os, socket, sys, time
    args = sys.argv[1:]
    def sock_path(flag, prefix):
        for i, a in enumerate(args):
            if a == flag and args[i + 1].startswith(prefix):
                return args[i + 1]
    con = sock_path("-chardev", "socket,id=con0,").split("path=")[1].split(",")[0]
    qmp = sock_path("-qmp", "unix:")[len("unix:"):].split(",")[0]
    servers = []
    for p in (con, qmp):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(p)
        s.listen(1)
        servers.append(s)
    c, _ = servers[0].accept()
    q, _ = servers[1].accept()
    f = q.makefile("rw")
    f.write(json.dumps({{"QMP": {{}}}}) + "\\n"); f.flush()
    f.readline()
    f.write(json.dumps({{"return": {{}}}}) + "\\n"); f.flush()
    c.sendall(b"booting\\n")
    mode = os.environ["STUB_MODE"]
    if mode == "abort":
        print("qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: "
              "Assertion `section_index < d->map.sections_nb' failed.", file=sys.stderr)
        sys.stderr.flush()
        os.abort()
    if mode == "hang":
        time.sleep(60)
    c.sendall(b"reboot: Power down\\n")
    """
)


@pytest.fixture
def stub_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "qemu-system-x86_64"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def _machine(root: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> qemu.Machine:
    monkeypatch.setenv("STUB_MODE", mode)
    # Short socket paths: AF_UNIX paths are limited to 108 bytes.
    return qemu.Machine(root / "vmlinuz", root / "initrd.img", root / "w")


def test_qemu_abort_is_a_crash_naming_the_signal_and_qemu_message(
    stub_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = pytest.raises(qemu.QemuCrashed, match=r"SIGABRT .*iotlb_to_section")
    with _machine(stub_qemu, "abort", monkeypatch) as m, crashed:
        m.wait(30)


def test_expect_reports_a_crash_not_a_missing_prompt(
    stub_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _machine(stub_qemu, "abort", monkeypatch) as m, pytest.raises(qemu.QemuCrashed):
        m.expect("Please enter the passphrase", 30)


def test_power_off_is_not_a_crash(stub_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _machine(stub_qemu, "poweroff", monkeypatch) as m:
        assert m.wait(30) == 0
        assert m.crash() is None
        assert "Power down" in m.console_text()


def test_a_deep_workdir_gets_its_sockets_in_a_short_directory(
    stub_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sun_path holds 108 bytes: a session's NN-name/ under pytest's tmp_path is longer."""
    monkeypatch.setenv("STUB_MODE", "poweroff")
    deep = stub_qemu / ("d" * 100) / "01-session-boot"
    m = qemu.Machine(stub_qemu / "vmlinuz", stub_qemu / "initrd.img", deep)
    with m:
        assert m.wait(30) == 0
        args = (deep / "qemu-args.txt").read_text()
        sockets = m._sockets
        assert sockets is not None and sockets != deep
        assert f"path={sockets}/console.sock" in args
        assert len(str(sockets / "console.sock")) <= qemu.MAX_SOCKET_PATH
    assert not sockets.exists()
    assert "Power down" in (deep / "console.log").read_text()


def test_killed_at_the_deadline_is_a_timeout_not_a_crash(
    stub_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _machine(stub_qemu, "hang", monkeypatch) as m:
        with pytest.raises(qemu.BootTimeout, match="still running"):
            m.wait(1.0)
        assert m.crash() is None


def test_retry_on_crash_retries_crashes_only_and_gives_up() -> None:
    calls: list[str] = []

    def crashing() -> str:
        calls.append("boot")
        raise qemu.QemuCrashed("QEMU died of SIGABRT")

    with pytest.raises(qemu.QemuCrashed):
        qemu.retry_on_crash("x", crashing, lambda: calls.append("clean"), attempts=3)
    assert calls == ["boot", "clean", "boot", "clean", "boot"]

    outcomes: Iterator[Exception | str] = iter([qemu.QemuCrashed("once"), "report"])

    def flaky() -> str:
        o = next(outcomes)
        if isinstance(o, Exception):
            raise o
        return o

    assert qemu.retry_on_crash("x", flaky) == "report"

    failures: list[int] = []

    def guest_failure() -> str:
        failures.append(1)
        raise AssertionError("no report")

    with pytest.raises(AssertionError):
        qemu.retry_on_crash("x", guest_failure)
    assert failures == [1]  # a failing guest is never booted again


# --- proc: the one way the harness runs a host program --------------------------------


def test_run_logs_the_command_and_its_output(tmp_path: Path) -> None:
    log = tmp_path / "log"
    proc.run(["sh", "-c", "echo out; echo err >&2"], log_to=log, timeout=30)
    proc.run(["true"], log_to=log, timeout=30)
    lines = log.read_text().splitlines()
    assert lines[0] == "$ sh -c 'echo out; echo err >&2'"
    assert lines[1:3] == ["out", "err"]
    assert lines[3].startswith("# exit 0 after ")
    assert lines[4] == "$ true"  # appended


def test_run_failure_names_the_exit_status_and_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with pytest.raises(RuntimeError, match=rf"(?s)^dracut failed \(3\); log {log}:\n.*boom"):
        proc.run(["sh", "-c", "echo boom; exit 3"], log_to=log, timeout=30, what="dracut")


def test_run_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        # The background sleep is what unshare's children would be.
        proc.run(
            ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
            log_to=tmp_path / "log", timeout=1,
        )  # fmt: skip
    assert time.monotonic() - start < 30
    grandchild = int(pidfile.read_text())
    for _ in range(100):  # reaped by init once killed
        if not Path(f"/proc/{grandchild}").exists():
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{grandchild}").exists(), "the grandchild survived the timeout"


# --- a new layout: keystore names, unit list, initrd files, golden disks ------------------


def test_toml_config_defaults_are_the_scenarios_keystore() -> None:
    keystore = tomllib.loads(vm.toml_config())["keystore"]
    assert (keystore["partition"], keystore["name"], keystore["mountpoint"]) == (
        1,
        "secretsroot",
        "/bootsecrets",
    )


def test_toml_config_names_the_keystore_as_told() -> None:
    config = vm.toml_config(partition=0, name="my-keys", mountpoint="/run/my keys")
    keystore = tomllib.loads(config)["keystore"]
    assert (keystore["partition"], keystore["name"], keystore["mountpoint"]) == (
        0,
        "my-keys",
        "/run/my keys",
    )


def _guest_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lczfs_guest_report", GUEST_DIR / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def report_units(tmp_path: Path) -> Any:
    """guest/report.py's keystore_units on a config file, with the host's systemd-escape."""
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape not installed")
    report = _guest_report()

    def units(config: str | None, explicit: list[str] | None = None) -> list[str]:
        path, listed = tmp_path / "lczfs-unlockd.toml", tmp_path / "units.json"
        path.unlink(missing_ok=True)
        listed.unlink(missing_ok=True)
        if config is not None:
            path.write_text(config)
        if explicit is not None:
            listed.write_text(json.dumps(explicit))
        return report.keystore_units(str(path), str(listed))  # type: ignore[no-any-return]

    return units


def test_report_units_of_the_scenarios_config(report_units: Any) -> None:
    assert report_units(vm.toml_config()) == [
        "systemd-cryptsetup@secretsroot.service",
        "bootsecrets.mount",
    ]


def test_report_units_follow_the_configs_names_and_mask(report_units: Any) -> None:
    config = vm.toml_config(name="my-keys", mountpoint="/run/my keys", mask=["extra.service"])
    assert report_units(config) == [
        "systemd-cryptsetup@my\\x2dkeys.service",
        "run-my\\x20keys.mount",
        "extra.service",
    ]


def test_report_units_without_a_config_are_the_daemons_defaults(report_units: Any) -> None:
    assert report_units(None) == [
        "systemd-cryptsetup@lczfs\\x2dkeystore.service",
        "bootsecrets.mount",
    ]


def test_report_units_listed_by_the_harness_win(report_units: Any) -> None:
    assert report_units(vm.toml_config(), ["a.service", "b.mount"]) == ["a.service", "b.mount"]


class StandInMachine:
    """qemu.Machine for a provisioning boot: records what it was given and writes
    the report a provisioning script writes (one guid per disk)."""

    started: ClassVar[list[StandInMachine]] = []

    def __init__(self, kernel: Path, initrd: Path, workdir: Path, **kw: Any) -> None:
        self.initrd = initrd.read_bytes()
        self.disks: list[qemu.Disk] = list(kw.get("disks", ()))

    def start(self) -> None:
        StandInMachine.started.append(self)
        (report,) = (d.path for d in self.disks if d.serial == "lczfsreport")
        pools = [d.serial for d in self.disks if d.serial != "lczfsreport"]
        guids = "".join(f"guid {serial} {40 + i}\n" for i, serial in enumerate(pools))
        records = "record layout-uuid 0f0e-11\nsecret layout.vk 00ff10\nfile sig.json e30=\n"
        report.write_bytes(b"LCZFSPROVISION OK\n" + guids.encode() + records.encode())

    def wait(self, deadline: float) -> int:
        return 0

    def close(self) -> None:
        pass

    def console_text(self) -> str:
        return ""


def _layout_secrets(d: Path) -> None:
    d.mkdir()
    (d / "keystore.key").write_bytes(b"layout key")


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for the guest tree, kernel and initrds (empty, so a test initrd is
    its overlay alone), a cache of its own, and a stand-in QEMU for provisioning."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    root = tmp_path / "rootfs-standin"
    root.mkdir()
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    monkeypatch.setenv("LCZFS_VM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "rootfs", lambda: root)
    monkeypatch.setattr(build, "kernel", lambda r: tmp_path / "vmlinuz")
    monkeypatch.setattr(build, "base_initrd", lambda r, config=None: empty)
    monkeypatch.setattr(build, "provision_initrd", lambda r: empty)
    monkeypatch.setattr(qemu, "Machine", StandInMachine)
    monkeypatch.setattr(StandInMachine, "started", [])
    monkeypatch.setattr(vm.Guest, "_instances", {})
    return root


LAYOUT = vm.Provisioning(disks=("layout0",), size="1M", secrets=_layout_secrets)


def test_guest_provisions_its_recipes_disks_not_the_projects(built: Path, tmp_path: Path) -> None:
    script = tmp_path / "layout.sh"
    script.write_text("#!/bin/bash\n# a layout of its own\n")
    recipe = vm.Provisioning(disks=("layout0",), script=script, size="1M", secrets=_layout_secrets)
    guest = vm.Guest.get(recipe)
    assert vm.Guest.get(recipe) is guest  # one per recipe

    (boot,) = StandInMachine.started
    assert [d.serial for d in boot.disks] == ["layout0", "lczfsreport"]
    assert cpio.read(boot.initrd)["usr/lib/lczfs-test/provision.sh"][1] == script.read_bytes()
    golden = [p.name for p in cache.cache_root().iterdir() if p.name.startswith("golden-")]
    assert golden == [recipe.cache_name(built)] != [vm.PROJECT_DISKS.cache_name(built)]
    assert guest.golden == cache.cache_root() / golden[0]
    assert sorted(p.name for p in guest.golden.glob("*.qcow2")) == ["layout0.qcow2"]
    assert guest.guids == {"layout0": 40}
    assert guest.secrets.bytes("keystore.key") == b"layout key"
    # What the script recorded besides GUIDs: facts, a secret made in the guest, a file.
    assert guest.records == {"layout-uuid": "0f0e-11"}
    assert guest.secrets.bytes("layout.vk") == b"\x00\xff\x10"
    assert b"\x00\xff\x10" in guest.secrets.needles and b"00ff10" in guest.secrets.needles
    assert guest.file("sig.json") == b"{}"


def test_project_disks_are_the_default_recipe(built: Path) -> None:
    vm.Guest.get()
    (boot,) = StandInMachine.started
    assert [d.serial for d in boot.disks] == [*vm.GOLDEN_DISKS, "lczfsreport"]
    assert (
        cpio.read(boot.initrd)["usr/lib/lczfs-test/provision.sh"][1]
        == (GUEST_DIR / "provision.sh").read_bytes()
    )


def test_a_boots_files_and_units_reach_its_initrd(built: Path, tmp_path: Path) -> None:
    guest = vm.Guest.get(LAYOUT)
    config = vm.toml_config(name="my-keys")
    spec = vm.Boot(
        "layout",
        config,
        disks=("layout0",),
        keyfile=True,
        files=(("etc/layout/extra", b"extra", 0o600),),
        units=("my.service",),
        checks=vm.Checks(tpm=True, unseal="/dev/zvol/p/ks-part1"),
    )
    entries = cpio.read(
        build.test_initrd(guest.root, guest.overlay(spec), tmp_path / "i.img").read_bytes()
    )
    assert entries["etc/lczfs-unlockd.toml"][1] == config.encode()
    assert entries["etc/lczfs-unlockd/keystore.key"] == (0o100400, b"layout key")
    assert entries["etc/layout/extra"] == (0o100600, b"extra")
    assert json.loads(entries["etc/lczfs-test/units.json"][1]) == ["my.service"]
    assert b"layout key".hex() in json.loads(entries["etc/lczfs-test/needles.json"][1])
    assert json.loads(entries["etc/lczfs-test/checks.json"][1]) == {
        "tpm": True,
        "unseal": "/dev/zvol/p/ks-part1",
        "sysroot": False,
    }

    derived = cpio.read(build.overlay(guest.overlay(vm.Boot("layout", config))))
    assert "etc/lczfs-test/units.json" not in derived  # the report reads the config
    assert "etc/lczfs-test/checks.json" not in derived  # ordinary boots: the usual report


def test_a_boots_initrd_config_chooses_its_base_initrd(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[build.InitrdConfig | None] = []
    empty = tmp_path / "empty.img"

    def base(root: Path, config: build.InitrdConfig | None = None) -> Path:
        asked.append(config)
        return empty

    monkeypatch.setattr(build, "base_initrd", base)
    guest = vm.Guest.get(LAYOUT)
    initrd_config = build.InitrdConfig("pool = 'p'\n", (("/etc/x/sig.json", b"{}"),))
    spec = vm.Boot("layout", None, initrd_config=initrd_config)
    build.test_initrd(guest.root, guest.overlay(spec), tmp_path / "i.img", spec.initrd_config)
    assert asked[-1] == initrd_config
    with pytest.raises(ValueError, match="only files under /etc"):
        build.InitrdConfig("", (("/usr/lib/x.json", b""),))


def test_project_secrets_hold_a_pcr_signing_key_pair(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    vm.make_secrets(tmp_path / "s")
    secrets = vm.Secrets(tmp_path / "s")
    private = serialization.load_pem_private_key(
        secrets.bytes("tpm2-pcr-private-key.pem"), password=None
    )
    public = serialization.load_pem_public_key(secrets.bytes("tpm2-pcr-public-key.pem"))
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert private.key_size == 2048  # type: ignore[union-attr]
    assert secrets.bytes("tpm2-pcr-private-key.pem") in secrets.needles
    assert secrets.bytes("tpm2-pcr-public-key.pem") not in secrets.needles  # no secret


# --- the dracut module: the files its config names, the sysroot.mount drop-in ----------


def _config_reader(config: str, tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "lczfs-unlockd.toml"
    path.write_text(config)
    out = subprocess.run(
        [sys.executable, "-I", str(DRACUT_MODULE / "python-closure.py"), "--config-files", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.split("\t") for line in out.splitlines()]


def test_module_config_reader_names_the_files_to_copy(tmp_path: Path) -> None:
    config = vm.toml_config(
        unlock=("token", "keyfile"),
        keyfile="/etc/k.key",
        tpm2_signature="/etc/lczfs/sig.json",
        tpm2_pcrlock="/var/lib/pcrlock.json",
    )
    assert _config_reader(config, tmp_path) == [
        ["keyfile", "/etc/k.key"],
        ["tpm2_signature", "/etc/lczfs/sig.json"],
        ["tpm2_pcrlock", "/var/lib/pcrlock.json"],
        ["token", "yes"],
    ]
    assert _config_reader(vm.toml_config(unlock=("passphrase",)), tmp_path) == [["token", "no"]]
    # No unlock list: the daemon's default tries a token first.
    assert _config_reader('pool = "p"\n[keystore]\nvolume = "p/v"\n', tmp_path) == [
        ["token", "yes"]
    ]


MODULE_STUBS = """
set -euo pipefail
find_binary() { command -v "$1"; }
inst_simple() {
    local dst=${2:-$1}
    mkdir -p "$initdir${dst%/*}"
    cp "$1" "$initdir$dst"
    echo "inst $1 -> $dst"
}
dwarn() { echo "warn $*"; }
derror() { echo "error $*"; }
moddir=$MODULE
dracutsysrootdir=
. "$MODULE/module-setup.sh"
"""


def _module(script: str, tmp_path: Path, **env: str) -> str:
    result = subprocess.run(
        ["bash", "-c", MODULE_STUBS + script],
        env={"PATH": os.environ["PATH"], "MODULE": str(DRACUT_MODULE),
             "initdir": str(tmp_path / "initdir"), **env},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_module_installs_the_files_the_config_names(tmp_path: Path) -> None:
    signature = tmp_path / "sig.json"
    signature.write_text("{}")
    keyfile = tmp_path / "k.key"
    keyfile.write_bytes(b"key")
    config = tmp_path / "c.toml"
    config.write_text(
        vm.toml_config(
            keyfile=str(keyfile),
            tpm2_signature=str(signature),
            tpm2_pcrlock=str(tmp_path / "missing.json"),
        )
    )
    out = _module(
        '_lczfs_install_config_files; echo "token=$_lczfs_token"',
        tmp_path,
        lczfs_unlockd_config=str(config),
    )
    initdir = tmp_path / "initdir"
    assert (initdir / str(signature).lstrip("/")).read_text() == "{}"
    assert (initdir / str(keyfile).lstrip("/")).stat().st_mode & 0o777 == 0o400
    assert f"warn lczfs-unlockd: TPM2 pcrlock policy {tmp_path}/missing.json not found" in out
    assert out.rstrip().endswith("token=yes")
    # No config at all: nothing to copy, a token may still be used (the TSS libraries).
    out = _module(
        '_lczfs_install_config_files; echo "token=$_lczfs_token"',
        tmp_path,
        lczfs_unlockd_config=str(tmp_path / "none.toml"),
    )
    assert out == "token=yes\n"


def test_module_finds_the_sysroot_dropin_next_to_the_unit(tmp_path: Path) -> None:
    out = _module("_lczfs_sysroot_dropin", tmp_path, lczfs_unlockd_unit=str(UNIT))
    assert out.strip() == str(SYSROOT_DROPIN)
    text = SYSROOT_DROPIN.read_text()
    assert "[Unit]\n" in text
    assert "\nAssertPathExists=/run/lczfs-unlockd/root-checked\n" in text
    assert "\nAssertPathExists=!/run/lczfs-unlockd/root-refused\n" in text


# --- the report's TPM state ------------------------------------------------------------


def test_report_reads_pcrs_of_every_bank_and_the_measure_log(tmp_path: Path) -> None:
    report = _guest_report()
    for bank, size in (("sha1", 20), ("sha256", 32)):
        (tmp_path / f"pcr-{bank}").mkdir()
        for n in (7, 11, 15):
            (tmp_path / f"pcr-{bank}" / str(n)).write_text("AB" * size + "\n")
    log = tmp_path / "tpm2-measure.log"
    assert report.tpm_state(str(tmp_path), str(log))["measure_log"] is None
    log.write_bytes(b'\x1e{"pcr":15}\n')
    state = report.tpm_state(str(tmp_path), str(log))
    assert state["pcrs"] == {
        "sha1": {"7": "ab" * 20, "11": "ab" * 20, "15": "ab" * 20},
        "sha256": {"7": "ab" * 32, "11": "ab" * 32, "15": "ab" * 32},
    }
    assert state["measure_log"] == '\x1e{"pcr":15}\n'


# --- sessions: boots in order on the same disks and TPM state ---------------------------


class StandInSessionMachine:
    """qemu.Machine for the boots of a session: records each boot's disks and TPM
    state, changes the TPM state (as a guest would), and writes the report an
    operations boot (LCZFSOPS) or a test boot (LCZFSREPORT1) writes."""

    boots: ClassVar[list[dict[str, Any]]] = []
    crash_next: ClassVar[int] = 0
    ops_status: ClassVar[str] = "LCZFSOPS OK"

    def __init__(self, kernel: Path, initrd: Path, workdir: Path, **kw: Any) -> None:
        self.entries = cpio.read(initrd.read_bytes())
        self.disks: list[qemu.Disk] = list(kw.get("disks", ()))
        self.tpm: Path | None = kw.get("tpm_state")

    def start(self) -> None:
        boot = {
            "entries": self.entries,
            "backing": {d.serial: _backing(d.path) for d in self.disks if d.fmt == "qcow2"},
            "tpm": sorted(p.name for p in self.tpm.iterdir()) if self.tpm else None,
        }
        StandInSessionMachine.boots.append(boot)
        if StandInSessionMachine.crash_next:
            StandInSessionMachine.crash_next -= 1
            raise qemu.QemuCrashed("QEMU died of SIGABRT (stand-in)")
        if self.tpm is not None:
            (self.tpm / f"boot{len(StandInSessionMachine.boots)}").write_text("tpm state")
        (report,) = (d.path for d in self.disks if d.serial == "lczfsreport")
        if "usr/lib/lczfs-test/ops.sh" in self.entries:
            report.write_bytes(
                f"{StandInSessionMachine.ops_status}\nrecord a.rc 0\nfile a.out aGVsbG8=\n"
                "file a.err \nsecret made.key 6d616465\nfile config cG9vbCA9ICJwIgo=\n".encode()
            )
        else:
            data = json.dumps({"unit": {}, "datasets": []}).encode()
            report.write_bytes(b"LCZFSREPORT1 %d\n" % len(data) + data)

    hang: ClassVar[bool] = False

    def wait(self, deadline: float) -> int:
        if StandInSessionMachine.hang:
            raise qemu.BootTimeout(f"guest still running after {deadline:.0f} s; killed")
        return 0

    def close(self) -> None:
        pass

    def console_text(self) -> str:
        return "lczfs-test: the last words\n"

    def elapsed(self) -> float:
        return 1.0

    returncode = 0


def _backing(path: Path) -> str | None:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out).get("backing-filename")  # type: ignore[no-any-return]


@pytest.fixture
def session_guest(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> vm.Guest:
    """A guest with the LAYOUT disks (stand-in provisioning, with a TPM state),
    then the session stand-in QEMU."""
    guest = vm.Guest.get(LAYOUT)
    (guest.golden / "tpm").mkdir(exist_ok=True)
    (guest.golden / "tpm" / "golden").write_text("golden tpm")
    empty = tmp_path / "empty.img"
    monkeypatch.setattr(build, "ops_initrd", lambda r: empty)
    monkeypatch.setattr(qemu, "Machine", StandInSessionMachine)
    monkeypatch.setattr(StandInSessionMachine, "boots", [])
    monkeypatch.setattr(StandInSessionMachine, "crash_next", 0)
    return guest


def _session_secrets(d: Path) -> None:
    d.mkdir()
    (d / "old.pass").write_bytes(b"old passphrase")


def test_session_boots_start_from_the_previous_boots_disks_and_tpm(
    session_guest: vm.Guest, tmp_path: Path
) -> None:
    s = session_guest.session(
        "s", tmp_path / "s", {"layout0": None, "new0": "1M"}, tpm=True, secrets=_session_secrets
    )
    script = tmp_path / "ops-script.sh"
    script.write_text("step a echo hello\n")
    r = s.ops(
        vm.OpsBoot(
            "ops",
            script,
            disks=("layout0", "new0"),
            tpm=True,
            config="pool = 'p'\n",
            files=(("usr/lib/lczfs-test/extra", b"x", 0o755),),
        )
    )
    first, *_ = StandInSessionMachine.boots
    # The first boot: the golden image and a blank disk, the golden TPM state.
    assert first["backing"] == {
        "layout0": str(session_guest.golden / "layout0.qcow2"),
        "new0": str(s.dir / "blank-new0.qcow2"),
    }
    assert first["tpm"] == ["golden"]
    # What the operations boot got: the script, the library, its unit, the
    # daemon's unit masked, the secrets, the config and files.
    entries = first["entries"]
    assert entries["usr/lib/lczfs-test/scenario.sh"][1] == script.read_bytes()
    assert entries["usr/lib/lczfs-test/ops-lib.sh"][1] == (GUEST_DIR / "ops-lib.sh").read_bytes()
    assert entries["etc/systemd/system/lczfs-unlockd.service"][1] == b"/dev/null"
    assert "etc/systemd/system/initrd.target.wants/lczfs-test-ops.service" in entries
    assert entries["etc/lczfs-session/old.pass"] == (0o100400, b"old passphrase")
    assert entries["etc/lczfs-provision/keystore.key"] == (0o100400, b"layout key")
    assert entries["etc/lczfs-unlockd.toml"][1] == b"pool = 'p'\n"
    assert entries["usr/lib/lczfs-test/extra"] == (0o100755, b"x")
    # What it recorded.
    assert r.rc("a") == 0 and r.out("a") == "hello" and r.err("a") == ""
    assert s.file("config") == b'pool = "p"\n'
    assert s.secrets.bytes("made.key") == b"made"
    assert s.secrets.bytes("keystore.key") == b"layout key"  # the golden ones too
    assert b"made" in s.secrets.needles and b"old passphrase" in s.secrets.needles

    # A test boot next: on the operations boot's overlays and TPM state, grepped
    # for the session's secrets.
    s.boot(vm.Boot("next", None, disks=("layout0",), tpm=True))
    second = StandInSessionMachine.boots[1]
    assert second["backing"] == {"layout0": str(r.workdir / "layout0.qcow2")}
    assert second["tpm"] == ["boot1", "golden"]
    needles = json.loads(second["entries"]["etc/lczfs-test/needles.json"][1])
    assert b"made".hex() in needles and b"old passphrase".hex() in needles

    # The untouched disk (new0) still continues from the operations boot.
    s.ops(vm.OpsBoot("again", script, disks=("layout0", "new0")))
    third = StandInSessionMachine.boots[2]
    assert third["backing"] == {
        "layout0": str(s.dir / "02-next" / "layout0.qcow2"),
        "new0": str(r.workdir / "new0.qcow2"),
    }
    assert third["tpm"] is None
    assert [p.name for p in sorted(s.dir.iterdir()) if p.is_dir()] == [
        "01-ops", "02-next", "03-again", "secrets",
    ]  # fmt: skip
    with pytest.raises(KeyError, match="no disk 'other0'"):
        s.boot(vm.Boot("missing", None, disks=("other0",)))


def test_session_redoes_a_crashed_boot_from_the_same_start(
    session_guest: vm.Guest, tmp_path: Path
) -> None:
    s = session_guest.session("s", tmp_path / "s", {"layout0": None}, tpm=True)
    script = tmp_path / "ops-script.sh"
    script.write_text("")
    s.ops(vm.OpsBoot("ops", script, disks=("layout0",), tpm=True))
    StandInSessionMachine.crash_next = 1
    s.boot(vm.Boot("crashy", None, disks=("layout0",), tpm=True))
    crashed, redone = StandInSessionMachine.boots[1:]
    assert (
        crashed["backing"]
        == redone["backing"]
        == {"layout0": str(s.dir / "01-ops" / "layout0.qcow2")}
    )
    assert crashed["tpm"] == redone["tpm"] == ["boot1", "golden"]


def test_a_failed_operations_boot_says_so_and_the_session_stays(
    session_guest: vm.Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = session_guest.session("s", tmp_path / "s", {"layout0": None})
    script = tmp_path / "ops-script.sh"
    script.write_text("")
    monkeypatch.setattr(StandInSessionMachine, "ops_status", "LCZFSOPS FAILED rc=3")
    with pytest.raises(AssertionError, match=r"operations boot LCZFSOPS FAILED rc=3 .*report"):
        s.ops(vm.OpsBoot("ops", script, disks=("layout0",)))
    assert s.disk("layout0") == session_guest.golden / "layout0.qcow2"


def test_a_hung_operations_boot_shows_its_console(
    session_guest: vm.Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = session_guest.session("s", tmp_path / "s", {"layout0": None})
    script = tmp_path / "ops-script.sh"
    script.write_text("")
    monkeypatch.setattr(StandInSessionMachine, "hang", True)
    with pytest.raises(
        qemu.BootTimeout, match=r"(?s)ops: operations boot: .*600 s.*the last words"
    ):
        s.ops(vm.OpsBoot("ops", script, disks=("layout0",)))


def test_checks_luks_dump_reaches_the_report_and_the_result(tmp_path: Path) -> None:
    checks = vm.Checks(luks_dump=("/dev/zvol/p/ks-part1",))
    assert json.loads(checks.to_json())["luks_dump"] == ["/dev/zvol/p/ks-part1"]
    assert "luks_dump" not in json.loads(vm.Checks(tpm=True).to_json())
    report = _guest_report()
    missing = str(tmp_path / "missing")
    assert report.luks_dump([missing])[missing]["rc"] == -1
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    img = tmp_path / "ks.img"
    img.write_bytes(b"")
    os.truncate(img, 32 * 1024 * 1024)
    subprocess.run(
        ["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", "-", str(img)],
        input=b"pw", check=True, capture_output=True,
    )  # fmt: skip
    dumped = report.luks_dump([str(img)])
    result = vm.Result(vm.Boot("x", None), {"luks_dump": dumped}, "", 0.0, tmp_path)
    assert list(result.luks_metadata(str(img))["keyslots"]) == ["0"]
    with pytest.raises(AssertionError, match="luksDump .* failed"):
        vm.Result(vm.Boot("x", None), {"luks_dump": report.luks_dump([missing])}, "", 0.0,
                  tmp_path).luks_metadata(missing)  # fmt: skip
