"""What the operations commands share: the config, secrets from a terminal or a
file, the plan-then-confirm pattern, and one way to print errors.

The operations commands (``setup``, ``status``, ``enroll``, ``unenroll``,
``arm-reboot``, ``disarm``) run in the running system (stage 2), as root,
usually with a terminal.  They share the daemon's config file and its
adapters; nothing here runs at boot.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import termios
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

from . import config, keystore, luksadmin
from .errors import ConfigError, OpsError, UnlockError
from .secretbuf import read_bounded, wipe

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOTCONFIGURED = 6
MAX_SECRET = 4096  # a passphrase, a PIN: cryptsetup's own limit for a typed one is 512


class ConfigProblem(OpsError):
    """The daemon's configuration is missing or invalid: exit status 6, as the daemon's."""


def load_config(path: str) -> config.Config:
    """The daemon's config, or ConfigProblem saying what to fix (the command needs it)."""
    try:
        return config.load(path)
    except ConfigError as exc:
        raise ConfigProblem(f"{exc} (lczfs-unlockd check-config {path} says the same)") from None


def run_command(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's body: its error on stderr and the exit status for it
    (6 for the configuration, 1 for anything else it refused or could not do)."""
    try:
        return fn(args)
    except ConfigProblem as exc:
        err(str(exc))
        return EXIT_NOTCONFIGURED
    except UnlockError as exc:
        err(str(exc))
        return EXIT_FAILURE


def err(message: str, stream: TextIO | None = None) -> None:
    print(f"lczfs-unlockd: {message}", file=stream or sys.stderr, flush=True)


def say(message: str = "", stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stdout, flush=True)


@contextlib.contextmanager
def _no_echo(fd: int) -> Iterator[None]:
    old = termios.tcgetattr(fd)
    new = list(old)
    new[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSAFLUSH, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        os.write(fd, b"\n")


def _read_line_tty(prompt: str) -> bytearray:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        raise OpsError(
            "no terminal to ask on: give the secret with --passphrase-file FILE "
            "(or - for standard input)"
        ) from None
    try:
        os.write(fd, prompt.encode())
        out = bytearray()
        with _no_echo(fd):
            while len(out) <= MAX_SECRET:
                ch = os.read(fd, 1)
                if not ch or ch == b"\n":
                    break
                out += ch
        if len(out) > MAX_SECRET:
            wipe(out)
            raise OpsError(f"longer than {MAX_SECRET} bytes: refusing it")
        return out
    finally:
        os.close(fd)


def read_secret_file(path: str, what: str) -> bytearray:
    """A secret from a file or ``-`` (standard input): the whole content, one
    trailing newline removed (as ``echo`` or a here-string leaves it)."""
    try:
        fd = sys.stdin.fileno() if path == "-" else os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise OpsError(f"{what}: cannot read {path}: {exc.strerror}") from None
    try:
        data = read_bounded(fd, MAX_SECRET + 1)
    finally:
        if path != "-":
            os.close(fd)
    if data is None or len(data) > MAX_SECRET + 1:
        wipe(data)
        raise OpsError(f"{what}: {path} holds more than {MAX_SECRET} bytes: not a passphrase")
    if data.endswith(b"\n"):
        data[-1:] = b""
    if not data:
        raise OpsError(f"{what}: {path} is empty")
    return data


def ask_secret(prompt: str, *, twice: bool = False, file: str | None = None) -> bytearray:
    """A secret typed on the terminal (twice, when ``twice``: a new one), or read
    from ``file``.  The caller wipes it."""
    if file is not None:
        return read_secret_file(file, prompt.rstrip(": "))
    first = _read_line_tty(prompt)
    if not first:
        raise OpsError("empty: nothing entered")
    if not twice:
        return first
    second = _read_line_tty("Again: ")
    try:
        if first != second:
            wipe(first)
            raise OpsError("the two entries differ: nothing changed")
    finally:
        wipe(second)
    return first


def show_plan(title: str, actions: Sequence[str], stream: TextIO | None = None) -> None:
    say(title, stream)
    for n, action in enumerate(actions, 1):
        say(f"  {n}. {action}", stream)


def confirmed(yes: bool, dry_run: bool, what: str) -> bool:
    """After the plan: go on only with --yes; --dry-run stops here in any case."""
    if dry_run:
        say(f"--dry-run: {what} not done.")
        return False
    if not yes:
        say(f"Nothing done. Run again with --yes to {what}.")
        return False
    return True


def check_marker(meta: luksadmin.Metadata, marker: int) -> keystore.OneTimeUnlock:
    """An arm-reboot marker token checked as the daemon checks it
    (keystore.parse_marker, check_one_time_slot): ``ValueError`` saying what is
    wrong.  status and disarm judge a header exactly as the next boot will."""
    unlock = keystore.parse_marker(
        marker,
        meta.tokens[marker].fields,
        lambda n: meta.tokens[n].fields if n in meta.tokens else None,
    )
    keystore.check_one_time_slot(
        unlock, meta.keyslots.get(unlock.slot), [t.id for t in meta.tokens_of(unlock.slot)]
    )
    return unlock
