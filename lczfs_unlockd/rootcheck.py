"""Step 5, the root check: refuse a root this run cannot vouch for.

ZFS metadata is not authenticated.  Whoever holds the disk can rename
datasets, or put an unencrypted dataset (or one under an encryption root of
their own) where the root is expected: the keystore still opens — with a
TPM-only keystore, by itself — the real keys still load, and the boot
would mount the attacker's root.  So before ``READY=1`` the dataset that
will be mounted as / (``root_dataset``, else ``root=zfs:…`` on the kernel
command line, ``zfs:AUTO`` meaning the pool's ``bootfs``) and every
``verify_datasets`` entry must exist, be encrypted, have its key loaded, and
belong to an encryption root this run unlocked (or one of
``trusted_roots``): a dataset under such a root can only have been written
by someone who had the key.

A refusal fails closed: the keys this run loaded are unloaded again (the
impostor must not reach the real datasets), the pool stays imported (an
export would only let the distribution import it again), and the flag file
``paths.ROOT_REFUSED_FLAG`` makes sysroot.mount's drop-in assertion fail,
so the distribution's own mount cannot mount the impostor: the initrd goes
to emergency.target.  The PCR measurement happened when the keystore was
opened.
"""

from __future__ import annotations

import logging

from . import paths
from .config import BOOTFS, Config
from .context import Context
from .errors import NoSuchDatasetError, PoolError, RootRefusedError
from .ports import DatasetInfo

log = logging.getLogger("lczfs_unlockd")


def _targets(ctx: Context) -> list[tuple[str, str]]:
    """(what, dataset) to check, in order; the root first."""
    c = ctx.config
    out: list[tuple[str, str]] = []
    if c.root_dataset is not None:
        out.append(("root dataset", c.root_dataset))
    kernel = c.kernel_root
    if kernel == BOOTFS:
        try:
            bootfs = ctx.ports.zpool.bootfs(c.pool)
        except PoolError as exc:
            raise RootRefusedError(
                f"refusing the root: cannot read the bootfs of {c.pool} for root=zfs:AUTO: {exc}"
            ) from None
        if bootfs is None:
            if c.root_dataset is None:
                raise RootRefusedError(
                    f"refusing the root: the kernel command line says root=zfs:AUTO but pool "
                    f"{c.pool} has no bootfs property: set it (zpool set bootfs=DATASET "
                    f"{c.pool}) or name the dataset (root=zfs:DATASET, root_dataset)"
                )
        else:
            kernel = bootfs
    if kernel is not None and kernel != BOOTFS:
        if kernel.split("/")[0] != c.pool:
            log.info("root=zfs:%s is not in pool %s: not this daemon's to check", kernel, c.pool)
        elif kernel != c.root_dataset:
            out.append(("root dataset", kernel))
    out += [("verify_datasets entry", name) for name in c.verify_datasets]
    return out


def _problem(ctx: Context, name: str, trusted: list[str], verified: set[str]) -> str | None:
    """Why ``name`` cannot be vouched for, or None."""
    try:
        (info,) = ctx.ports.zpool.datasets([name], recursive=False)
    except NoSuchDatasetError:
        return f"there is no such dataset in pool {ctx.config.pool}"
    except (PoolError, ValueError) as exc:
        return f"cannot read its properties: {exc}"
    return _mismatch(info, trusted, verified, dry_run=ctx.config.dry_run)


def _mismatch(
    info: DatasetInfo, trusted: list[str], verified: set[str], *, dry_run: bool
) -> str | None:
    if info.encryption in ("off", "-", ""):
        return (
            f"it is not encrypted (encryption={info.encryption or 'off'}); expected a dataset "
            f"encrypted under {_listed(trusted)}"
        )
    root = info.encryption_root
    if root not in trusted:
        return (
            f"its encryption root is {root or 'unknown'}, expected {_listed(trusted)} "
            "(trusted_roots, else the encryption roots this run unlocked)"
        )
    if info.keystatus != "available" and not (dry_run and root in verified):
        return f"its key is not loaded (keystatus={info.keystatus})"
    return None


