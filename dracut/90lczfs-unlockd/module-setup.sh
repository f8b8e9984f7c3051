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
#   lczfs_unlockd_sysroot_dropin=/path/to/sysroot.mount.d-lczfs-unlockd.conf
#       the sysroot.mount drop-in (default: the installed one, else the one
#       next to the unit)
#
# Besides the config, the files it names are copied in: the keystore's key
# file (keystore.keyfile) and the TPM2 policy files (keystore.tpm2_signature,
# keystore.tpm2_pcrlock), at the same paths.
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

_lczfs_sysroot_dropin() {
    local unit candidate
    if [[ -n ${lczfs_unlockd_sysroot_dropin-} ]]; then
        printf '%s\n' "$lczfs_unlockd_sysroot_dropin"
        return 0
    fi
    unit=$(_lczfs_unit) || unit=
    for candidate in \
        "/etc/systemd/system/sysroot.mount.d/lczfs-unlockd.conf" \
        "${systemdsystemunitdir:-/usr/lib/systemd/system}/sysroot.mount.d/lczfs-unlockd.conf" \
        "/usr/lib/systemd/system/sysroot.mount.d/lczfs-unlockd.conf" \
        "/usr/local/lib/systemd/system/sysroot.mount.d/lczfs-unlockd.conf" \
        ${unit:+"${unit%/*}/sysroot.mount.d-lczfs-unlockd.conf"}; do
        if [[ -f ${dracutsysrootdir-}$candidate ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# The files the config names, one "KEY<TAB>VALUE" line each (keyfile,
# tpm2_signature, tpm2_pcrlock; token: yes when the keystore may be opened
# with a token), from python-closure.py's TOML reader.  No config: token yes.
_lczfs_config_files() {
    local config
    config=$(_lczfs_config)
    if [[ ! -f ${dracutsysrootdir-}$config ]]; then
        printf 'token\tyes\n'
        return 0
    fi
    "${dracutsysrootdir-}$(_lczfs_python)" -I "$moddir/python-closure.py" \
        --config-files "${dracutsysrootdir-}$config"
}

# Copy one file the config names into the initrd at the same path.
_lczfs_inst_config_file() {
    local what=$1 path=$2 mode=$3
    if [[ -f ${dracutsysrootdir-}$path ]]; then
        inst_simple "$path"
        chmod "$mode" "${initdir}$path"
    else
        dwarn "lczfs-unlockd: $what $path not found; not installed"
    fi
}

# Install the files the config names: the keystore's key file, the TPM2
# policy files for systemd's token plugin (a signed PCR policy, a pcrlock
# policy).  Sets _lczfs_token (yes: the keystore may be opened with a token).
_lczfs_install_config_files() {
    local key value
    _lczfs_token=
    while IFS=$'\t' read -r key value; do
        case $key in
            keyfile) _lczfs_inst_config_file "keystore key file" "$value" 0400 ;;
            tpm2_signature) _lczfs_inst_config_file "TPM2 PCR signature" "$value" 0644 ;;
            tpm2_pcrlock) _lczfs_inst_config_file "TPM2 pcrlock policy" "$value" 0644 ;;
            token) _lczfs_token=$value ;;
        esac
    done < <(_lczfs_config_files || {
        dwarn "lczfs-unlockd: cannot read $(_lczfs_config); its key file and TPM2 policy files are not installed"
        printf 'token\tyes\n'
    })
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
    if ! _lczfs_sysroot_dropin > /dev/null; then
        derror "lczfs-unlockd: sysroot.mount.d-lczfs-unlockd.conf not found (set lczfs_unlockd_sysroot_dropin)"
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
    local python pkg unit config elf
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

    # The distribution's sysroot.mount mounts only a root the daemon vouched
    # for (the drop-in asserts its flag files): after a refused root it must
    # fail instead of mounting an impostor.
    inst_simple "$(_lczfs_sysroot_dropin)" \
        "${systemdsystemunitdir:-/usr/lib/systemd/system}/sysroot.mount.d/lczfs-unlockd.conf"

    config=$(_lczfs_config)
    if [[ -f ${dracutsysrootdir-}$config ]]; then
        inst_simple "$config" /etc/lczfs-unlockd.toml
    else
        dwarn "lczfs-unlockd: $config not found; the service will fail until it exists"
    fi
    _lczfs_install_config_files

    # The daemon measures the keystore's volume key into a PCR (as
    # systemd-cryptsetup's tpm2-measure-pcr=yes) through tpm2-tss, opened
    # with ctypes by soname; the device TCTI is dlopen()ed by tctildr.
    # tpm2-tss's own module brings most of these, not always all.
    if [[ $_lczfs_token == yes ]] || dracut_module_included "tpm2-tss"; then
        inst_libdir_file "libtss2-esys.so.*" "libtss2-tctildr.so.*" "libtss2-tcti-device.so.*" \
            "libtss2-mu.so.*" "libtss2-rc.so.*"
    fi
}
