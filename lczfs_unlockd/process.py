"""The one place that runs subprocesses.

Every program runs with a fixed environment (``LANG=C.UTF-8`` so that output
is parseable, a fixed ``PATH``), stdin from ``/dev/null`` unless input is
given, and its stderr captured so that a failure is reported with a command
line the operator can paste.  Secrets are only ever passed on stdin — never
in argv — and this module never logs input.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UnlockError
from .secretbuf import read_bounded, wipe

log = logging.getLogger("lczfs_unlockd.process")

# Every child gets a deadline; a caller that names none gets this one.
DEFAULT_TIMEOUT = 60.0
# After SIGKILL, how long to wait for the child to be reaped.  A child in
# uninterruptible sleep (D state: an I/O to a failing disk, a ZFS ioctl
# waiting for one) cannot die until the kernel lets go; we report it and
# move on rather than wait forever.
REAP_TIMEOUT = 5.0

PATH = "/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


class CommandTimeout(UnlockError):
    """A program did not finish in time (it was killed, and reaped if it could be)."""

    errno = _errno.ETIMEDOUT


class CommandError(UnlockError):
    """A program failed; the message holds the pasteable command line and its stderr."""

    def __init__(self, result: Result) -> None:
        detail = result.stderr.strip() or result.stdout.strip()
        message = f'"{result.command}" returned non-zero exit code {result.returncode}'
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.result = result


def _environment() -> dict[str, str]:
    env = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": os.environ.get("PATH") or PATH}
    if "SYSTEMD_LOG_LEVEL" in os.environ:
        env["SYSTEMD_LOG_LEVEL"] = os.environ["SYSTEMD_LOG_LEVEL"]
    return env


def _not_found(program: str) -> UnlockError:
    return UnlockError(
        f"{program} not found: install it in the initrd (PATH={_environment()['PATH']})"
    )


def _process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (D = uninterruptible), or "?"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
        return stat[stat.rindex(b")") + 2 :].split(b" ", 1)[0].decode("ascii", "replace")
    except (OSError, ValueError, IndexError):
        return "?"


def _kill(child: subprocess.Popen[bytes], argv: Sequence[str]) -> str:
    """SIGKILL the child and reap it within REAP_TIMEOUT; say what became of it."""
    child.kill()  # a no-op when it has already been reaped
    try:
        child.wait(REAP_TIMEOUT)
        return "killed"
    except subprocess.TimeoutExpired:
        state = _process_state(child.pid)
        what = (
            f"killed, but it did not exit within {REAP_TIMEOUT:g} s (pid {child.pid}, state "
            f"{state}{': stuck in the kernel, usually on a failing disk' if state == 'D' else ''})"
        )
        log.error("%s: %s; leaving it behind", argv[0], what)
        return what


def _close(child: subprocess.Popen[bytes]) -> None:
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()


def _spawn(argv: tuple[str, ...]) -> subprocess.Popen[bytes]:
    log.debug("running %s", shlex.join(argv))
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(),
            close_fds=True,
        )
    except FileNotFoundError as exc:
        raise _not_found(argv[0]) from exc


def _bound(timeout: float | None) -> float:
    if timeout is None or not math.isfinite(timeout):
        return DEFAULT_TIMEOUT
    return max(timeout, 0.1)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` within ``timeout`` s (DEFAULT_TIMEOUT when None).

    A child that overruns is killed and reaped (or reported as stuck:
    CommandTimeout says which).  On any exception (SIGTERM turned into
    ``Interrupted`` included) the child is killed before it propagates.
    Raise CommandError when it fails and ``check`` is set.
    """
    argv = tuple(argv)
    limit = _bound(timeout)
    child = _spawn(argv)
    try:
        out, err = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        fate = _kill(child, argv)
        _close(child)
        raise CommandTimeout(
            f'"{shlex.join(argv)}" did not finish within {limit:.1f} s: {fate}'
        ) from None
    except BaseException:
        _kill(child, argv)
        _close(child)
        raise
    result = Result(
        argv=argv,
        returncode=child.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


def run_secret(argv: Sequence[str], *, limit: int = 4096) -> tuple[int, bytearray, str]:
    """Run a program that prints a secret (a passphrase) on stdout.

    The secret is read straight into a ``bytearray`` (no ``bytes``/``str``
    copy that could not be wiped) of at most ``limit`` bytes; the caller
    zeroes it.  Returns (exit code, secret, stderr text).  No deadline of
    its own: the program (systemd-ask-password --timeout) has one, and a
    person may take their time; the child is killed if anything interrupts
    the wait (SIGTERM included).
    """
    argv = tuple(argv)
    child = _spawn(argv)
    secret: bytearray | None = None
    try:
        assert child.stdout is not None and child.stderr is not None
        secret = read_bounded(child.stdout.fileno(), limit)
        stderr = child.stderr.read(65536).decode("utf-8", "replace")
        returncode = child.wait()
    except BaseException:
        _kill(child, argv)
        wipe(secret)
        raise
    finally:
        _close(child)
    if secret is None:
        raise UnlockError(f"{argv[0]} printed more than {limit} bytes: refusing it as a passphrase")
    return returncode, secret, stderr
