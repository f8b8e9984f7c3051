"""Command line: run (default), check-config, --dry-run, --version, --timings,
and the operations commands of the running system (setup, status, enroll,
unenroll, arm-reboot, disarm), each in its ``ops_*`` module.

The only module that builds the real adapters and hands them to the
sequence, and the only place that picks exit codes and prints the final line.  Exit codes
follow systemd.exec(5)'s names: 0 success, 1 FAILURE, 6 NOTCONFIGURED (the
configuration is missing or wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from . import __version__, config, libc, paths, sequence
from . import log as logsetup
from .errors import ConfigError, UnlockError
from .notify import SystemdNotifier
from .ports import Ports
from .report import Report

log = logging.getLogger("lczfs_unlockd")

EXIT_FAILURE = 1
EXIT_NOTCONFIGURED = 6


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def real_ports(notifier: SystemdNotifier) -> Ports:
    from .askpass import SystemdAskPassword
    from .cryptsetup import LibCryptsetup
    from .filesystem import HostFilesystem, LibcMounts
    from .tpm2 import Tpm2Device
    from .units import SystemdUnits
    from .zfskeys import PyzfsKeyLoader
    from .zpool import ZpoolCli

    return Ports(
        zpool=ZpoolCli(),
        keys=PyzfsKeyLoader(),
        crypt=LibCryptsetup(),
        mounts=LibcMounts(),
        units=SystemdUnits(),
        askpass=SystemdAskPassword(),
        notifier=notifier,
        fs=HostFilesystem(),
        clock=SystemClock(),
        tpm=Tpm2Device(),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd",
        description="Unlock an encrypted ZFS pool from a LUKS keystore on one of its zvols.",
        epilog="commands: run (the default: what the initrd service runs), "
        "check-config [PATH] (validate a configuration file offline), and for the "
        "running system: " + ", ".join(OPERATIONS) + " (lczfs-unlockd COMMAND --help; "
        "man lczfs-unlockd)",
    )
    parser.add_argument("--version", action="version", version=f"lczfs-unlockd {__version__}")
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, change nothing (pool imported read-only and exported again, "
        "keys verified, not loaded, nothing masked)",
    )
    parser.add_argument("--debug", action="store_true", help="log more detail (never secrets)")
    parser.add_argument(
        "--timings",
        metavar="PATH",
        help="write when each step started and ended (CLOCK_MONOTONIC) and the memory in use "
        "then to PATH as JSON, for bench/; no secrets",
    )
    parser.add_argument(
        "--kernel-cmdline",
        default="/proc/cmdline",
        metavar="PATH",
        help="where to read rd.lczfs.* parameters (default /proc/cmdline)",
    )
    return parser


# The operations commands (stage 2): command -> (module, function).
OPERATIONS: dict[str, tuple[str, str]] = {
    "setup": ("ops_setup", "main"),
    "status": ("ops_status", "main"),
    "enroll": ("ops_enroll", "enroll_main"),
    "unenroll": ("ops_enroll", "unenroll_main"),
    "arm-reboot": ("ops_arm", "arm_main"),
    "disarm": ("ops_arm", "disarm_main"),
}


def _operation(command: str, argv: Sequence[str]) -> int:
    import importlib

    try:
        libc.forbid_core_dumps()  # they hold passphrases, recovery keys, raw keys
    except UnlockError as exc:
        print(f"lczfs-unlockd: {exc}: a core dump could contain key material", file=sys.stderr)
    module, function = OPERATIONS[command]
    entry = getattr(importlib.import_module(f".{module}", __package__), function)
    return int(entry(list(argv)))


def check_config(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd check-config", description="Validate a configuration file offline."
    )
    parser.add_argument("path", nargs="?", default=config.DEFAULT_PATH)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.path)
    except ConfigError as exc:
        print(f"lczfs-unlockd: {exc}", file=sys.stderr)
        return EXIT_NOTCONFIGURED
    print(f"{args.path}: ok")
    for line in config.summary(cfg):
        print(f"  {line}")
    return 0


def _finish(report: Report, notifier: SystemdNotifier) -> int:
    summary = report.summary
    if report.ok:
        log.info("%s", summary)
        # Separate datagrams: whatever the status says, READY=1 must arrive
        # (systemd drops a notification it cannot take whole).
        notifier.send(STATUS=summary)
        notifier.send(READY=1)
        return 0
    log.error("%s", summary)
    notifier.send(STATUS=summary, ERRNO=report.errno)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])
    if argv and argv[0] in OPERATIONS:
        return _operation(argv[0], argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.timings:
        logsetup.record_timings()
        logsetup.mark("main")  # the interpreter started and the daemon's modules are imported
        try:
            return _main(args)
        finally:
            _write_timings(args.timings)
    return _main(args)


def _write_timings(path: str) -> None:
    logsetup.mark("exit")
    out: dict[str, object] = {"events": logsetup.timings(), **logsetup.memory("VmHWM", "VmPeak")}
    # A new file renamed into place: whatever sits at the path (a symlink, a
    # FIFO that would block the open, someone's file) is replaced, never
    # written through.
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".timings.")
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(out, f)
        os.rename(tmp, path)
    except Exception as exc:  # never a reason to change the exit code
        if tmp is not None:  # ours: mkstemp made it
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        log.warning("--timings %s: cannot write: %s", path, getattr(exc, "strerror", None) or exc)


def _main(args: argparse.Namespace) -> int:
    logsetup.setup(debug=args.debug)
    try:
        libc.forbid_core_dumps()  # before anything could hold a key
    except UnlockError as exc:
        log.warning("%s: a core dump could contain key material", exc)
    notifier = SystemdNotifier()
    cmdline = config.read_cmdline(args.kernel_cmdline)
    if config.disabled_on_cmdline(cmdline):
        text = "disabled by rd.lczfs=0 on the kernel command line; nothing done"
        log.info("%s", text)
        # Whoever edits the kernel command line chose to boot without us.
        _let_root_through("lczfs-unlockd disabled by rd.lczfs=0")
        notifier.send(STATUS=text)
        notifier.send(READY=1)
        return 0
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        if config.kernel_root(cmdline) is None:
            _let_root_through("no configuration, and the root is not on ZFS")
        notifier.send(STATUS=f"failed: {exc}", ERRNO=exc.errno)
        return EXIT_NOTCONFIGURED
    try:
        report = _run(cfg, cmdline, args, notifier)
    except Exception as exc:
        # Before the sequence could start (libcryptsetup missing from the
        # initrd, say): still a status line and an errno, not a traceback.
        log.debug("failed before the unlock started", exc_info=True)
        failure = (
            exc
            if isinstance(exc, UnlockError)
            else UnlockError(
                f"unexpected {type(exc).__name__}: {str(exc)[:200]} (a bug: please report it)"
            )
        )
        log.error("failed: %s", failure)
        notifier.send(STATUS=f"failed: {failure}", ERRNO=failure.errno)
        return EXIT_FAILURE
    return _finish(report, notifier)


def _let_root_through(why: str) -> None:
    """Create the flag sysroot.mount's drop-in asserts (paths.ROOT_CHECKED_FLAG)."""
    from .filesystem import HostFilesystem

    try:
        HostFilesystem().write_flag(paths.ROOT_CHECKED_FLAG, why + "\n")
    except OSError as exc:
        log.warning("cannot create %s: %s", paths.ROOT_CHECKED_FLAG, exc.strerror)


def _run(
    cfg: config.Config, cmdline: str, args: argparse.Namespace, notifier: SystemdNotifier
) -> Report:
    cfg, warnings = config.apply_cmdline(cfg, cmdline)
    for warning in warnings:
        log.warning("kernel command line: %s", warning)
    if args.dry_run:
        cfg = dataclasses.replace(cfg, dry_run=True)
    if cfg.debug or args.debug:
        logsetup.setup(debug=True)
    for line in config.summary(cfg):
        log.debug("%s", line)
    from . import cryptsetup

    try:
        if cfg.debug or args.debug:
            cryptsetup.set_debug(True)
        return sequence.run(cfg, real_ports(notifier))
    finally:
        cryptsetup.shutdown()
