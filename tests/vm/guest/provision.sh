#!/bin/bash
# Test only, runs in the provisioning initrd: create the golden pools.
#
# Disks (virtio serials): seed0, keys0, mirror0, mirror1, dup0, lczfsreport.
# Secrets come from /etc/lczfs-provision (the harness generated them).
# Every pool is named rpool, made, filled and exported in turn; they all get
# the one /etc/hostid of the guest tree, so test boots import them without -f.
set -euo pipefail
exec > /dev/console 2>&1
set -x

S=/etc/lczfs-provision
ID=/dev/disk/by-id
REPORT=
# argon2id like a real keystore, at fixed minimal cost: each key slot tried
# costs seconds under TCG otherwise.
PBKDF=(--pbkdf argon2id --pbkdf-memory 32768 --pbkdf-parallel 1 --pbkdf-force-iterations 4)

finish() {
    local rc=$?
    set +e
    if [[ -n $REPORT ]]; then
        {
            if ((rc == 0)); then echo "LCZFSPROVISION OK"; else echo "LCZFSPROVISION FAILED rc=$rc"; fi
            cat /tmp/guids 2>/dev/null
            zpool list 2>&1
            dmsetup ls 2>&1
        } > /tmp/status
        dd if=/tmp/status of="$REPORT" conv=fsync status=none
    fi
    sync
    systemctl poweroff --force --force
}
trap finish EXIT

wait_for() {
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -e $1 ]] && return 0
        udevadm settle -t 5 || :
        sleep 0.1
    done
    echo "timed out waiting for $1"
    return 1
}

modprobe zfs
for d in seed0 keys0 mirror0 mirror1 dup0 lczfsreport; do wait_for "$ID/virtio-$d"; done
REPORT=$(readlink -f "$ID/virtio-lczfsreport")

make_pool() {
    zpool create -f -o ashift=12 -o cachefile=none \
        -O mountpoint=none -O canmount=off -O compression=lz4 -O atime=off rpool "$@"
}

export_pool() {  # export_pool DISK: record the pool's GUID for the harness, export
    echo "guid $1 $(zpool get -H -p -o value guid rpool)" >> /tmp/guids
    zpool export rpool
}

# The seed's keystore: zvol, GPT partition 1, LUKS2 (passphrase, key file,
# optionally TPM2), ext4 with the ZFS wrapping keys.  Leaves it mounted at
# /bootsecrets; close_keystore undoes that.
open_new_keystore() {
    local vol=$1 tpm=${2:-}
    zfs create -p -o mountpoint=none rpool/volumes
    zfs create -V 64M "$vol"
    wait_for "/dev/zvol/$vol"
    printf 'label: gpt\ntype=L, name=bootsecrets\n' | sfdisk -q "/dev/zvol/$vol"
    wait_for "/dev/zvol/$vol-part1"
    local dev=/dev/zvol/$vol-part1
    cryptsetup luksFormat -q --type luks2 "${PBKDF[@]}" --label bootsecrets \
        --key-file "$S/passphrase" "$dev"
    cryptsetup luksAddKey -q "${PBKDF[@]}" --key-file "$S/passphrase" "$dev" "$S/keystore.key"
    if [[ $tpm == tpm ]]; then
        wait_for /dev/tpmrm0
        systemd-cryptenroll --unlock-key-file="$S/passphrase" --tpm2-device=auto --tpm2-pcrs= "$dev"
    elif [[ $tpm == tpm-pin ]]; then
        wait_for /dev/tpmrm0
        NEWPIN=$(< "$S/tpm2.pin") systemd-cryptenroll --unlock-key-file="$S/passphrase" \
            --tpm2-device=auto --tpm2-pcrs= --tpm2-with-pin=yes "$dev"
    fi
    cryptsetup luksDump "$dev"
    cryptsetup open --key-file "$S/passphrase" "$dev" secretsroot
    mkfs.ext4 -q -L bootsecrets /dev/mapper/secretsroot
    mkdir -p /bootsecrets
    mount /dev/mapper/secretsroot /bootsecrets
    chmod 0700 /bootsecrets
}

close_keystore() {
    umount /bootsecrets
    cryptsetup close secretsroot
}

put_key() {  # put_key NAME SOURCE
    install -m 0400 "$S/$2" "/bootsecrets/$1"
}

seed_datasets() {
    put_key rpoolcrypt.key rpoolcrypt.key
    zfs create -o encryption=on -o keyformat=hex \
        -o keylocation=file:///bootsecrets/rpoolcrypt.key rpool/crypt
    zfs create rpool/crypt/local
    zfs create -u -o mountpoint=/ -o canmount=noauto rpool/crypt/local/root
    zfs create rpool/crypt/local/nix
    zfs create rpool/crypt/safe
    zfs create rpool/crypt/safe/persist
}

enc() {  # enc DATASET KEYFORMAT KEYFILE [zfs create options]
    local ds=$1 fmt=$2 key=$3
    shift 3
    zfs create -p -o mountpoint=none rpool/"${ds%/*}"
    zfs create -o encryption=on -o keyformat="$fmt" \
        -o keylocation="file:///bootsecrets/$key" "$@" "rpool/$ds"
}

