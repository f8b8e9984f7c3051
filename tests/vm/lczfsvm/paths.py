"""Where the harness finds what it builds from: the repository's daemon
package, units and dracut module, and the guest-side files in tests/vm/guest."""

from __future__ import annotations

from pathlib import Path

VM_DIR = Path(__file__).resolve().parent.parent  # tests/vm
GUEST_DIR = VM_DIR / "guest"
REPO = VM_DIR.parent.parent
DRACUT_MODULE = REPO / "dracut" / "90lczfs-unlockd"
PACKAGE = REPO / "lczfs_unlockd"
UNIT = REPO / "units" / "lczfs-unlockd.service"
# The sysroot.mount drop-in the dracut module installs next to the unit.
SYSROOT_DROPIN = REPO / "units" / "sysroot.mount.d-lczfs-unlockd.conf"
