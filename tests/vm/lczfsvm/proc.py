"""Every program the harness starts on the host goes through here.

``run`` runs one to completion within a timeout, its output appended to a
log file; ``run_background`` starts a long-lived one (QEMU, swtpm) whose
owner bounds and ends it.  Both put the child in a session of its own, so a
timeout (or Ctrl-C) ends the whole process group: debootstrap or dracut
under ``unshare``, not just the ``unshare``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def log(msg: str) -> None:
    """A progress line of the harness on stderr."""
    print(f"[lczfs-vm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str], *, log_to: Path, timeout: float, what: str | None = None, tail: int = 40
) -> None:
    """Run argv with stdout and stderr appended to log_to, after a ``$ argv`` line.

    A non-zero exit or an overrun timeout (the process group is killed) raises
    RuntimeError naming what (default: the program), the log and its last
    tail lines.
    """
    what = what or argv[0]
    start = time.monotonic()
    with log_to.open("a") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            kill(proc)
        except BaseException:  # Ctrl-C: the child is in its own session, the terminal's
            kill(proc)  # SIGINT did not reach it
            raise
        seconds = time.monotonic() - start
        out.write(f"# {'timed out' if rc is None else f'exit {rc}'} after {seconds:.1f} s\n")
    if rc == 0:
        return
    why = f"timed out after {timeout:.0f} s (killed)" if rc is None else f"failed ({rc})"
    lines = log_to.read_text(errors="replace").splitlines()[-tail:]
    raise RuntimeError(f"{what} {why}; log {log_to}:\n" + "\n".join(lines))


def run_background(argv: Sequence[str], *, log_to: Path) -> subprocess.Popen[bytes]:
    """Start argv with stdout and stderr in log_to (truncated: the log is the program's own).

    The caller bounds it and ends it with kill().
    """
    with log_to.open("wb") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a child started here, and reap the child.

    Only for a child not reaped yet (its pid, the group's id, cannot have been
    reused).
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
