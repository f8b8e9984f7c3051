"""Step 5, the teardown: mask what could reopen the keystore, then verify that
nothing of this run is left.

Each step registers the undoing of its own resource (``Context.on_exit``:
EBUSY retried, a failure recorded and the rest still run); this module adds
the last action, masking, and the check afterwards that the mount, the
directories, the mapping, the imported pool of a dry run are really gone
and the units really masked.  What is not becomes ``teardown_problems``.
"""

from __future__ import annotations

import functools
import logging

from . import keystore, mount, pool
from .context import Context
from .errors import UnlockError
from .ports import MappingState
from .unitnames import cryptsetup_unit, mount_unit

log = logging.getLogger("lczfs_unlockd")


def units_to_mask(ctx: Context) -> list[str]:
    ks = ctx.config.keystore
    units = [cryptsetup_unit(ks.name), mount_unit(ks.mountpoint), *ctx.config.mask]
    return list(dict.fromkeys(units))


def mask_at_end(ctx: Context) -> None:
    """At the very end of a real run (after unmount and close): stop and mask
    the units that could open or mount the keystore again before switch-root."""
    if not ctx.config.dry_run:
        ctx.on_exit("mask units", functools.partial(_mask, ctx))


def _mask(ctx: Context) -> None:
    units = units_to_mask(ctx)
    ctx.ports.units.stop_and_mask(units)
    ctx.report.masked = units
    log.info("masked %s", ", ".join(units))


def verify(ctx: Context) -> None:
    """Check that nothing outlives the run; record what is left."""
    c, p = ctx.config, ctx.ports
    ks = c.keystore
    problems: list[str] = []
    checked: list[str] = []
    try:
        if mount.still_mounted(ctx):
            problems.append(f"{ks.mountpoint} is still mounted")
        else:
            checked.append(f"nothing mounted on {ks.mountpoint}")
        left_dirs = [d for d in ctx.state.created_dirs if p.fs.exists(d)]
        if left_dirs:
            problems.append(f"directories this run created remain: {', '.join(left_dirs)}")
        elif ctx.state.created_dirs:
            checked.append(f"removed {', '.join(reversed(ctx.state.created_dirs))}")
        state = p.crypt.status(ks.name)
        if state in (MappingState.ACTIVE, MappingState.BUSY) and not keystore.ours(ctx):
            checked.append(f"{ks.mapper_path} left open as it was found (dry run)")
        elif state in (MappingState.ACTIVE, MappingState.BUSY):
            problems.append(f"{ks.mapper_path} is still open")
        elif state is MappingState.INACTIVE:
            checked.append(f"{ks.mapper_path} closed")
        else:
            checked.append(f"{ks.mapper_path} not present (device-mapper unavailable)")
        if not c.dry_run:
            for unit in units_to_mask(ctx):
                unit_state = p.units.unit_file_state(unit)
                if unit_state.startswith("masked"):
                    checked.append(f"{unit} {unit_state}")
                else:
                    problems.append(f"{unit} is {unit_state}, not masked")
        if c.dry_run and not ctx.report.pool_imported_before:
            if p.zpool.health(c.pool, timeout=pool.TEARDOWN_CALL_TIMEOUT) is not None:
                problems.append(f"pool {c.pool} is still imported")
            else:
                checked.append(f"pool {c.pool} not imported, as before")
    except UnlockError as exc:
        problems.append(f"verification: {exc}")
    if checked:
        log.info("verified: %s", "; ".join(checked))
    for problem in problems:
        log.error("left behind: %s", problem)
    ctx.report.teardown_problems += problems
    ctx.report.verified = not ctx.report.teardown_problems
