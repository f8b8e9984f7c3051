"""Programs and libraries the daemon uses, in one place.

The defaults work in any initrd whose PATH and dynamic loader find the
programs and sonames (dracut).  Packagers that must not rely on PATH or the
loader's search path (Nix) write ``lczfs_unlockd/_build_paths.py`` at build
time with absolute paths; its names override these.
"""

from __future__ import annotations

import contextlib

ZPOOL = "zpool"
ZFS = "zfs"
SYSTEMD_ASK_PASSWORD = "systemd-ask-password"
# Candidate sonames, tried in order.  Full sonames (never "zfs_core"): cffi's
# and ctypes.util's short-name lookup runs ldconfig and gcc, which an initrd
# does not have.
LIBCRYPTSETUP: tuple[str, ...] = ("libcryptsetup.so.12",)
LIBZFS_CORE: tuple[str, ...] = ("libzfs_core.so.3",)
LIBNVPAIR: tuple[str, ...] = ("libnvpair.so.3",)
LIBC: tuple[str, ...] = ("libc.so.6",)
# Directory of libcryptsetup's token plugins, when not its built-in one.
CRYPTSETUP_TOKEN_PATH: str | None = None
# The TSS2 libraries (tpm2-tss) for PCR measurements: the ones systemd's TPM2
# token plugin loads, plus the TCTI loader.
LIBTSS2_ESYS: tuple[str, ...] = ("libtss2-esys.so.0",)
LIBTSS2_TCTILDR: tuple[str, ...] = ("libtss2-tctildr.so.0",)
# tctildr's configuration string: the kernel's resource manager.
TPM2_TCTI = "device:/dev/tpmrm0"
# systemd's userspace TPM2 measurement log (systemd-pcrextend, systemd-cryptsetup).
TPM2_MEASURE_LOG = "/run/log/systemd/tpm2-measure.log"
# sysroot.mount's drop-in (units/sysroot.mount.d-lczfs-unlockd.conf) asserts
# that the first exists (the root check passed, or the root is not this
# daemon's to check) and the second does not (the root check refused it):
# any failure, a kill included, leaves the distribution's mount blocked.
ROOT_CHECKED_FLAG = "/run/lczfs-unlockd/root-checked"
ROOT_REFUSED_FLAG = "/run/lczfs-unlockd/root-refused"
SYSTEMD_PRIVATE_BUS = "unix:path=/run/systemd/private"

with contextlib.suppress(ImportError):  # only present in packaged builds
    from ._build_paths import *  # type: ignore[import-not-found,unused-ignore]  # noqa: F403
