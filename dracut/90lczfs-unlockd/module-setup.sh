#!/bin/bash
# dracut module: lczfs-unlockd — unlock an encrypted ZFS root from a LUKS
# keystore on a zvol of the same pool, as one Type=notify service in the
# systemd initrd.
#
# Install:  cp -r dracut/90lczfs-unlockd /usr/lib/dracut/modules.d/
#           dracut --force --add lczfs-unlockd
#
# Settings (any file in /etc/dracut.conf.d/, all optional):
#   lczfs_unlockd_package_dir=/path/to/lczfs_unlockd   the Python package
#       (default: where the host's python3 imports it from)
#   lczfs_unlockd_unit=/path/to/lczfs-unlockd.service  the unit
#       (default: the installed unit, else the one next to the package source)
#   lczfs_unlockd_config=/etc/lczfs-unlockd.toml       the config copied in
#
# The module is included automatically when the config file exists; without
# it, only on request (--add lczfs-unlockd).

_lczfs_python() {
    # The interpreter the initrd gets; dracut's $dracutsysrootdir makes it
    # work for cross-root builds too.
    local p
    p=$(find_binary python3) || return 1
    printf '%s\n' "$p"
}

_lczfs_config() {
    printf '%s\n' "${lczfs_unlockd_config:-/etc/lczfs-unlockd.toml}"
}

_lczfs_package_dir() {
    if [[ -n ${lczfs_unlockd_package_dir-} ]]; then
        [[ -f ${dracutsysrootdir-}$lczfs_unlockd_package_dir/cli.py ]] || return 1
        printf '%s\n' "$lczfs_unlockd_package_dir"
        return 0
    fi
    # -I: ignore PYTHONPATH and the current directory, like the launcher does.
    "${dracutsysrootdir-}$(_lczfs_python)" -I -c \
        'import os, lczfs_unlockd; print(os.path.dirname(lczfs_unlockd.__file__))' 2> /dev/null
}

