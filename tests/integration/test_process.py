"""Deadlines of subprocesses, core dumps: real processes, real prctl(2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lczfs_unlockd import process
from lczfs_unlockd.process import CommandTimeout, run


def test_a_child_that_overruns_is_killed_and_reaped():
    start = time.monotonic()
    with pytest.raises(
        CommandTimeout, match=r'"sleep 30" did not finish within 0.5 s: killed$'
    ) as raised:
        run(["sleep", "30"], timeout=0.5)
    assert raised.value.reaped
    assert time.monotonic() - start < 3
    # No zombie left: every child of this process has been reaped.
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_a_child_ignoring_sigterm_is_still_killed():
    with pytest.raises(CommandTimeout):
        run(["sh", "-c", "trap '' TERM; sleep 30"], timeout=0.3)


def test_no_call_runs_without_a_deadline(monkeypatch):
    monkeypatch.setattr(process, "DEFAULT_TIMEOUT", 0.3)
    with pytest.raises(CommandTimeout, match="within 0.3 s"):
        run(["sleep", "30"])
    with pytest.raises(CommandTimeout, match="within 0.3 s"):
        run(["sleep", "30"], timeout=float("inf"))


class _Unreapable(subprocess.Popen[bytes]):
    """A real child whose reaping never completes in time, as for one in D
    state (the kernel keeps it past SIGKILL); no host makes one on demand."""

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return super().wait()


def test_a_child_that_cannot_be_reaped_is_reported_not_waited_for(caplog):
    child = _Unreapable(["sleep", "30"])
    try:
        start = time.monotonic()
        fate = process._kill(child, ["zpool"])
        assert time.monotonic() - start < 1
        assert fate.startswith(
            f"killed, but it did not exit within {process.REAP_TIMEOUT:g} s (pid {child.pid}, "
            "state "
        )
        assert "zpool: killed, but it did not exit" in caplog.text
    finally:
        child.kill()
        subprocess.Popen.wait(child)


def test_process_state_reads_proc():
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        assert process._process_state(child.pid) == "S"
    finally:
        child.kill()
        child.wait()
    assert process._process_state(2**22 + 12345) == "?"


def test_the_daemon_forbids_core_dumps():
    code = (
        "from lczfs_unlockd import libc; assert libc.dumpable() == 1; "
        "libc.forbid_core_dumps(); print(libc.dumpable())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "0"


# --- run_secret: the prompt's pipe has a deadline too ------------------------


def test_a_secret_program_that_never_answers_is_killed_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(CommandTimeout, match="within 0.5 s: killed"):
        process.run_secret(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - start < 3
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # reaped


def test_a_secret_program_that_closes_stdout_but_does_not_exit_is_killed():
    """The answer arrived, the program hangs on: the wait for its exit has the deadline."""
    with pytest.raises(CommandTimeout):
        process.run_secret(["sh", "-c", "printf pw; exec >&-; sleep 30"], timeout=0.5)


def test_a_secret_is_read_whole_within_its_deadline():
    code, secret, _ = process.run_secret(["printf", "pass word"], timeout=5)
    assert (code, bytes(secret)) == (0, b"pass word")


def test_a_prompt_that_outlives_its_deadline_is_a_prompt_error(monkeypatch, tmp_path):
    """systemd-ask-password not exiting after its --timeout: PromptError, the next method runs."""
    from lczfs_unlockd import askpass
    from lczfs_unlockd.errors import PromptError

    stuck = tmp_path / "ask"
    stuck.write_text("#!/bin/sh\nsleep 30\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(askpass, "EXIT_MARGIN", 0.2)
    agent = askpass.SystemdAskPassword(program=str(stuck))
    start = time.monotonic()
    with pytest.raises(PromptError, match="no passphrase was entered .*did not finish within"):
        agent.ask("pw?", ident="cryptsetup:/dev/x", timeout=0.3, keyname=None, accept_cached=False)
    assert time.monotonic() - start < 3


def test_a_secret_program_flooding_stderr_before_answering_is_not_deadlocked():
    """1 MiB on stderr before the answer: a full pipe must not stall it to the deadline."""
    start = time.monotonic()
    code, secret, err = process.run_secret(
        ["sh", "-c", "head -c 1048576 /dev/zero | tr '\\\\0' x >&2; printf answer"], timeout=20
    )
    assert (code, bytes(secret)) == (0, b"answer")
    assert len(err) == process.STDERR_LIMIT
    assert time.monotonic() - start < 10


def test_an_overrun_secret_program_gets_sigterm_first(tmp_path):
    """systemd-ask-password removes its ask file on SIGTERM; SIGKILL would leave it."""
    marker = tmp_path / "cleaned-up"
    # The deadline leaves sh time to install its trap first, even on a
    # loaded machine (at 0.5 s a busy CI host delivered SIGTERM before it).
    script = f"trap 'touch {marker}; exit 1' TERM; sleep 30 & wait"
    with pytest.raises(CommandTimeout):
        process.run_secret(["sh", "-c", script], timeout=3)
    assert marker.exists()


def test_a_secret_is_wiped_when_the_run_is_interrupted(monkeypatch):
    """However run_secret ends early -- here a signal after the program
    answered and exited, as its pipes are closed -- the buffer is zeroed."""
    seen: list[bytearray] = []
    real_read, real_close = process.read_bounded, process._close

    def read(*a, **kw):
        buf = real_read(*a, **kw)
        seen.append(buf)
        return buf

    def close(child):
        real_close(child)
        raise KeyboardInterrupt  # stands in for Interrupted

    monkeypatch.setattr(process, "read_bounded", read)
    monkeypatch.setattr(process, "_close", close)
    with pytest.raises(KeyboardInterrupt):
        process.run_secret(["printf", "secret"], timeout=5)
    assert len(seen) == 1 and len(seen[0]) == 6 and not any(seen[0])


def test_a_stale_stderr_reader_never_reads_a_reused_descriptor(monkeypatch):
    """A helper keeps the prompt's stderr after the prompt gave up: the reader
    thread left behind must not read the next file that gets the fd number."""
    numbers: list[int] = []
    real_drain = process._drain

    def drain(fd, limit):
        numbers.append(fd)
        return real_drain(fd, limit)

    monkeypatch.setattr(process, "_drain", drain)
    script = "(while :; do echo tick >&2; sleep 0.2; done) & exit 0"
    with pytest.raises(CommandTimeout):
        process.run_secret(["sh", "-c", script], timeout=0.5)
    reader, writer = os.pipe()
    os.dup2(reader, numbers[0])  # the next file to get the stderr pipe's number
    try:
        os.write(writer, b"KEY-FILE-CONTENT")
        time.sleep(0.6)  # the stale thread has had its chances (a tick every 0.2 s)
        os.set_blocking(numbers[0], False)
        try:
            assert os.read(numbers[0], 64) == b"KEY-FILE-CONTENT"
        except BlockingIOError:
            pytest.fail("another reader took the bytes written to the reused descriptor")
    finally:
        for fd in (numbers[0], reader, writer):
            os.close(fd)
        subprocess.run(["pkill", "-f", "while :; do echo tick"], check=False)


def test_a_signal_during_the_grace_still_kills_the_child(monkeypatch):
    """SIGTERM cut short, then SIGKILL whatever happens: no child left running."""
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30"])
    time.sleep(0.2)
    real_wait = child.wait
    calls = []

    def wait(timeout=None):
        calls.append(timeout)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the signal arrives during the grace
        return real_wait(timeout)

    monkeypatch.setattr(child, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        process._kill(child, ["sh"], grace=1.0)
    assert real_wait(5) == -9


def test_a_wait_of_weeks_is_no_overflow():
    """poll(2) takes int milliseconds; a 30-day prompt_timeout or pool timeout is legal."""
    month = 30 * 86400.0
    assert process.run(["true"], timeout=month).returncode == 0
    code, secret, _ = process.run_secret(["printf", "pw"], timeout=month)
    assert (code, bytes(secret)) == (0, b"pw")


def test_a_timeout_says_whether_the_child_was_reaped(monkeypatch):
    """Callers whose child's work may still land (zfs change-key in the kernel) ask this."""
    monkeypatch.setattr(process, "_spawn", lambda argv, *a: _Unreapable(list(argv)))
    spawned: list[subprocess.Popen[bytes]] = []
    real_kill = process._kill

    def kill(child: subprocess.Popen[bytes], argv: object, grace: float = 0.0) -> str:
        spawned.append(child)
        return real_kill(child, argv, grace)  # type: ignore[arg-type]

    monkeypatch.setattr(process, "_kill", kill)
    try:
        with pytest.raises(CommandTimeout) as raised:
            run(["sleep", "30"], timeout=0.3)
        assert raised.value.reaped is False
        assert "did not exit" in str(raised.value)
    finally:
        for child in spawned:
            child.kill()
            subprocess.Popen.wait(child)