# --- seed0: the seed's layout, TPM2 token enrolled ---------------------------
make_pool "$ID/virtio-seed0"
open_new_keystore rpool/volumes/bootsecrets tpm
seed_datasets
close_keystore
zfs list -o name,encryption,keyformat,keylocation,keystatus
export_pool seed0

# --- keys0: the seed plus one dataset per key format and broken key files ----
make_pool "$ID/virtio-keys0"
open_new_keystore rpool/volumes/bootsecrets
seed_datasets
put_key raw.key raw.key
put_key hex.key hex.key
put_key pass.key pass.key
enc fmt/raw raw raw.key
enc fmt/hex hex hex.key
enc fmt/pass passphrase pass.key -o pbkdf2iters=100000
# Broken key files: each dataset was made with a good key, then its file is
# removed, truncated, replaced by garbage or by another valid key.
for bad in missing trunc garbage wrong; do
    put_key "$bad.key" hex.key
    enc "bad/$bad" hex "$bad.key"
done
rm /bootsecrets/missing.key
install -m 0400 /dev/null /bootsecrets/trunc.key.new
head -c 40 "$S/hex.key" > /bootsecrets/trunc.key.new
mv /bootsecrets/trunc.key.new /bootsecrets/trunc.key
install -m 0400 "$S/garbage.key" /bootsecrets/garbage.key
install -m 0400 "$S/wrong.key" /bootsecrets/wrong.key
ls -la /bootsecrets
close_keystore
# A second keystore whose LUKS header is then destroyed (both binary header
# copies and their JSON areas).
zfs create -V 64M rpool/volumes/badluks
wait_for /dev/zvol/rpool/volumes/badluks
printf 'label: gpt\ntype=L\n' | sfdisk -q /dev/zvol/rpool/volumes/badluks
wait_for /dev/zvol/rpool/volumes/badluks-part1
cryptsetup luksFormat -q --type luks2 "${PBKDF[@]}" --key-file "$S/passphrase" \
    /dev/zvol/rpool/volumes/badluks-part1
dd if=/dev/urandom of=/dev/zvol/rpool/volumes/badluks-part1 bs=512 seek=1 count=31 conv=fsync,notrunc
dd if=/dev/urandom of=/dev/zvol/rpool/volumes/badluks-part1 bs=512 seek=33 count=31 conv=fsync,notrunc
if cryptsetup isLuks /dev/zvol/rpool/volumes/badluks-part1; then
    echo "badluks still looks like LUKS"
    exit 1
fi
# A keystore whose only token is TPM2 with a PIN (the PIN path of tokens).
open_new_keystore rpool/volumes/pinks tpm-pin
put_key rpoolcrypt.key rpoolcrypt.key
close_keystore
# A keystore whose ext4 says its journal needs recovery, as after a crash
# while it was mounted read-write: a read-only mapping cannot replay it.
open_new_keystore rpool/volumes/dirtyks
put_key rpoolcrypt.key rpoolcrypt.key
umount /bootsecrets
debugfs -w -R "feature needs_recovery" /dev/mapper/secretsroot
dumpe2fs -h /dev/mapper/secretsroot | grep -q 'features:.*needs_recovery'
cryptsetup close secretsroot
# A LUKS1 keystore whose key-file slot claims 2^32-1 PBKDF2 iterations, as
# whoever holds the disk can write (LUKS1 headers have no checksum): one
# activation is a C call of hours.  systemd's timeouts must still end it.
zfs create -V 64M rpool/volumes/slowkdf
wait_for /dev/zvol/rpool/volumes/slowkdf
printf 'label: gpt\ntype=L\n' | sfdisk -q /dev/zvol/rpool/volumes/slowkdf
wait_for /dev/zvol/rpool/volumes/slowkdf-part1
cryptsetup luksFormat -q --type luks1 --pbkdf-force-iterations 1000 \
    --key-file "$S/keystore.key" /dev/zvol/rpool/volumes/slowkdf-part1
# Key slot 0 starts at byte 208; its iteration count is the big-endian u32 at +4.
printf '\377\377\377\377' | dd of=/dev/zvol/rpool/volumes/slowkdf-part1 bs=1 seek=212 conv=notrunc,fsync status=none
cryptsetup luksDump /dev/zvol/rpool/volumes/slowkdf-part1 | grep -q 'Iterations:.*4294967295'
zfs list -o name,encryption,keyformat,keylocation,keystatus
export_pool keys0

# --- mirror0 + mirror1: the seed's layout on a two-disk mirror ---------------
make_pool mirror "$ID/virtio-mirror0" "$ID/virtio-mirror1"
open_new_keystore rpool/volumes/bootsecrets
seed_datasets
close_keystore
zpool status rpool
export_pool mirror0

# --- dup0: another pool named rpool (a reused disk, a USB stick) -------------
make_pool "$ID/virtio-dup0"
zfs create -o mountpoint=none rpool/other
export_pool dup0
