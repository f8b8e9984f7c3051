"""The boot, in order: pool, keystore, mount, keys — then teardown and the report.

Each step is a context manager that undoes what it made when it is left,
whatever way it is left: its ``finally`` covers the resource from before it
exists, so a failure or a SIGTERM at any point — even between a C call
returning and the next line — leaves nothing mounted, mapped or imported
that was not there before.  Nothing interrupts the teardown, and it is
verified afterwards.
"""

from __future__ import annotations

import logging
import signal

from . import keys, keystore, mount, pool, teardown
from .config import Config
from .context import Context
from .errors import Interrupted, TeardownError, UnlockError
from .ports import Ports
from .report import Report

log = logging.getLogger("lczfs_unlockd")


def run(config: Config, ports: Ports) -> Report:
    """Run the whole sequence; never raises UnlockError (it is in the report)."""
    ctx = Context(config, ports)
    start = ports.clock.monotonic()
    mode = "dry run: " if config.dry_run else ""
    log.info(
        "%sunlocking %s with keystore %s (config %s)",
        mode, config.pool, config.keystore.device, config.source,
    )  # fmt: skip
    try:
        with ctx.signals.installed():
            try:
                with (
                    teardown.masking(ctx),  # left last: after the unmount and the close
                    pool.imported(ctx),
                    keystore.opened(ctx) as device,
                    mount.mounted(ctx, device),
                ):
                    keys.load(ctx)
            finally:
                ctx.tear_down()
                teardown.verify(ctx)
    except (UnlockError, Interrupted) as exc:
        ctx.report.error = exc
    except Exception as exc:
        # A bug, or input nobody foresaw: still a reported failure
        # (STATUS=, ERRNO=, the teardown above has run), not a traceback
        # in place of a status line.  Only the type and a bounded text:
        # an exception's text is no place to trust with key material.
        log.debug("unexpected error", exc_info=True)
        ctx.report.error = UnlockError(
            f"unexpected {type(exc).__name__}: {str(exc)[:200]} (a bug: please report it "
            "with journalctl -b -u lczfs-unlockd; rd.lczfs.debug shows the traceback)"
        )
    return _finished(ctx, ports.clock.monotonic() - start)


def _finished(ctx: Context, elapsed: float) -> Report:
    report = ctx.report
    report.elapsed = elapsed
    if report.error is None and report.teardown_problems:
        report.error = TeardownError("; ".join(report.teardown_problems))
    if report.error is None and ctx.signals.pending is not None:
        # Arrived while the teardown ran (or was swallowed and never re-raised).
        report.error = Interrupted(
            f"received {signal.Signals(ctx.signals.pending).name} during teardown"
        )
    report.ok = report.error is None
    return report
