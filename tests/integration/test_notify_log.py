"""sd_notify and the journal with hostile text: a real NOTIFY_SOCKET, a real journal stream.

The receiving side is read the way systemd reads it: at most 4096 bytes
(NOTIFY_BUFFER_MAX = PIPE_BUF), a truncated datagram dropped whole, fields
split on "\\n" and "\\r" (src/core/manager.c manager_dispatch_notify_fd;
src/shared/notify-recv.c since v257).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket

import pytest

from lczfs_unlockd import cli
from lczfs_unlockd import log as logsetup
from lczfs_unlockd.errors import KeyLoadError
from lczfs_unlockd.notify import NOTIFY_MAX, STATUS_MAX, SystemdNotifier
from lczfs_unlockd.report import Report

SYSTEMD_BUFFER = 4096


@pytest.fixture
def systemd(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    # Room for far more than systemd takes, so that an oversized datagram is
    # seen (and refused below) rather than lost in the kernel.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield path, sock
    sock.close()


def received(sock) -> list[list[str]]:
    """Every datagram as systemd would take it: a list of fields, or a failure."""
    messages = []
    sock.settimeout(0.2)
    try:
        while True:
            data, _, flags, _ = sock.recvmsg(SYSTEMD_BUFFER)
            assert not flags & socket.MSG_TRUNC, "systemd drops this datagram: over 4096 bytes"
            assert b"\0" not in data, "systemd drops a datagram with a NUL in it"
            text = data.decode("utf-8")  # systemd expects UTF-8
            messages.append([f for f in re.split("[\n\r]", text) if f])
    except TimeoutError:
        pass
    return messages


def fields(messages: list[list[str]]) -> list[str]:
    return [f for m in messages for f in m]


HOSTILE_HOST = "evil\nREADY=1\nMAINPID=1\rERRNO=0\n\x1b[2J\u2028X=1"


def test_a_crafted_host_name_cannot_forge_fields(systemd):
    path, sock = systemd
    notifier = SystemdNotifier(path)
    status = f"failed: cannot import rpool: the pool was last accessed by host {HOSTILE_HOST}"
    notifier.notify(f"STATUS={status}\nERRNO=16")  # the failure form cli sends
    notifier.notify(f"STATUS=waiting for rpool: {HOSTILE_HOST}")  # a progress status
    notifier.notify(f"READY=1\nSTATUS={HOSTILE_HOST}\nERRNO=5")  # READY first: no ERRNO after
    notifier.send(STATUS=status, ERRNO=16)
    got = received(sock)
    assert len(got) == 4
    escaped = "evil\\nREADY=1\\nMAINPID=1\\rERRNO=0\\n\\x1b[2J\\u2028X=1"
    assert got[0] == [f"STATUS={status[: -len(HOSTILE_HOST)]}{escaped}", "ERRNO=16"]
    assert got[1] == [f"STATUS=waiting for rpool: {escaped}"]
    assert got[2] == ["READY=1", f"STATUS={escaped}\\nERRNO=5"]
    assert got[3] == got[0]
    assert not any(f.startswith(("MAINPID=", "X=")) for f in fields(got))
    assert fields(got).count("READY=1") == 1


def long_missing_key_files(n: int = 20) -> str:
    errors = [
        KeyLoadError(
            f"cannot read the key of rpool/crypt/tenants/customer-{i:02d}/data: "
            f"/bootsecrets/keys/tenants/customer-{i:02d}/data.key does not exist in the "
            "keystore; copy the key file there or fix keylocation (key file "
            f"/bootsecrets/keys/tenants/customer-{i:02d}/data.key, keyformat=hex)",
            errno=errno.ENOENT,
        )
        for i in range(n)
    ]
    return "; ".join(str(e) for e in errors)


def test_twenty_missing_key_files_still_report_status_and_errno(systemd):
    path, sock = systemd
    text = long_missing_key_files()
    assert len(text.encode()) > 5000  # the 5 KiB failure message systemd dropped
    report = Report(ok=False, error=KeyLoadError(text, errno=errno.ENOENT))
    assert cli._finish(report, SystemdNotifier(path)) == cli.EXIT_FAILURE
    got = received(sock)
    status = [f for f in fields(got) if f.startswith("STATUS=")]
    assert len(status) == 1
    assert len(status[0].encode()) <= len("STATUS=") + STATUS_MAX
    assert re.search(r"… \(\d+ more characters\)$", status[0])
    assert status[0].startswith(
        "STATUS=failed: cannot read the key of rpool/crypt/tenants/customer-00"
    )
    assert "ERRNO=2" in fields(got)


def test_131_loaded_roots_still_report_ready(systemd):
    path, sock = systemd
    loaded = [(f"rpool/crypt/tenants/customer-{i:03d}", "hex") for i in range(131)]
    # The summary as it was when the issue was found: every root named (4.2 KiB).
    keys = ", ".join(f"{name} ({fmt})" for name, fmt in loaded)
    summary = f"unlocked {keys} in 3.2 s; keystore closed"
    assert len(summary.encode()) > 4200
    notifier = SystemdNotifier(path)
    notifier.notify(f"READY=1\nSTATUS={summary}")  # the old single message
    notifier.notify(f"STATUS={summary}")  # as cli sends it now, READY=1 on its own
    notifier.notify("READY=1")
    # And the daemon's own report, end to end.
    report = Report(ok=True, loaded=loaded, elapsed=3.2, verified=True)
    assert cli._finish(report, notifier) == 0
    got = received(sock)
    assert fields(got).count("READY=1") == 3
    statuses = [f for f in fields(got) if f.startswith("STATUS=unlocked rpool/crypt/tenants/")]
    assert len(statuses) == 3
    assert all(s.endswith(" more characters)") for s in statuses[:2])


def test_a_message_too_big_for_one_datagram_is_split_between_fields(systemd):
    path, sock = systemd
    SystemdNotifier(path).send(
        STATUS="s" * 5000, CUSTOM_TEXT="t" * 5000, ERRNO=5, EXTEND_TIMEOUT_USEC=30_000_000
    )
    got = received(sock)
    # Each long field is bounded to fit alone; the short ones share the last datagram.
    assert len(got) == 3
    assert all(len("\n".join(m).encode()) <= NOTIFY_MAX for m in got)
    names = [f.partition("=")[0] for f in fields(got)]
    assert names == ["STATUS", "CUSTOM_TEXT", "ERRNO", "EXTEND_TIMEOUT_USEC"]


def test_text_beyond_latin1_is_sent_as_utf8(systemd):
    """sdnotify encoded with Latin-1: this raised UnicodeEncodeError out of notify()."""
    path, sock = systemd
    SystemdNotifier(path).notify("STATUS=Пул rpool … ok é")
    assert received(sock) == [["STATUS=Пул rpool … ok é"]]


def test_abstract_socket_address():
    name = f"lczfs-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        SystemdNotifier("@" + name).notify("READY=1")
        assert received(sock) == [["READY=1"]]
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    SystemdNotifier().notify("READY=1")  # no socket, no error


def test_a_vanished_socket_is_logged_once_not_raised(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("lczfs_unlockd.notify")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    try:
        notifier = SystemdNotifier(str(tmp_path / "gone"))
        notifier.notify("STATUS=a")
        notifier.notify("STATUS=b")
    finally:
        logger.removeHandler(handler)
        logger.level = level
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG]


def test_the_daemon_sends_hostile_config_text_escaped(systemd, tmp_path):
    """The real daemon's own failure status: a config value with a newline in it."""
    path, sock = systemd
    bad = tmp_path / "c.toml"
    bad.write_text('pool = "rpool\\nREADY=1"\n[keystore]\nvolume = "rpool/v"\n')
    env = {**os.environ, "NOTIFY_SOCKET": path}
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "lczfs_unlockd", "--config", str(bad)],
        env=env, capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    got = fields(received(sock))
    assert "READY=1" not in got
    assert any(f.startswith("ERRNO=") for f in got)


