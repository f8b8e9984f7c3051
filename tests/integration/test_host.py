"""Real processes, sockets, libc and libraries on this host (no ZFS, no device-mapper)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lczfs_unlockd import cli, config, sequence
from lczfs_unlockd import log as logsetup
from lczfs_unlockd.askpass import SystemdAskPassword
from lczfs_unlockd.errors import (
    KeyLoadError,
    KeystoreError,
    PromptError,
    TeardownError,
    UnlockError,
)
from lczfs_unlockd.filesystem import LibcMounts
from lczfs_unlockd.notify import SystemdNotifier
from lczfs_unlockd.process import CommandError, run, run_secret
from lczfs_unlockd.unitnames import escape, escape_path
from lczfs_unlockd.units import SystemdUnits
from lczfs_unlockd.zfskeys import PyzfsKeyLoader
from tests.fakes import fake_ports, seed_world

ROOT = Path(__file__).resolve().parents[2]


class NotifyCollector:
    """A real NOTIFY_SOCKET read the way PID 1 reads it: at once, in a thread.

    A datagram socket's queue holds 10 datagrams; a receiver that only reads
    at the end would make the sender wait (and the notifier give up).
    """

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    collector = NotifyCollector(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield collector, path
    collector.close()


def drain(collector: NotifyCollector) -> list[str]:
    """Everything received, once nothing new arrived for 0.3 s."""
    seen = -1
    while seen != len(collector.messages):
        seen = len(collector.messages)
        time.sleep(0.3)
    messages, collector.messages[:] = list(collector.messages), []
    return messages


def test_dry_run_reports_to_a_real_notify_socket(notify_socket, tmp_path):
    sock, _ = notify_socket
    world = seed_world(str(tmp_path / "bootsecrets"))
    world.answers = ["luks pass"]
    ports = fake_ports(world)
    ports.notifier = SystemdNotifier()
    cfg = config.parse(
        {
            "pool": "rpool",
            "keystore": {"volume": "rpool/volumes/bootsecrets", "mountpoint": world.mountpoint},
        }
    )
    report = sequence.run(dataclasses.replace(cfg, dry_run=True), ports)
    assert cli._finish(report, ports.notifier) == 0
    messages = drain(sock)
    assert "STATUS=importing pool rpool" in messages
    assert any(m.startswith("STATUS=opening keystore") for m in messages)
    assert "STATUS=verifying keys" in messages
    assert messages[-1] == "READY=1"
    assert messages[-2].startswith("STATUS=dry run: would unlock rpool/crypt (hex)")


def daemon(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "lczfs_unlockd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_bad_config_fails_with_errno_and_status(notify_socket, tmp_path):
    sock, path = notify_socket
    bad = tmp_path / "c.toml"
    bad.write_text('pool = "rpool"\n[keystore]\nvolume = "rpool/v"\nmountpoint = "relative"\n')
    result = daemon("--config", str(bad), env={"NOTIFY_SOCKET": path})
    assert result.returncode == cli.EXIT_NOTCONFIGURED
    assert 'keystore.mountpoint = "relative": must be an absolute path' in result.stderr
    (message,) = drain(sock)
    assert message.startswith(f"STATUS=failed: {bad}: keystore.mountpoint")
    assert message.endswith("\nERRNO=22")


def test_disabled_on_the_kernel_command_line(notify_socket, tmp_path):
    sock, path = notify_socket
    cfg = tmp_path / "c.toml"
    cfg.write_text('pool = "rpool"\n[keystore]\nvolume = "rpool/v"\n')
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=zfs:rpool rd.lczfs=0 quiet\n")
    result = daemon(
        "--config", str(cfg), "--kernel-cmdline", str(cmdline), env={"NOTIFY_SOCKET": path}
    )
    assert result.returncode == 0, result.stderr
    assert drain(sock) == [
        "STATUS=disabled by rd.lczfs=0 on the kernel command line; nothing done",
        "READY=1",
    ]


def stub(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / "bin").mkdir(exist_ok=True)
    script = tmp_path / "bin" / name
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)


@pytest.mark.skipif(os.path.exists("/run/systemd/private"), reason="would mask units on this host")
def test_sigterm_stops_a_waiting_daemon_promptly(notify_socket, tmp_path):
    sock, path = notify_socket
    stub(tmp_path, "zpool", """\
        case "$1" in
          list) echo "cannot open '$3': no such pool" >&2; exit 1;;
          import) echo "no pools available to import"; exit 1;;
        esac
        """)  # fmt: skip
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'pool = "rpool"\ntimeout = "5min"\n[keystore]\nvolume = "rpool/v"\nmountpoint = "{tmp_path}/ks"\n'
    )
    env = {**os.environ, "NOTIFY_SOCKET": path, "PATH": f"{tmp_path}/bin:{os.environ['PATH']}"}
    child = subprocess.Popen(
        [sys.executable, "-m", "lczfs_unlockd", "--config", str(cfg), "--kernel-cmdline", "/dev/null"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not any("waiting for rpool to appear in /dev/disk/by-id" in m for m in sock.messages):
        assert time.monotonic() < deadline, sock.messages
        time.sleep(0.05)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=10)
    assert time.monotonic() - sent < 5
    assert child.returncode == 1
    assert "received SIGTERM" in stderr
    final = drain(sock)[-1]
    assert "STATUS=failed: received SIGTERM" in final and "ERRNO=4" in final


# --- subprocesses ------------------------------------------------------------


def test_failed_command_is_pasteable_with_stderr():
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo 'cannot import: I/O error' >&2; exit 3", "arg with space"])
    assert str(info.value) == (
        "\"sh -c 'echo '\"'\"'cannot import: I/O error'\"'\"' >&2; exit 3' 'arg with space'\" "
        "returned non-zero exit code 3: cannot import: I/O error"
    )


def test_missing_program():
    with pytest.raises(
        UnlockError, match="no-such-program-lczfs not found: install it in the initrd"
    ):
        run(["no-such-program-lczfs"])


def test_environment_is_fixed():
    out = run(["sh", "-c", "echo $LANG; test -t 0 && echo tty || echo notty"]).stdout.split()
    assert out == ["C.UTF-8", "notty"]


def test_run_secret_reads_into_bytearray():
    code, secret, _ = run_secret(["printf", "s3cret\\n"])
    assert code == 0 and isinstance(secret, bytearray) and secret == bytearray(b"s3cret\n")


def test_run_secret_refuses_huge_output():
    with pytest.raises(UnlockError, match="more than 16 bytes"):
        run_secret(["head", "-c", "100", "/dev/zero"], limit=16)


# --- systemd-ask-password, through a stand-in program ----------------------------


def test_askpass_arguments_and_answer(tmp_path):
    stub(tmp_path, "ask", f"""\
        printf '%s\\n' "$@" > {tmp_path}/argv
        printf 'pass word\\n'
        """)  # fmt: skip
    answer = SystemdAskPassword(str(tmp_path / "bin" / "ask")).ask(
        "Please enter the passphrase for keystore rpool/v:",
        ident="lczfs-unlockd:/dev/zvol/rpool/v-part1",
        timeout=90,
        keyname="cryptsetup",
        accept_cached=True,
    )
    assert answer == bytearray(b"pass word")
    assert (tmp_path / "argv").read_text().splitlines() == [
        "--id=lczfs-unlockd:/dev/zvol/rpool/v-part1",
        "--keyname=cryptsetup",
        "--icon=drive-harddisk",
        "--timeout=90s",
        "--accept-cached",
        "--",
        "Please enter the passphrase for keystore rpool/v:",
    ]


def test_askpass_cancelled(tmp_path):
    stub(tmp_path, "ask", "echo 'Failed to query password: Timer expired' >&2; exit 1\n")
    with pytest.raises(
        PromptError, match=r"no passphrase was entered \(Failed to query password: Timer expired\)"
    ):
        SystemdAskPassword(str(tmp_path / "bin" / "ask")).ask(
            "p", ident="i", timeout=0, keyname=None, accept_cached=False
        )


def test_real_systemd_ask_password_without_agent_times_out():
    program = shutil.which("systemd-ask-password")
    if program is None:
        pytest.skip("systemd-ask-password is not installed")
    start = time.monotonic()
    with pytest.raises(PromptError):
        SystemdAskPassword(program).ask(
            "test prompt", ident="lczfs-test", timeout=1, keyname=None, accept_cached=False
        )
    assert time.monotonic() - start < 30


# --- libc, systemd-escape, pyzfs, the private bus -----------------------------


def test_mount_failure_names_source_and_target(tmp_path):
    with pytest.raises(KeystoreError) as info:
        LibcMounts().mount("/dev/mapper/lczfs-does-not-exist", str(tmp_path), "ext4")
    assert f"cannot mount /dev/mapper/lczfs-does-not-exist on {tmp_path}" in str(info.value)


def test_unmount_of_something_not_mounted(tmp_path):
    with pytest.raises(TeardownError, match=f"cannot unmount {tmp_path}"):
        LibcMounts().unmount(str(tmp_path))


def test_is_mounted_reads_mountinfo():
    assert LibcMounts().is_mounted("/")
    assert not LibcMounts().is_mounted("/lczfs-not-a-mount-point")


@settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
)
def test_escape_matches_systemd_escape(text):
    program = shutil.which("systemd-escape")
    if program is None:
        pytest.skip("systemd-escape is not installed")
    expect = subprocess.run(
        [program, "--", text], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert escape(text) == expect


@pytest.mark.parametrize("path", ["/bootsecrets", "/run/key store", "/a/b-c/", "//x//y"])
def test_escape_path_matches_systemd_escape(path):
    program = shutil.which("systemd-escape")
    if program is None:
        pytest.skip("systemd-escape is not installed")
    expect = subprocess.run(
        [program, "--path", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert escape_path(path) == expect


@pytest.mark.skipif(os.path.exists("/dev/zfs"), reason="this host has ZFS")
def test_pyzfs_loads_by_soname_and_explains_missing_zfs():
    pytest.importorskip("libzfs_core")
    with pytest.raises(
        KeyLoadError,
        match=r"libzfs_core cannot open /dev/zfs .*: is the zfs kernel module loaded\?",
    ):
        PyzfsKeyLoader().load_key("rpool/crypt", bytearray(32), noop=True)


def test_missing_private_bus_is_a_clear_teardown_error(tmp_path):
    pytest.importorskip("pystemd")
    units = SystemdUnits(f"unix:path={tmp_path}/private")
    with pytest.raises(TeardownError, match=f"systemd's private bus unix:path={tmp_path}/private"):
        units.unit_file_state("bootsecrets.mount")


# --- logging -------------------------------------------------------------------


def test_journal_stream_gets_priority_prefixes(tmp_path, monkeypatch):
    path = tmp_path / "log"
    with open(path, "w") as stream:
        st_ = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino}")
        logsetup.setup(debug=False, stream=stream)
        logsetup.log.warning("two\nlines")
        logsetup.log.info("info")
        logsetup.log.debug("hidden")
    # One record, one journal line: the newline is shown, not obeyed.
    assert path.read_text() == "<4>two\\nlines\n<6>info\n"


def test_terminal_gets_plain_lines(tmp_path, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("SYSTEMD_LOG_LEVEL", "debug")
    path = tmp_path / "log"
    with open(path, "w") as stream:
        logsetup.setup(debug=False, stream=stream)
        logsetup.log.debug("detail")
    assert path.read_text() == "detail\n"


# --- start-up cost: nothing imported that the run does not need -----------------


def python(code: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


@pytest.mark.skipif(os.path.exists("/dev/zfs"), reason="this host has ZFS")
def test_pyzfs_with_declarations_generated_ahead_of_time(tmp_path):
    pytest.importorskip("libzfs_core")
    subprocess.run(
        [sys.executable, "-m", "lczfs_unlockd.pyzfs_ffi", str(tmp_path / "_pyzfs_ffi.py")],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    out = python(f"""
        import sys, lczfs_unlockd
        lczfs_unlockd.__path__.append({str(tmp_path)!r})
        from lczfs_unlockd.zfskeys import PyzfsKeyLoader
        try:
            PyzfsKeyLoader().load_key("rpool/crypt", bytearray(32), noop=True)
        except Exception as exc:
            print(type(exc).__name__, exc)
        print(sys.modules["libzfs_core.bindings.libzfs_core"].LIBRARY)
        print(sorted(m for m in ("pycparser", "cffi") if m in sys.modules))
        """)  # fmt: skip
    assert out[0].startswith(
        "KeyLoadError cannot verify the key of rpool/crypt: libzfs_core cannot open /dev/zfs"
    )
    assert out[1] == "libzfs_core.so.3"
    assert out[2] == "[]"  # no C parsing at run time


def test_units_adapter_does_not_import_lxml():
    pytest.importorskip("pystemd")
    out = python("""
        import sys
        from lczfs_unlockd.units import _dbuslib
        _dbuslib()
        print(sorted(m for m in sys.modules if m.startswith(("pystemd", "lxml"))))
        """)  # fmt: skip
    assert out == ["['pystemd', 'pystemd.dbusexc', 'pystemd.dbuslib', 'pystemd.utils']"]


def test_askpass_pin_prompt_stays_out_of_the_keyring(tmp_path):
    stub(tmp_path, "ask", f'printf "%s\\n" "$@" > {tmp_path}/argv; echo 1234\n')
    SystemdAskPassword(str(tmp_path / "bin" / "ask")).ask(
        "PIN:", ident="i", timeout=0, keyname=None, accept_cached=True
    )
    argv = (tmp_path / "argv").read_text().splitlines()
    assert not any(a.startswith("--keyname") for a in argv)
    assert "--accept-cached" not in argv  # nothing can be cached without a key name


def test_slow_scan_is_cut_off_at_its_timeout(tmp_path, monkeypatch):
    from lczfs_unlockd.zpool import ZpoolCli

    stub(tmp_path, "zpool", "sleep 30\n")
    monkeypatch.setenv("PATH", f"{tmp_path}/bin:{os.environ['PATH']}")
    start = time.monotonic()
    scan = ZpoolCli().scan("rpool", ["/dev/disk/by-id"], timeout=1)
    assert time.monotonic() - start < 5
    assert scan.state is None
    assert '"zpool import -d /dev/disk/by-id" did not finish within 1.0 s: killed' in scan.detail


def test_cryptsetup_log_callback_is_detached_at_shutdown():
    from lczfs_unlockd import cryptsetup

    with pytest.raises(KeystoreError):
        cryptsetup.LibCryptsetup().open("/nonexistent-lczfs-device")
    cryptsetup.shutdown()
    # still usable afterwards (messages just go nowhere), and idempotent
    with pytest.raises(KeystoreError):
        cryptsetup.LibCryptsetup().open("/nonexistent-lczfs-device")
    cryptsetup.shutdown()
