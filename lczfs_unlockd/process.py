"""The one place that runs subprocesses.

Every program runs with a fixed environment (``LANG=C.UTF-8`` so that output
is parseable, a fixed ``PATH``), stdin from ``/dev/null`` unless input is
given, and its stderr captured so that a failure is reported with a command
line the operator can paste.  Secrets are only ever passed on stdin — never
in argv — and this module never logs input.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from . import log as logsetup
from .errors import CommandError, CommandTimeout, UnlockError
from .secretbuf import read_bounded, wipe

log = logging.getLogger("lczfs_unlockd.process")

# Every child gets a deadline; a caller that names none gets this one.
DEFAULT_TIMEOUT = 60.0
# After SIGKILL, how long to wait for the child to be reaped.  A child in
# uninterruptible sleep (D state: an I/O to a failing disk, a ZFS ioctl
# waiting for one) cannot die until the kernel lets go; we report it and
# move on rather than wait forever.
REAP_TIMEOUT = 5.0

T = TypeVar("T")
# poll(2) takes a C int of milliseconds (24.8 days): a longer configured
# wait is this long, which is as good as no limit for a boot.
MAX_WAIT = 7 * 86400.0
STDERR_LIMIT = 65536  # what run_secret keeps of a prompt program's stderr

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

    def error(self) -> CommandError:
        """This failed run as an error: the pasteable command line and what it said."""
        detail = self.stderr.strip() or self.stdout.strip()
        return CommandError(self.command, self.returncode, detail)


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


def _kill(child: subprocess.Popen[bytes], argv: Sequence[str], grace: float = 0.0) -> str:
    """SIGKILL the child and reap it within REAP_TIMEOUT; say what became of it.

    ``grace``: SIGTERM first, and that long to exit by itself (to clean up
    after itself: systemd-ask-password removes its ask file).
    """
    try:
        if grace > 0 and child.poll() is None:
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(grace)
    finally:  # even when a signal cuts the grace short
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


def _spawn(
    argv: tuple[str, ...], pass_fds: Sequence[int] = (), env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log.debug("running %s", shlex.join(argv))
    logsetup.mark("first_subprocess")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**_environment(), **(env or {})},
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        raise _not_found(argv[0]) from exc


def _bound(timeout: float | None) -> float:
    if timeout is None or not math.isfinite(timeout):
        return DEFAULT_TIMEOUT
    return min(max(timeout, 0.1), MAX_WAIT)


def _supervised(
    argv: tuple[str, ...],
    timeout: float | None,
    collect: Callable[[subprocess.Popen[bytes], float | None], T],
    *,
    grace: float = 0.0,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
) -> T:
    """Spawn ``argv`` and ``collect`` its output within ``timeout`` s (None: no limit).

    A child that overruns is killed (after ``grace`` s of SIGTERM) and
    reaped, or reported as stuck: CommandTimeout says which.  On any
    exception (SIGTERM turned into ``Interrupted`` included) the child is
    killed before it propagates.
    """
    child = _spawn(argv, pass_fds, env)
    try:
        return collect(child, timeout)
    except subprocess.TimeoutExpired:
        fate = _kill(child, argv, grace)
        raise CommandTimeout(
            f'"{shlex.join(argv)}" did not finish within {timeout:.1f} s: {fate}',
            reaped=fate == "killed",
        ) from None
    except BaseException:
        _kill(child, argv, grace)
        raise
    finally:
        _close(child)


def _drain(fd: int, limit: int) -> tuple[threading.Thread, bytearray]:
    """Read ``fd`` to its end in a thread, keeping its first ``limit`` bytes: a
    program blocked on a full stderr pipe never gets to close its stdout."""
    kept = bytearray()
    # Its own descriptor: the caller closes ``fd`` when it gives up, and a
    # thread still blocked on that number would then read whatever file
    # gets the number next.
    own = os.dup(fd)

    def read() -> None:
        try:
            while chunk := os.read(own, 65536):
                kept.extend(chunk[: max(limit - len(kept), 0)])
        except OSError:
            pass
        finally:
            os.close(own)

    thread = threading.Thread(target=read, name="drain-stderr", daemon=True)
    thread.start()
    return thread, kept


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` within ``timeout`` s (DEFAULT_TIMEOUT when None).

    Raise CommandTimeout when it overran (it is killed), CommandError when
    it fails and ``check`` is set.
    """
    argv = tuple(argv)

    def collect(child: subprocess.Popen[bytes], limit: float | None) -> Result:
        out, err = child.communicate(timeout=limit)
        return Result(
            argv=argv,
            returncode=child.returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
        )

    result = _supervised(argv, _bound(timeout), collect)
    if check and result.returncode != 0:
        raise result.error()
    return result


