# Builds the initrd's Python tree into $out (see nix/initrd-env.nix for why
# and what).  Run by nix/initrd-env.nix and by the size rehearsal in
# tests/nix on the host's Python, so the two cannot drift.  Plain bash.
#
# Environment:
#   out             the tree to create
#   PYTHON          the interpreter's prefix ($PYTHON/bin/python$PY_VER, $PYTHON/lib/python$PY_VER)
#   PY_VER          e.g. 3.11
#   SITE_PACKAGES   the module path relative to a prefix (lib/python3.11/site-packages)
#   DEPS            directories whose $SITE_PACKAGES is merged (the daemon and its dependencies)
#   EXCLUDED_STDLIB, EXCLUDED_DYNLOAD, EXCLUDED_SITE
#                   globs (space-separated) removed from the standard library,
#                   lib-dynload and the merged site-packages
set -euo pipefail
stdlib=lib/python$PY_VER

rm_globs() {
    local dir=$1 g
    shift
    for g in "$@"; do
        # Globs are meant to expand here.
        # shellcheck disable=SC2086
        rm -rf "$dir"/$g
    done
}

mkdir -p "$out/bin" "$out/$stdlib"

# Standard library: sources and the plain (non -O) bytecode.
cp -r --no-preserve=mode "$PYTHON/$stdlib/." "$out/$stdlib/"
read -r -a globs <<< "$EXCLUDED_STDLIB"
rm_globs "$out/$stdlib" "${globs[@]}"
read -r -a globs <<< "$EXCLUDED_DYNLOAD"
rm_globs "$out/$stdlib/lib-dynload" "${globs[@]}"
find "$out/$stdlib" -name '*.opt-1.pyc' -delete -o -name '*.opt-2.pyc' -delete

# Python dependencies, merged into one site-packages.
mkdir -p "$out/$SITE_PACKAGES"
for dep in $DEPS; do
    if [ -d "$dep/$SITE_PACKAGES" ]; then
        cp -r --no-preserve=mode --dereference "$dep/$SITE_PACKAGES/." "$out/$SITE_PACKAGES/"
    fi
done
read -r -a globs <<< "$EXCLUDED_SITE"
rm_globs "$out/$SITE_PACKAGES" "${globs[@]}"

# Extension modules must stay executable for the dynamic loader.
find "$out" -name '*.so' -exec chmod 0555 {} +

# The interpreter, copied so that Python derives its prefix from $out.
cp "$PYTHON/bin/python$PY_VER" "$out/bin/python3"
chmod 0555 "$out/bin/python3"

# As the dracut module does (dracut/90lczfs-unlockd/python-closure.py):
# pyzfs's C declarations parsed now, not at every boot
# (lczfs_unlockd/pyzfs_ffi.py, cffi's out-of-line ABI mode), so the
# initrd needs only cffi's C backend -- not the cffi Python package, not
# pycparser; and the daemon talks to PID 1 through pystemd.dbuslib
# without pystemd's introspection layer, so lxml goes too.
"$out/bin/python3" -I -m lczfs_unlockd.pyzfs_ffi \
    "$out/$SITE_PACKAGES/lczfs_unlockd/_pyzfs_ffi.py"
rm -rf "$out/$SITE_PACKAGES"/{cffi,pycparser,lxml}
rm -rf "$out/$SITE_PACKAGES"/{cffi,pycparser,lxml}-*.dist-info

cat > "$out/bin/lczfs-unlockd" <<PY
#!$out/bin/python3 -I
import sys

from lczfs_unlockd.cli import main

sys.exit(main())
PY
chmod 0555 "$out/bin/lczfs-unlockd"

# Smoke test: every lczfs_unlockd module and the bindings import from
# $out alone.  Without the prefix check a wrong prefix would silently
# fall back to the full $PYTHON and prove nothing.
"$out/bin/python3" -I - <<PY
import importlib, pkgutil, sys

import lczfs_unlockd

for info in pkgutil.walk_packages(lczfs_unlockd.__path__, "lczfs_unlockd."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
import _cffi_backend  # noqa: F401
import lczfs_unlockd.paths as paths
from lczfs_unlockd import pyzfs_ffi, units

assert pyzfs_ffi.preload({"libnvpair": "libnvpair.so.3", "libzfs_core": "libzfs_core.so.3"})
import libzfs_core  # noqa: F401  (with the pre-parsed declarations)
units._dbuslib()
dropped = sorted(m for m in ("cffi", "pycparser", "lxml") if m in sys.modules)
assert not dropped, f"imported at run time although dropped: {dropped}"

assert sys.prefix == "$out", f"prefix is {sys.prefix}, not $out"
# __main__ is this script, whose __file__ is "<stdin>".
foreign = sorted(
    f"{name}: {mod.__file__}"
    for name, mod in list(sys.modules.items())
    if name != "__main__"
    and getattr(mod, "__file__", None)
    and not mod.__file__.startswith("$out/")
)
assert not foreign, "imported from outside the initrd tree:\n" + "\n".join(foreign)
assert paths.ZPOOL.startswith("/"), paths.ZPOOL
print(f"initrd python tree ok: {len(sys.modules)} modules, paths from {paths.__file__}")
PY
"$out/bin/lczfs-unlockd" --version
du -sh "$out"