# --- the journal ---------------------------------------------------------------------


@pytest.fixture
def journal(tmp_path, monkeypatch):
    path = tmp_path / "journal"
    stream = open(path, "w")  # noqa: SIM115 - closed below
    st_ = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino}")
    yield path, stream
    stream.close()
    logsetup.setup(debug=False)


def test_every_record_is_one_journal_line(journal):
    path, stream = journal
    logsetup.setup(debug=False, stream=stream)
    logsetup.log.error("import failed: %s", f"last host {HOSTILE_HOST}")
    logsetup.log.warning("multi\nline\r\nmessage\x85end")
    stream.flush()
    lines = path.read_text().split("\n")
    assert lines == [
        "<3>import failed: last host evil\\nREADY=1\\nMAINPID=1\\rERRNO=0\\n\\x1b[2J\\u2028X=1",
        "<4>multi\\nline\\r\\nmessage\\x85end",
        "",
    ]


def test_a_traceback_keeps_its_frames_but_not_the_exception_newlines(journal):
    path, stream = journal
    logsetup.setup(debug=True, stream=stream)
    try:
        try:
            raise OSError("first\n<0>forged emergency")
        except OSError as exc:
            raise RuntimeError("zpool said:\nline two") from exc
    except RuntimeError:
        logsetup.log.exception("unexpected")
    stream.flush()
    lines = path.read_text().splitlines()
    assert all(line.startswith("<3>") for line in lines)
    assert lines[0] == "<3>unexpected"
    assert "<3>OSError: first\\n<0>forged emergency" in lines
    assert "<3>RuntimeError: zpool said:\\nline two" in lines
    assert any("The above exception was the direct cause" in line for line in lines)
    assert sum(line.startswith("<3>Traceback") for line in lines) == 2


def test_a_reader_that_stopped_cannot_block_the_daemon(systemd, monkeypatch):
    """A full queue (PID 1 not reading) costs at most SEND_TIMEOUT, then a warning."""
    from lczfs_unlockd import notify

    path, sock = systemd
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    monkeypatch.setattr(notify, "SEND_TIMEOUT", 0.2)
    notifier = SystemdNotifier(path)
    import time

    start = time.monotonic()
    for _ in range(2000):
        notifier.send(STATUS="x" * 3000)
        if time.monotonic() - start > 0.15:
            break
    assert time.monotonic() - start < 5