def secret_pipe(secret: bytes | bytearray) -> int:
    """A pipe holding ``secret``, its write end closed: the read end's descriptor.

    What a child reads as a key file (``/proc/self/fd/N``) instead of a
    file on disk or an argv/environment entry.  At most 64 KiB (one pipe
    buffer: the write never blocks).  The caller closes the descriptor.
    """
    if len(secret) > 65536:
        raise UnlockError("a secret longer than 64 KiB cannot go through a pipe")
    r, w = os.pipe()
    try:
        with memoryview(secret) as view:
            written = 0
            while written < len(view):
                written += os.write(w, view[written:])
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def run_fed(
    argv: Sequence[str],
    secrets: Sequence[bytes | bytearray] = (),
    *,
    check: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """``run`` with each of ``secrets`` readable by the child as a file.

    ``argv`` names them ``{fd0}``, ``{fd1}``...: replaced with
    ``/proc/self/fd/N`` of a pipe holding that secret (never the secret
    itself: argv is world-readable in /proc).  ``env``: added to the fixed
    environment (no secrets: /proc/PID/environ is root's to read, but a
    core dump or a debug log could show it).
    """
    fds: list[int] = []
    try:
        for secret in secrets:
            fds.append(secret_pipe(secret))
        names = {f"fd{i}": f"/proc/self/fd/{fd}" for i, fd in enumerate(fds)}
        full = tuple(a.format(**names) if "{fd" in a else a for a in argv)
        shown = tuple(argv)

        def collect(child: subprocess.Popen[bytes], limit: float | None) -> Result:
            for fd in fds:  # the child has its copies
                os.close(fd)
            fds.clear()
            out, err = child.communicate(timeout=limit)
            return Result(
                argv=shown,
                returncode=child.returncode,
                stdout=out.decode("utf-8", "replace"),
                stderr=err.decode("utf-8", "replace"),
            )

        result = _supervised(full, _bound(timeout), collect, pass_fds=fds, env=env)
    finally:
        for fd in fds:
            os.close(fd)
    if check and result.returncode != 0:
        raise result.error()
    return result


def run_secret(
    argv: Sequence[str], *, limit: int = 4096, timeout: float | None = None
) -> tuple[int, bytearray, str]:
    """Run a program that prints a secret (a passphrase) on stdout.

    The secret is read straight into a ``bytearray`` (no ``bytes``/``str``
    copy that could not be wiped) of at most ``limit`` bytes; the caller
    zeroes it.  Returns (exit code, secret, stderr text).  ``timeout``:
    None or infinite only where a person answers with no deadline
    (systemd-ask-password --timeout=0, as crypttab's timeout=0) -- the
    daemon's start timeout still applies; the child is killed if anything
    interrupts the wait (SIGTERM included).
    """
    argv = tuple(argv)
    secret: bytearray | None = None

    def collect(child: subprocess.Popen[bytes], deadline: float | None) -> tuple[int, str]:
        nonlocal secret
        assert child.stdout is not None and child.stderr is not None
        end = None if deadline is None else time.monotonic() + deadline
        drainer, err = _drain(child.stderr.fileno(), STDERR_LIMIT)
        try:
            secret = read_bounded(child.stdout.fileno(), limit, deadline=end)
        except TimeoutError:
            raise subprocess.TimeoutExpired(argv, deadline or 0.0) from None
        # The answer is in: a moment to exit even if the deadline just ran out.
        returncode = child.wait(None if end is None else max(end - time.monotonic(), 1.0))
        # Its stderr ends when the program (and whatever inherited it) does.
        drainer.join(None if end is None else max(end - time.monotonic(), 1.0))
        if drainer.is_alive():
            raise subprocess.TimeoutExpired(argv, deadline or 0.0)
        return returncode, err.decode(errors="replace")

    bound = None if timeout is None or not math.isfinite(timeout) else _bound(timeout)
    try:
        # SIGTERM first: systemd-ask-password then removes its ask file, and
        # no agent keeps showing a prompt nobody waits for.
        returncode, stderr = _supervised(argv, bound, collect, grace=1.0)
    except BaseException:
        wipe(secret)  # whatever ended it, wherever it was cut short
        raise
    if secret is None:
        raise UnlockError(f"{argv[0]} printed more than {limit} bytes: refusing it as a passphrase")
    return returncode, secret, stderr
