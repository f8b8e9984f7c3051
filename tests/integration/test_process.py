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
    with pytest.raises(CommandTimeout, match=r'"sleep 30" did not finish within 0.5 s: killed$'):
        run(["sleep", "30"], timeout=0.5)
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
