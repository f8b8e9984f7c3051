"""The harness's own promises, on the host (no guest): a QEMU that dies of a
signal is a crash worth a retry; a guest that powers off, or one we kill at
the deadline, is not.  Every host command ends within its timeout, whole
process group included.

The QEMU here is a stand-in placed first on PATH: it serves the console and
QMP sockets the way QEMU does, then behaves as told (abort like QEMU's
``iotlb_to_section`` assertion on the CI machine, power off, or hang).
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lczfsvm import proc, qemu

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
