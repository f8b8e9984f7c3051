"""The boot, in order: pool, keystore, mount, keys, root check — then teardown and the report.

Each step registers the undoing of what it makes on the run's one
``ExitStack`` *before* making it (the undo checks what is really there), so
a failure or a SIGTERM at any point — even between a C call returning and
the next line — leaves nothing mounted, mapped or imported that was not
there before.  Before the stack unwinds, signals stop interrupting: the
teardown runs whole, and is verified afterwards.
"""

from __future__ import annotations

import logging
import signal

from . import keys, keystore, measure, mount, pool, rootcheck, teardown
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
                with ctx.undo:
                    try:
                        teardown.mask_at_end(ctx)  # registered first: runs last
                        rootcheck.prepare(ctx)
                        measure.cap_on_failure(ctx)  # after the keystore is closed
                        pool.import_pool(ctx)
                        device = keystore.open_keystore(ctx)
                        mount.mount_keystore(ctx, device)
                        keys.load_keys(ctx)
                        rootcheck.check_root(ctx)
                        keys.raise_failures(ctx)
                        ctx.state.completed = True
                    finally:
                        ctx.tear_down()  # before the undo actions run
            finally:
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
