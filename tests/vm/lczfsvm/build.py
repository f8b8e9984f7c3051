"""Build the guest: Debian tree, kernel, base initrds, test overlays.

All of it runs on the host as root, in a private mount namespace
(``unshare -m``) so that the bind mounts into the chroot vanish with the
process whatever happens.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cache, cpio, proc
from .paths import DRACUT_MODULE, GUEST_DIR, PACKAGE, REPO, SYSROOT_DROPIN, UNIT
from .proc import log

MIRROR = os.environ.get("LCZFS_VM_MIRROR", "http://deb.debian.org/debian")
# Pinned: dracut picks whatever compressor it finds otherwise.
COMPRESS = "zstd"
# Bounds on the host-side commands (a cold guest tree took 28 min on a loaded
# machine once; dracut takes about 40 s).
ROOTFS_TIMEOUT = 3600.0
CHROOT_TIMEOUT = 1800.0
COMMON_DRACUT_ARGS = [
    "--force", "--no-hostonly", "--no-hostonly-cmdline", "--no-early-microcode",
    "--compress", COMPRESS,
    # Nothing a test boot uses; each costs boot time.
    "--omit", "plymouth network network-legacy network-manager ifcfg nfs iscsi nbd "
    "fcoe fcoe-uefi multipath lvm mdraid biosdevname nvmf resume btrfs shutdown",
]  # fmt: skip


def rootfs() -> Path:
    """The Debian trixie tree with kernel, zfs.ko (DKMS) and userland (~8 min cold)."""
    recipe = GUEST_DIR / "rootfs.sh"
    name = f"rootfs-{cache.recipe_hash([recipe, MIRROR])}"

    def build(tmp: Path) -> None:
        log(f"building the guest tree {name} (debootstrap + apt + DKMS, ~8 min)")
        unshared(
            ["bash", str(recipe), str(tmp), MIRROR],
            log_to=cache.cache_root() / f"{name}.log",
            timeout=ROOTFS_TIMEOUT,
            what=str(recipe),
        )

    return cache.cached_dir(name, build)


def unshared(argv: Sequence[str], *, log_to: Path, timeout: float, what: str) -> None:
    """proc.run in a private mount namespace: its mounts vanish with it, whatever happens."""
    proc.run(
        ["unshare", "--mount", "--propagation", "private", *argv],
        log_to=log_to, timeout=timeout, what=what,
    )  # fmt: skip


def kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(versions) != 1:
        raise RuntimeError(f"expected one kernel in {root}/lib/modules, found {versions}")
    return versions[0]


def kernel(root: Path) -> Path:
    return root / "boot" / f"vmlinuz-{kernel_version(root)}"


def chroot_script(
    root: Path,
    script: str,
    binds: dict[str, Path],
    *,
    log_to: Path,
    timeout: float = CHROOT_TIMEOUT,
    writable_etc: bool = False,
) -> None:
    """Run a bash script in the chroot, with host paths bound in (read-only).

    writable_etc: /etc is an overlay whose writes land in a tmpfs and vanish
    with the script (the cached tree is never changed).
    """
    mounts = [
        f"mount -t proc proc {root}/proc",
        f"mount -t sysfs sysfs {root}/sys",
        f"mount --rbind /dev {root}/dev",
        f"mount -t tmpfs tmpfs {root}/tmp",
        f"mount -t tmpfs tmpfs {root}/var/tmp",
        f"mount -t tmpfs tmpfs {root}/mnt",
    ]
    if writable_etc:
        etc = shlex.quote(f"{root}/etc")
        upper = shlex.quote(f"{root}/mnt/.etc")
        mounts += [
            f"mkdir -p {upper}/upper {upper}/work",
            f"mount -t overlay overlay -o lowerdir={etc},upperdir={upper}/upper,"
            f"workdir={upper}/work {etc}",
        ]
    for dst, src in binds.items():
        target = shlex.quote(f"{root}{dst}")
        if src.is_dir():
            mounts.append(f"mkdir -p {target}")
        else:
            mounts.append(f"mkdir -p $(dirname {target}) && touch {target}")
        mounts.append(f"mount --bind {shlex.quote(str(src))} {target}")
    outer = (
        "set -euo pipefail\n"
        + "\n".join(mounts)
        + "\n"
        + (
            f"exec chroot {root} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
            f"LANG=C.UTF-8 /bin/bash -euo pipefail -c {shlex.quote(script)}\n"
        )
    )
    unshared(["bash", "-c", outer], log_to=log_to, timeout=timeout, what="chroot script")


@dataclass(frozen=True)
class InitrdConfig:
    """A config present in the tree when dracut runs, with the files it names.

    The dracut module copies the config and the files it names (key file,
    tpm2_signature, tpm2_pcrlock) into the initrd itself, as on a user's
    machine.  files: (absolute path under /etc, content).
    """

    config: str
    files: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        for path, _ in self.files:
            if not path.startswith("/etc/") or ".." in path.split("/"):
                raise ValueError(f"InitrdConfig: {path}: only files under /etc")


# The base initrd's extra programs: the report's second TPM2 unseal
# (cryptsetup open --test-passphrase --token-only) needs the cryptsetup CLI.
TEST_INSTALL = "cryptsetup"


def _module_dracut(
    root: Path, tmp: Path, args: Sequence[str], config: InitrdConfig | None = None
) -> None:
    """dracut in the tree with the project's dracut module, package, unit and
    sysroot.mount drop-in bound in (and config, when given, in /etc): writes
    tmp/initrd.img and tmp/lsinitrd.txt."""
    kver = kernel_version(root)
    conf = tmp / "conf"
    conf.mkdir()
    settings = (
        "lczfs_unlockd_package_dir=/mnt/src/lczfs_unlockd\n"
        "lczfs_unlockd_unit=/mnt/src/lczfs-unlockd.service\n"
    )
    binds = {
        "/usr/lib/dracut/modules.d/90lczfs-unlockd": DRACUT_MODULE,
        "/mnt/src/lczfs_unlockd": PACKAGE,
        "/mnt/src/lczfs-unlockd.service": UNIT,
        # Next to the unit, where the module looks for it.
        "/mnt/src/sysroot.mount.d-lczfs-unlockd.conf": SYSROOT_DROPIN,
        "/mnt/conf": conf,
    }
    setup = ""
    if config is not None:
        src = tmp / "config"
        src.mkdir()
        (src / "lczfs-unlockd.toml").write_text(config.config)
        settings += "lczfs_unlockd_config=/mnt/config/lczfs-unlockd.toml\n"
        for i, (path, data) in enumerate(config.files):
            (src / f"file{i}").write_bytes(data)
            setup += f"install -D -m 0644 /mnt/config/file{i} {shlex.quote(path)}\n"
        binds["/mnt/config"] = src
    (conf / "lczfs.conf").write_text(settings)
    out = tmp / "out"
    out.mkdir()
    binds["/mnt/out"] = out
    argv = [*COMMON_DRACUT_ARGS, "--confdir", "/mnt/conf", "--kver", kver, *args,
            "/mnt/out/initrd.img"]  # fmt: skip
    chroot_script(
        root,
        setup
        + "dracut "
        + shlex.join(argv)
        + "\nlsinitrd /mnt/out/initrd.img > /mnt/out/lsinitrd.txt",
        binds,
        log_to=tmp / "dracut.log",
        writable_etc=config is not None,
    )
    shutil.move(out / "initrd.img", tmp / "initrd.img")
    shutil.move(out / "lsinitrd.txt", tmp / "lsinitrd.txt")


def base_initrd(root: Path, config: InitrdConfig | None = None) -> Path:
    """dracut (systemd, zfs, crypt) + the project's dracut module.

    Rebuilt (~40 s) whenever the dracut module, the daemon package or its
    units change: the module computes the Python closure from the package,
    so the initrd under test is exactly what `dracut --add lczfs-unlockd`
    gives a user.  Test boots only append config and test units.  With a
    config (InitrdConfig), that config and the files it names are in the
    tree when dracut runs (a base initrd of its own).
    """
    parts: list[Path | str | bytes] = [
        DRACUT_MODULE, PACKAGE, UNIT, SYSROOT_DROPIN, " ".join(COMMON_DRACUT_ARGS), TEST_INSTALL
    ]  # fmt: skip
    if config is not None:
        parts += ["config", config.config]
        for path, data in config.files:
            parts += [path, data]
    name = f"initrd-{root.name.removeprefix('rootfs-')}-" + cache.recipe_hash(parts)

    def build(tmp: Path) -> None:
        log(f"dracut: base initrd with the lczfs-unlockd module for {kernel_version(root)}")
        _module_dracut(
            root, tmp, ["--add", "lczfs-unlockd tpm2-tss", "--install", TEST_INSTALL], config
        )

    return cache.cached_dir(name, build) / "initrd.img"


PROVISION_TOOLS = (
    "bash sfdisk blkid wipefs mkfs.ext4 cryptsetup systemd-cryptenroll dmsetup dd sync "
    "head od tr sha256sum truncate sleep cmp install mkdir chmod rm mv ls readlink "
    "debugfs dumpe2fs grep cat base64 /usr/lib/systemd/systemd-measure "
    # systemd-pcrlock and the components that recognise SeaBIOS's separators
    # (PCRs 0-6, 7); lock-firmware-code covers the rest of PCRs 0 and 2.
    "/usr/lib/systemd/systemd-pcrlock "
    "/usr/lib/pcrlock.d/500-separator.pcrlock.d/300-0x00000000.pcrlock "
    "/usr/lib/pcrlock.d/500-separator.pcrlock.d/600-0xffffffff.pcrlock "
    "/usr/lib/pcrlock.d/400-secureboot-separator.pcrlock.d/300-0x00000000.pcrlock "
    "/usr/lib/pcrlock.d/400-secureboot-separator.pcrlock.d/600-0xffffffff.pcrlock"
)


def poweroff_links(a: cpio.Archive) -> None:
    """poweroff/reboot/halt as systemctl links (Debian's systemd-sysv package).

    dracut's emergency path (rd.emergency=poweroff) runs `poweroff`; without
    it a failed boot would hang until the host-side deadline.
    """
    for name in ("poweroff", "reboot", "halt"):
        a.symlink(f"usr/sbin/{name}", "../bin/systemctl")


def provision_initrd(root: Path) -> Path:
    """dracut (systemd, zfs, crypt, tpm2) + the tools that make the golden disks."""
    name = f"initrd-provision-{root.name.removeprefix('rootfs-')}-" + cache.recipe_hash(
        [PROVISION_TOOLS, " ".join(COMMON_DRACUT_ARGS)]
    )

    def build(tmp: Path) -> None:
        kver = kernel_version(root)
        out = tmp / "out"
        out.mkdir()
        args = [*COMMON_DRACUT_ARGS, "--kver", kver,
                "--add", "systemd zfs crypt dm tpm2-tss systemd-ask-password",
                "--install", PROVISION_TOOLS, "/mnt/out/initrd.img"]  # fmt: skip
        log(f"dracut: provisioning initrd for {kver}")
        chroot_script(
            root, "dracut " + shlex.join(args), {"/mnt/out": out}, log_to=tmp / "dracut.log"
        )
        shutil.move(out / "initrd.img", tmp / "initrd.img")

    return cache.cached_dir(name, build) / "initrd.img"


# The operations boot's programs: what the operations commands run (the
# cryptsetup CLI, systemd-cryptenroll, sfdisk, mkfs.ext4, wipefs, mount), what
# the scenario scripts check with (tpm2-tools, kill, timeout, systemd-run).
OPS_TOOLS = (
    "bash sfdisk blkid wipefs mkfs.ext4 cryptsetup systemd-cryptenroll dmsetup dd sync "
    "head tail od tr sha256sum truncate sleep cmp install mkdir chmod rm mv cp ls readlink "
    "grep sed cut wc sort uniq xargs stat find cat base64 env timeout kill mount umount mountpoint lsblk "
    "udevadm systemd-run setsid zstd tpm2_pcrextend tpm2_pcrread tpm2_getcap"
)
# Left out of the operations boot's standard library: tests, GUIs, installers.
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "lib2to3")


def ops_initrd(root: Path) -> Path:
    """A provisioning-style initrd that also has the daemon (the dracut module as
    base_initrd adds it) and the whole standard library: for the operations
    commands (``lczfs-unlockd setup`` ...) in a boot that stands in for the
    running system.  The module's Python closure is the daemon's; the commands
    may import more (lazily), as they may in stage 2, so every ``.py`` of the
    tree's standard library is appended (sources only: compiled at import)."""
    parts: list[Path | str | bytes] = [
        DRACUT_MODULE, PACKAGE, UNIT, SYSROOT_DROPIN, " ".join(COMMON_DRACUT_ARGS), OPS_TOOLS,
        ",".join(STDLIB_SKIP),
    ]  # fmt: skip
    name = f"initrd-ops-{root.name.removeprefix('rootfs-')}-" + cache.recipe_hash(parts)

    def build(tmp: Path) -> None:
        log(f"dracut: operations initrd for {kernel_version(root)}")
        _module_dracut(
            root, tmp,
            ["--add", "lczfs-unlockd tpm2-tss systemd zfs crypt dm systemd-ask-password",
             "--install", OPS_TOOLS],
        )  # fmt: skip
        stdlib = _stdlib(root)
        a = cpio.Archive()
        for p in sorted(stdlib.rglob("*.py")):
            rel = p.relative_to(stdlib)
            # Symlinks point into the tree's /etc (sitecustomize.py): absolute, not here.
            if rel.parts[0] in STDLIB_SKIP or "site-packages" in rel.parts or p.is_symlink():
                continue
            a.copy(p, f"{stdlib.relative_to(root)}/{rel}", 0o644)
        initrd = tmp / "initrd.img"
        initrd.write_bytes(cpio.append(initrd.read_bytes(), a.to_bytes()))

    return cache.cached_dir(name, build) / "initrd.img"


def _stdlib(root: Path) -> Path:
    found = sorted(p for p in (root / "usr/lib").glob("python3.*") if (p / "os.py").exists())
    if len(found) != 1:
        raise RuntimeError(f"expected one Python standard library in {root}/usr/lib: {found}")
    return found[0]


@dataclass(frozen=True)
class Overlay:
    """What a test boot adds on top of the base initrd."""

    config: str | None  # /etc/lczfs-unlockd.toml (None: leave out)
    files: tuple[tuple[str, bytes, int], ...] = ()  # (path, content, mode)
    needles: tuple[bytes, ...] = ()  # secrets the report greps /run for
    report: bool = True  # the report unit that powers off
    checks: str | None = None  # /etc/lczfs-test/checks.json: what else the report records
    # The units whose masking the report records; None: those the config
    # names (keystore.name's cryptsetup unit, keystore.mountpoint's mount
    # unit, the mask extras), escaped in the guest by systemd-escape.
    units: tuple[str, ...] | None = None


def overlay(spec: Overlay) -> bytes:
    """The test cpio: config, key file, test units (the daemon is in the base)."""
    a = cpio.Archive()
    poweroff_links(a)
    if spec.config is not None:
        a.file("etc/lczfs-unlockd.toml", spec.config, 0o644)
    for path, data, mode in spec.files:
        a.file(path, data, mode)
    if spec.report:
        a.copy(GUEST_DIR / "report.py", "usr/lib/lczfs-test/report.py", 0o755)
        for unit in (
            "lczfs-test-report.service",
            "lczfs-test-report-late.service",
            "lczfs-test-sigterm.service",
        ):
            a.copy(GUEST_DIR / unit, f"usr/lib/systemd/system/{unit}", 0o644)
            a.symlink(
                f"etc/systemd/system/initrd.target.wants/{unit}", f"/usr/lib/systemd/system/{unit}"
            )
        a.file("etc/lczfs-test/needles.json", json.dumps([n.hex() for n in spec.needles]), 0o600)
        if spec.units is not None:
            a.file("etc/lczfs-test/units.json", json.dumps(list(spec.units)), 0o644)
        if spec.checks is not None:
            a.file("etc/lczfs-test/checks.json", spec.checks, 0o644)
    return a.to_bytes()


def test_initrd(root: Path, spec: Overlay, dest: Path, config: InitrdConfig | None = None) -> Path:
    base = base_initrd(root, config).read_bytes()
    dest.write_bytes(cpio.append(base, overlay(spec)))
    return dest


if __name__ == "__main__":  # pragma: no cover
    r = rootfs()
    print(r, kernel(r), base_initrd(r), provision_initrd(r), REPO)
