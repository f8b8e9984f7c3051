# Writes lczfs_unlockd/_build_paths.py (run from the source root): the
# absolute paths lczfs_unlockd/paths.py imports over its defaults.  Run by
# nix/package.nix's postPatch and by the build rehearsal in tests/nix, so
# the two cannot drift.  Plain bash, no stdenv functions.
#
# Environment: ZPOOL ZFS SYSTEMD_ASK_PASSWORD (programs), ZFS_LIBDIR and
# CRYPTSETUP_LIBDIR (directories holding libzfs_core/libnvpair and
# libcryptsetup), LIBC (libc.so.6), CRYPTSETUP_TOKEN_PATH (systemd's
# libcryptsetup token plugins).
set -euo pipefail

# Libraries are given by soname file (libfoo.so.N), as the daemon would
# dlopen them, never the linker name or the full version: a soname bump
# fails the build here, not the boot.
soname() {
    local dir=$1 name=$2 f
    for f in "$dir/$name".so.*; do
        if [[ "${f#"$dir/$name".so.}" =~ ^[0-9]+$ ]]; then
            echo "$f"
            return 0
        fi
    done
    echo "no $name.so.N in $dir" >&2
    return 1
}

libcryptsetup=$(soname "$CRYPTSETUP_LIBDIR" libcryptsetup)
libzfs_core=$(soname "$ZFS_LIBDIR" libzfs_core)
libnvpair=$(soname "$ZFS_LIBDIR" libnvpair)

cat > lczfs_unlockd/_build_paths.py <<PY
"""Absolute paths, written by nix/build-paths.sh at build time."""

ZPOOL = "$ZPOOL"
ZFS = "$ZFS"
SYSTEMD_ASK_PASSWORD = "$SYSTEMD_ASK_PASSWORD"
LIBCRYPTSETUP = ("$libcryptsetup",)
LIBZFS_CORE = ("$libzfs_core",)
LIBNVPAIR = ("$libnvpair",)
LIBC = ("$LIBC",)
# Where libcryptsetup should look for LUKS2 token plugins (TPM2, FIDO2,
# PKCS#11): systemd builds them, cryptsetup's compiled-in default is its
# own, empty, lib/cryptsetup.  See crypt_token_set_external_path(3).
CRYPTSETUP_TOKEN_PATH = "$CRYPTSETUP_TOKEN_PATH"
PY

# Fail here, not at boot, if a path above does not exist (e.g. the Python
# bindings of systemd given where systemd was meant).
status=0
for p in "$ZPOOL" "$ZFS" "$SYSTEMD_ASK_PASSWORD" "$LIBC" "$CRYPTSETUP_TOKEN_PATH"; do
    if [ ! -e "$p" ]; then
        echo "_build_paths.py names $p, which does not exist" >&2
        status=1
    fi
done
cat lczfs_unlockd/_build_paths.py
exit "$status"
