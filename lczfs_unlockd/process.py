"""The one place that runs subprocesses.

Every program runs with a fixed environment (``LANG=C.UTF-8`` so that output
is parseable, a fixed ``PATH``), stdin from ``/dev/null`` unless input is
given, and its stderr captured so that a failure is reported with a command
line the operator can paste.  Secrets are only ever passed on stdin — never
in argv — and this module never logs input.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UnlockError
from .secretbuf import read_bounded, wipe

log = logging.getLogger("lczfs_unlockd.process")

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
    """A program did not finish in time (it was killed)."""


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


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
) -> Result:
    """Run ``argv``; raise CommandError when it fails and ``check`` is set.

    On any exception (SIGTERM turned into ``Interrupted`` included) the child
    is killed before the exception propagates.
    """
    argv = tuple(argv)
    log.debug("running %s", shlex.join(argv))
    try:
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=_environment(),
            check=False,
            close_fds=True,
        )
    except FileNotFoundError as exc:
        raise _not_found(argv[0]) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(f'"{shlex.join(argv)}" did not finish within {timeout:g} s') from exc
    result = Result(
        argv=argv,
        returncode=completed.returncode,
        stdout=completed.stdout.decode("utf-8", "replace"),
        stderr=completed.stderr.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


def run_secret(argv: Sequence[str], *, limit: int = 4096) -> tuple[int, bytearray, str]:
    """Run a program that prints a secret (a passphrase) on stdout.

    The secret is read straight into a ``bytearray`` (no ``bytes``/``str``
    copy that could not be wiped) of at most ``limit`` bytes; the caller
    zeroes it.  Returns (exit code, secret, stderr text).  The child is
    killed if anything interrupts the wait.
    """
    argv = tuple(argv)
    log.debug("running %s", shlex.join(argv))
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(),
            close_fds=True,
        )
    except FileNotFoundError as exc:
        raise _not_found(argv[0]) from exc
    secret: bytearray | None = None
    try:
        assert child.stdout is not None and child.stderr is not None
        secret = read_bounded(child.stdout.fileno(), limit)
        stderr = child.stderr.read().decode("utf-8", "replace")
        returncode = child.wait()
    except BaseException:
        child.kill()
        child.wait()
        wipe(secret)
        raise
    finally:
        child.stdout.close() if child.stdout else None
        child.stderr.close() if child.stderr else None
    if secret is None:
        raise UnlockError(f"{argv[0]} printed more than {limit} bytes: refusing it as a passphrase")
    return returncode, secret, stderr
