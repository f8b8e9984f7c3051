#!/bin/bash
# Build the Debian trixie guest tree the VM tests boot from.
#
#   rootfs.sh TARGET_DIR [MIRROR]
#
# The harness runs this in a private mount namespace (unshare -m), hashes this
# file to name the cache entry, and renames TARGET_DIR into place only when
# the script succeeds: change anything here and the next run rebuilds.
set -euo pipefail

target=$1
mirror=${2:-http://deb.debian.org/debian}
suite=trixie

# Everything stage 1 needs for the tests, plus the provisioning tools
# (sfdisk, mkfs.ext4, cryptsetup, systemd-cryptenroll, tpm2).  zfs-dkms builds
# zfs.ko for the tree's kernel while it is installed (the slow part, ~6 min).
packages=(
    linux-image-amd64 linux-headers-amd64
    zfs-dkms zfsutils-linux zfs-dracut
    dracut dracut-core systemd systemd-sysv systemd-cryptsetup udev kmod util-linux
    cryptsetup cryptsetup-bin dmsetup fdisk e2fsprogs zstd
    tpm2-tools libtss2-tcti-device0t64
    python3 python3-cffi python3-pyzfs python3-pystemd python3-sdnotify
)

log() { printf '[rootfs %(%T)T] %s\n' -1 "$*" >&2; }

log "debootstrap $suite (minbase, main+contrib) into $target"
debootstrap --variant=minbase --components=main,contrib "$suite" "$target" "$mirror" >&2

mount -t proc proc "$target/proc"
mount -t sysfs sysfs "$target/sys"
mount --rbind /dev "$target/dev"
mount -t tmpfs tmpfs "$target/tmp"

# No daemons may start in the chroot.
printf '#!/bin/sh\nexit 101\n' > "$target/usr/sbin/policy-rc.d"
chmod 0755 "$target/usr/sbin/policy-rc.d"
# Keep the initrd's kernel modules only (dracut --no-hostonly still wants them).
printf 'deb %s %s main contrib\n' "$mirror" "$suite" > "$target/etc/apt/sources.list"

export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
log "apt-get install ${packages[*]}"
chroot "$target" apt-get update -q >&2
chroot "$target" apt-get install -y -q --no-install-recommends "${packages[@]}" >&2

kver=$(basename "$(ls -d "$target"/lib/modules/*/ | head -n1)")
if ! find "$target/lib/modules/$kver" -name 'zfs.ko*' | grep -q .; then
    log "zfs.ko was not built for $kver: running dkms autoinstall"
    chroot "$target" dkms autoinstall -k "$kver" >&2
fi
find "$target/lib/modules/$kver" -name 'zfs.ko*' | grep -q . || { log "no zfs.ko for $kver"; exit 1; }

# One fixed host id: pools made by the provisioning boot import without -f
# in every test boot (all initrds built from this tree share /etc/hostid).
chroot "$target" zgenhostid -f 0x6c637a66

chroot "$target" apt-get clean
rm -f "$target/usr/sbin/policy-rc.d"
rm -rf "$target"/var/lib/apt/lists/* "$target"/var/cache/apt/*.bin
log "done: kernel $kver"