_lczfs_unit() {
    local pkg candidate
    if [[ -n ${lczfs_unlockd_unit-} ]]; then
        printf '%s\n' "$lczfs_unlockd_unit"
        return 0
    fi
    pkg=$(_lczfs_package_dir) || pkg=
    for candidate in \
        "/etc/systemd/system/lczfs-unlockd.service" \
        "${systemdsystemunitdir:-/usr/lib/systemd/system}/lczfs-unlockd.service" \
        "/usr/lib/systemd/system/lczfs-unlockd.service" \
        "/usr/local/lib/systemd/system/lczfs-unlockd.service" \
        ${pkg:+"$pkg/../units/lczfs-unlockd.service"}; do
        if [[ -f ${dracutsysrootdir-}$candidate ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# called by dracut
check() {
    require_binaries python3 zpool zfs systemd-ask-password || return 1
    if ! _lczfs_package_dir > /dev/null; then
        derror "lczfs-unlockd: python3 cannot import lczfs_unlockd (set lczfs_unlockd_package_dir)"
        return 1
    fi
    if ! _lczfs_unit > /dev/null; then
        derror "lczfs-unlockd: lczfs-unlockd.service not found (set lczfs_unlockd_unit)"
        return 1
    fi
    [[ -f ${dracutsysrootdir-}$(_lczfs_config) ]] && return 0
    return 255
}

# called by dracut
depends() {
    local deps="systemd zfs crypt dm"
    # Password prompts go through systemd's agents; dracut >= 059 keeps the
    # console agent in its own module.
    if [[ -d ${dracutbasedir:-/usr/lib/dracut}/modules.d/01systemd-ask-password ]]; then
        deps+=" systemd-ask-password"
    fi
    echo "$deps"
    return 0
}

# called by dracut
installkernel() {
    # The keystore: dm-crypt with the usual ciphers, an ext4 file system.
    hostonly='' instmods dm_crypt ext4 crc32c
    hostonly='' instmods =crypto
}

# Extension modules are not executable, so dracut-install does not resolve
# their libraries (pystemd needs libsystemd.so.0, which a systemd initrd
# otherwise lacks): ask ldd.
_lczfs_inst_elf() {
    local f lib
    local -A libs=()
    inst_multiple "$@" || return 1
    for f in "$@"; do
        while IFS= read -r lib; do
            [[ -n $lib ]] && libs[$lib]=1
        done < <(ldd "${dracutsysrootdir-}$f" 2> /dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p')
    done
    for lib in "${!libs[@]}"; do
        [[ -e ${initdir}$lib ]] || inst_binary "$lib"
    done
    return 0
}

# called by dracut
install() {
    local python pkg unit config keyfile elf
    local -a ext=()

    python=$(_lczfs_python)
    inst_binary "$python" /usr/bin/python3

    # The Python runtime, trimmed to what the daemon really imports (issue 5):
    # python-closure.py rehearses the daemon's start-up paths now, at build
    # time, and installs exactly the standard-library and third-party modules
    # that were loaded, as bytecode (no sources, nothing compiled at boot),
    # plus the daemon package with pyzfs's C declarations parsed ahead
    # (_pyzfs_ffi.py): no pycparser, no cffi Python package, no lxml, only
    # pystemd's bus module.  No hand-kept module list.  It also writes the
    # launcher, /usr/bin/lczfs-unlockd: python3 -IS (-I: nothing in the
    # environment changes what runs; -S: no site module, whose start-up cost
    # bought nothing here) with the module path spelled out.
    pkg=$(_lczfs_package_dir)
    elf="${DRACUT_TMPDIR:-${TMPDIR:-/tmp}}/lczfs-unlockd-python-elf"
    "${dracutsysrootdir-}$python" -I "$moddir/python-closure.py" \
        --package-dir "${dracutsysrootdir-}$pkg" --initdir "$initdir" \
        --sysroot "${dracutsysrootdir-}" --elf-list "$elf" \
        --launcher /usr/bin/lczfs-unlockd || {
        derror "lczfs-unlockd: cannot compute the Python modules lczfs-unlockd needs"
        return 1
    }
    mapfile -t ext < "$elf"
    ((${#ext[@]})) && _lczfs_inst_elf "${ext[@]}"

    # The libraries the daemon opens by soname with ctypes/cffi: dracut
    # cannot see dlopen() dependencies.
    inst_libdir_file "libzfs_core.so.*" "libnvpair.so.*" "libcryptsetup.so.*" "libuuid.so.*"
    # LUKS2 token plugins (TPM2, FIDO2, PKCS#11) are dlopen()ed by libcryptsetup.
    inst_libdir_file "cryptsetup/libcryptsetup-token-*.so"

    unit=$(_lczfs_unit)
    inst_simple "$unit" "${systemdsystemunitdir:-/usr/lib/systemd/system}/lczfs-unlockd.service"
    # WantedBy=initrd.target, without depending on the unit's [Install]
    # section or on the host's enablement.
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target lczfs-unlockd.service

    config=$(_lczfs_config)
    if [[ -f ${dracutsysrootdir-}$config ]]; then
        inst_simple "$config" /etc/lczfs-unlockd.toml
        # A LUKS key file for the keystore, if the config names one.
        keyfile=$("${dracutsysrootdir-}$python" -I -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f).get("keystore", {}).get("keyfile", ""))
' "${dracutsysrootdir-}$config" 2> /dev/null) || keyfile=
        if [[ -n $keyfile ]]; then
            if [[ -f ${dracutsysrootdir-}$keyfile ]]; then
                inst_simple "$keyfile"
                chmod 0400 "${initdir}$keyfile"
            else
                dwarn "lczfs-unlockd: keystore key file $keyfile not found; not installed"
            fi
        fi
    else
        dwarn "lczfs-unlockd: $config not found; the service will fail until it exists"
    fi
}