def _listed(names: list[str]) -> str:
    if not names:
        return "an encryption root this run unlocked (it unlocked none)"
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def _ours(config: Config) -> bool:
    """Whether there can be anything to check (else the root is not ours to guard)."""
    kernel = config.kernel_root
    in_pool = kernel is not None and (kernel == BOOTFS or kernel.split("/")[0] == config.pool)
    return config.root_dataset is not None or bool(config.verify_datasets) or in_pool


def _mark_checked(ctx: Context, why: str) -> None:
    try:
        ctx.ports.fs.write_flag(paths.ROOT_CHECKED_FLAG, why + "\n")
        ctx.state.root_checked = True
    except OSError as exc:
        # Fails closed: without the flag, sysroot.mount's assertion fails.
        log.error(
            "cannot create %s (%s): sysroot.mount will refuse to mount the root",
            paths.ROOT_CHECKED_FLAG, exc.strerror,
        )  # fmt: skip


def prepare(ctx: Context) -> None:
    """At the start: forget an earlier run's verdict; a root that is not ours is let through.

    Until the check passes, sysroot.mount's drop-in refuses to run: any
    failure of the run — a broken keystore, a kill at the start timeout —
    leaves the distribution's mount blocked, never an unchecked root mounted.
    """
    try:
        ctx.ports.fs.remove_flag(paths.ROOT_CHECKED_FLAG)
    except OSError as exc:
        log.warning("cannot remove %s: %s", paths.ROOT_CHECKED_FLAG, exc.strerror)
    if not _ours(ctx.config):
        _mark_checked(ctx, "the root is not a dataset of this pool: nothing to check")


def check_root(ctx: Context) -> None:
    """Refuse (RootRefusedError) unless every dataset to check is ours; see the module."""
    c, report = ctx.config, ctx.report
    if c.kernel_root == BOOTFS:
        log.warning(
            "root=zfs:AUTO: the root is checked as %s's bootfs, but dracut mounts the first "
            "bootfs of any imported pool; name the dataset (root=zfs:DATASET) to be sure",
            c.pool,
        )
    with ctx.step("checking the root dataset", "rootcheck"):
        problems: list[str] = []
        try:
            targets = _targets(ctx)
        except RootRefusedError as exc:
            targets, problems = [], [str(exc)]
        if not targets and not problems:
            log.info(
                "root check: no ZFS root on the kernel command line, no root_dataset and no "
                "verify_datasets: nothing to check"
            )
            if report.keystore_method == "token":
                log.warning(
                    "the keystore opened without a secret from anyone (a token) and no root "
                    "dataset is checked: whoever holds the disk could put a root of theirs "
                    "in place; set root_dataset"
                )
            return
        unlocked = [name for name, _ in report.loaded] + report.already_loaded
        trusted = list(c.trusted_roots) if c.trusted_roots is not None else unlocked
        verified = {name for name, _ in report.loaded}
        for what, name in targets:
            ctx.checkpoint()
            problem = _problem(ctx, name, trusted, verified)
            if problem is None:
                log.info("%s %s is encrypted under %s: ok", what, name, _listed(trusted))
                report.checked.append(name)
            else:
                problems.append(f"refusing {what} {name}: {problem}")
        if not problems:
            _mark_checked(ctx, f"checked: {', '.join(report.checked)}")
            return
        if not c.dry_run:
            problems += _fail_closed(ctx)
        raise RootRefusedError(
            "; ".join(problems)
            + (
                ": someone may have changed the pool (an evil maid); inspect it with zpool "
                "import -N and zfs list -o name,encryption,encryptionroot,keystatus from a "
                "trusted system"
            )
        )


def _fail_closed(ctx: Context) -> list[str]:
    """Block sysroot.mount; what could not be done.  (The keys this run
    loaded are unloaded by keys.py's undo: the root was not vouched for.)"""
    c, p = ctx.config, ctx.ports
    left = []
    try:
        p.fs.write_flag(
            paths.ROOT_REFUSED_FLAG, f"lczfs-unlockd refused the root of pool {c.pool}\n"
        )
    except OSError as exc:
        left.append(
            f"cannot create {paths.ROOT_REFUSED_FLAG} ({exc.strerror}): sysroot.mount is not "
            "blocked"
        )
    return left
