"""Drive one QEMU boot: console, passphrase typing, disk hot-plug, deadline.

Under TCG only (KVM does not work on the CI machines).  The serial console
is a unix socket QEMU waits on (no output is lost), the monitor is QMP.
Every boot is bounded: ``-no-reboot``, the guest's ``panic=-1`` and
``rd.emergency=poweroff``, and a host-side wall-clock limit that kills QEMU.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from . import proc
from .proc import log

BASE_CMDLINE = (
    "console=ttyS0,115200 panic=-1 rd.shell=0 rd.emergency=poweroff "
    "systemd.show_status=1 rd.udev.log_level=3 loglevel=4 mitigations=off"
)


class BootTimeout(AssertionError):
    pass


class QemuCrashed(RuntimeError):
    """QEMU itself died (a signal, e.g. an assertion in its TCG code), not the guest.

    Seen on the CI machine with QEMU 10.0 (MTTCG):
    ``system/physmem.c: iotlb_to_section: Assertion `section_index <
    d->map.sections_nb' failed`` a few seconds into a boot, before the kernel
    printed anything.  A guest cannot cause that, so the boot says nothing
    about the daemon and is worth running again (see :func:`retry_on_crash`).
    """


CRASH_ATTEMPTS = 3
T = TypeVar("T")


def retry_on_crash(
    what: str,
    once: Callable[[], T],
    before_retry: Callable[[], None] = lambda: None,
    attempts: int = CRASH_ATTEMPTS,
) -> T:
    """once(), run again (after before_retry()) only when QEMU itself crashed.

    Any other outcome, pass or fail, is final; every retry is logged with
    QEMU's own last words, and the last crash is raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            return once()
        except QemuCrashed as e:
            if attempt == attempts:
                raise
            log(f"{what}: {e}; booting again (attempt {attempt + 1} of {attempts})")
            before_retry()
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Disk:
    path: Path  # qcow2 overlay or raw file
    serial: str  # /dev/disk/by-id/virtio-<serial>
    fmt: str = "qcow2"


@dataclass
class Machine:
    kernel: Path
    initrd: Path
    workdir: Path
    cmdline: str = ""
    disks: Sequence[Disk] = ()
    tpm_state: Path | None = None  # swtpm state directory
    memory: str = "2048M"
    echo: IO[str] | None = None  # stream the console here (demo)
    console: bytearray = field(default_factory=bytearray)
    started_at: float = 0.0
    _proc: subprocess.Popen[bytes] | None = None
    _swtpm: subprocess.Popen[bytes] | None = None
    _sock: socket.socket | None = None
    _qmp: socket.socket | None = None
    _qmp_file: IO[str] | None = None
    _reader: threading.Thread | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _hotplugged: int = 0
    _killed: bool = False  # we killed QEMU (deadline, clean-up): not a crash
    _sockets: Path | None = None  # where the unix sockets are (see _socket_dir)

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockets = _socket_dir(self.workdir)
        con = self._sockets / "console.sock"
        qmp = self._sockets / "qmp.sock"
        for s in (con, qmp):
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        args = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc", "-accel", "tcg,thread=multi", "-smp", "2", "-cpu", "max",
            "-m", self.memory, "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", f"{BASE_CMDLINE} {self.cmdline}".strip(),
            "-chardev", f"socket,id=con0,path={con},server=on,wait=on",
            "-serial", "chardev:con0",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        for i, d in enumerate(self.disks):
            args += self._disk_args(i, d)
        if self.tpm_state is not None:
            args += self._start_swtpm()
        (self.workdir / "qemu-args.txt").write_text(" ".join(args) + "\n")
        self._proc = proc.run_background(args, log_to=self.workdir / "qemu.log")
        self.started_at = time.monotonic()
        self._sock = _connect(con, self._proc)
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        self._qmp = _connect(qmp, self._proc)
        self._qmp_file = self._qmp.makefile("rw")
        self._qmp_file.readline()  # greeting
        self.qmp("qmp_capabilities")

    def _disk_args(self, i: int, d: Disk) -> list[str]:
        return [
            "-blockdev",
            f"driver=file,filename={d.path},node-name=f{i},cache.no-flush=on",
            "-blockdev",
            f"driver={d.fmt},file=f{i},node-name=d{i}",
            "-device",
            f"virtio-blk-pci,drive=d{i},serial={d.serial},id=vd{i}",
        ]

    def _start_swtpm(self) -> list[str]:
        assert self.tpm_state is not None and self._sockets is not None
        sock = self._sockets / "swtpm.sock"
        self._swtpm = proc.run_background(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}",
             "--ctrl", f"type=unixio,path={sock}", "--flags", "startup-clear",
             "--log", f"file={self.workdir / 'swtpm.log'},level=1"],
            log_to=self.workdir / "swtpm.out",
        )  # fmt: skip
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        return [
            "-chardev",
            f"socket,id=chrtpm,path={sock}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]

    def _read_console(self) -> None:
        assert self._sock is not None
        with (self.workdir / "console.log").open("wb") as log:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                log.write(data)
                log.flush()
                if self.echo is not None:
                    self.echo.write(data.decode(errors="replace"))
                    self.echo.flush()
                with self._cond:
                    self.console += data
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        for p in (self._proc, self._swtpm):
            if p is not None and p.poll() is None:
                if p is self._proc:
                    self._killed = True
                proc.kill(p)
        for s in (self._sock, self._qmp):
            if s is not None:
                s.close()
        if self._reader is not None:
            self._reader.join(5)
        if self._sockets is not None and self._sockets != self.workdir:
            shutil.rmtree(self._sockets, ignore_errors=True)

    def __enter__(self) -> Machine:
        try:
            self.start()
        except BaseException:
            self.close()  # QEMU (or swtpm) may be running already
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- interaction --------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def console_text(self) -> str:
        with self._cond:
            return self.console.decode(errors="replace")

    def expect(
        self, pattern: str | re.Pattern[str], deadline: float, start: int = 0
    ) -> re.Match[str]:
        """Wait until the console (from byte offset start) matches; deadline is elapsed()."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        with self._cond:
            while True:
                m = rx.search(self.console.decode(errors="replace"), start)
                if m:
                    return m
                remaining = deadline - self.elapsed()
                if remaining <= 0 or not self.running():
                    self.raise_if_crashed()
                    why = "deadline" if remaining <= 0 else "QEMU exited"
                    raise BootTimeout(
                        f"console never showed {rx.pattern!r} ({why} after {self.elapsed():.1f} s)"
                    )
                self._cond.wait(min(remaining, 0.5))

    def type(self, text: str) -> None:
        """Type on the serial console like a person (one burst, then Enter)."""
        assert self._sock is not None
        self._sock.sendall(text.encode() + b"\r")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def crash(self) -> str | None:
        """Why QEMU died, if it died of a signal we did not send; else None."""
        if self._proc is None or self._killed:
            return None
        rc = self._proc.poll()
        if rc is None or rc >= 0:
            return None
        try:
            why = signal.Signals(-rc).name
        except ValueError:
            why = f"signal {-rc}"
        log = self.workdir / "qemu.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        last = lines[-1] if lines else "(qemu.log is empty)"
        return f"QEMU died of {why} after {self.elapsed():.1f} s: {last}"

    def raise_if_crashed(self) -> None:
        why = self.crash()
        if why is not None:
            raise QemuCrashed(why)

    def wait(self, deadline: float) -> int:
        """Wait for QEMU to exit (the guest powers off); kill it at the deadline."""
        assert self._proc is not None
        try:
            rc = self._proc.wait(max(0.0, deadline - self.elapsed()))
        except subprocess.TimeoutExpired:
            self.close()
            raise BootTimeout(f"guest still running after {deadline:.0f} s; killed") from None
        if self._reader is not None:
            self._reader.join(5)
        self.raise_if_crashed()
        return rc

    # -- monitor ------------------------------------------------------------------
    def qmp(self, command: str, **arguments: object) -> object:
        assert self._qmp_file is not None
        self._qmp_file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self._qmp_file.flush()
        while True:
            line = self._qmp_file.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {command}")
            msg = json.loads(line)
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {command}: {msg['error']}")
            # asynchronous events are ignored

    def hotplug(self, disk: Disk) -> None:
        """Plug a virtio disk into the running guest (ACPI PCI hot-plug)."""
        i = 100 + self._hotplugged
        self._hotplugged += 1
        self.qmp("blockdev-add", driver="file", filename=str(disk.path), **{"node-name": f"f{i}"})
        self.qmp("blockdev-add", driver=disk.fmt, file=f"f{i}", **{"node-name": f"d{i}"})
        self.qmp(
            "device_add", driver="virtio-blk-pci", drive=f"d{i}", serial=disk.serial, id=f"vd{i}"
        )


# sun_path holds 108 bytes: a deeper work directory (pytest's, a session's
# NN-name/) gets its sockets in a short directory of its own.
MAX_SOCKET_PATH = 100


def _socket_dir(workdir: Path) -> Path:
    if len(str(workdir / "console.sock")) <= MAX_SOCKET_PATH:
        return workdir
    return Path(tempfile.mkdtemp(prefix="lczfsvm-"))


def _connect(path: Path, qemu: subprocess.Popen[bytes]) -> socket.socket:
    for _ in range(600):
        if qemu.poll() is not None:
            kind = QemuCrashed if qemu.returncode < 0 else RuntimeError
            raise kind(f"QEMU exited ({qemu.returncode}) before {path} appeared")
        if path.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"QEMU did not create {path}")


QEMU_IMG_TIMEOUT = 60.0


def overlay_image(golden: Path, dest: Path) -> Path:
    """A copy-on-write qcow2 on top of a golden image (the golden one is never written)."""
    return _qemu_img_create(dest, ["-F", "qcow2", "-b", str(golden), str(dest)])


def blank_image(dest: Path, size: str) -> Path:
    """An empty qcow2 of size (qemu-img's syntax: 512M)."""
    return _qemu_img_create(dest, [str(dest), size])


def _qemu_img_create(dest: Path, args: list[str]) -> Path:
    proc.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *args],
        log_to=dest.parent / "qemu-img.log", timeout=QEMU_IMG_TIMEOUT,
    )  # fmt: skip
    return dest


def raw_image(dest: Path, size: int = 8 * 1024 * 1024) -> Path:
    with dest.open("wb") as f:
        f.truncate(size)
    return dest
