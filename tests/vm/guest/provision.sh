#!/bin/bash
# Test only, runs in the provisioning initrd: create the golden pools.
#
# Disks (virtio serials): seed0, keys0, mirror0, mirror1, dup0, lczfsreport.
# Secrets come from /etc/lczfs-provision (the harness generated them).
# Every pool is named rpool, made, filled and exported in turn; they all get
# the one /etc/hostid of the guest tree, so test boots import them without -f.
#
# Besides "guid DISK GUID", the report carries "record NAME VALUE" (facts for
# the tests: a LUKS UUID, PCR values), "secret NAME HEX" (a secret made here,
# the seed0 keystore's volume key: never printed, only written to the report)
# and "file NAME BASE64" (PCR signatures) lines; see vm._save_records.
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
    set +ex
    if [[ -n $REPORT ]]; then
        {
            if ((rc == 0)); then echo "LCZFSPROVISION OK"; else echo "LCZFSPROVISION FAILED rc=$rc"; fi
            cat /tmp/guids 2>/dev/null
            cat /tmp/records 2>/dev/null
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

record() {  # record NAME VALUE: a fact for the tests (no secret)
    printf 'record %s %s\n' "$1" "$2" >> /tmp/records
}

record_file() {  # record_file NAME PATH
    { printf 'file %s ' "$1"; base64 -w0 "$2"; echo; } >> /tmp/records
}

# The TPM as the golden state leaves it: the PCR banks swtpm allocated and
# the values this (non-UKI, SeaBIOS) boot has; test boots start from the same.
wait_for /dev/tpmrm0
TPM=/sys/class/tpm/tpm0
record tpm-banks "$(cd "$TPM" && ls -d pcr-* | tr '\n' ' ')"
for bank in sha1 sha256; do
    [[ -d $TPM/pcr-$bank ]] || continue
    for pcr in 7 11 15; do record "pcr$pcr-$bank" "$(cat "$TPM/pcr-$bank/$pcr")"; done
done

# Signed PCR policies for PCR 11 (systemd-measure, with the harness's key
# pair): A for the value PCR 11 has now (--current; --phase=: extends no
# boot phase word: these boots are no UKI, nothing measures into PCR 11), B
# for another value (a UKI with another kernel, in its first phase): what
# the initrd would carry if a new kernel had been signed but this one booted.
MEASURE=(/usr/lib/systemd/systemd-measure sign --bank=sha256 --json=short
    --private-key="$S/tpm2-pcr-private-key.pem" --public-key="$S/tpm2-pcr-public-key.pem")
"${MEASURE[@]}" --current --phase=: > /tmp/tpm2-pcr-signature-a.json
printf 'a kernel this machine does not run\n' > /tmp/other-linux
"${MEASURE[@]}" --linux=/tmp/other-linux --phase=enter-initrd > /tmp/tpm2-pcr-signature-b.json
cat /tmp/tpm2-pcr-signature-a.json /tmp/tpm2-pcr-signature-b.json
if cmp -s /tmp/tpm2-pcr-signature-a.json /tmp/tpm2-pcr-signature-b.json; then
    echo "signatures A and B are the same"
    exit 1
fi
record_file tpm2-pcr-signature-a.json /tmp/tpm2-pcr-signature-a.json
record_file tpm2-pcr-signature-b.json /tmp/tpm2-pcr-signature-b.json

make_pool() {
    zpool create -f -o ashift=12 -o cachefile=none \
        -O mountpoint=none -O canmount=off -O compression=lz4 -O atime=off rpool "$@"
}

export_pool() {  # export_pool DISK: record the pool's GUID for the harness, export
    echo "guid $1 $(zpool get -H -p -o value guid rpool)" >> /tmp/guids
    zpool export rpool
}

# The seed's keystore: zvol, GPT partition 1, LUKS2 (passphrase, key file,
# optionally a TPM2 token), ext4 with the ZFS wrapping keys.  Leaves it
# mounted at /bootsecrets; close_keystore undoes that.  TPM2 tokens:
#   tpm      sealed to PCR 7 as it is now and PCR 15 all zero: what
#            systemd-cryptsetup's tpm2-measure-pcr=yes (and lczfs-unlockd)
#            extend after the unlock, so a second unseal in the same boot fails
#   tpm-pin  no PCRs, a PIN
#   signed   a signed PCR policy for PCR 11 (the harness's public key),
#            checked at enrollment with signature A
#   pcrlock  the pcrlock policy in /run/systemd/pcrlock.json (make_pcrlock)
open_new_keystore() {  # open_new_keystore VOLUME [TOKEN [zfs create options]]
    local vol=$1 tpm=${2:-}
    shift 2 || shift $#
    zfs create -p -o mountpoint=none rpool/volumes
    zfs create "$@" -V 64M "$vol"
    wait_for "/dev/zvol/$vol"
    printf 'label: gpt\ntype=L, name=bootsecrets\n' | sfdisk -q "/dev/zvol/$vol"
    wait_for "/dev/zvol/$vol-part1"
    local dev=/dev/zvol/$vol-part1
    cryptsetup luksFormat -q --type luks2 "${PBKDF[@]}" --label bootsecrets \
        --key-file "$S/passphrase" "$dev"
    cryptsetup luksAddKey -q "${PBKDF[@]}" --key-file "$S/passphrase" "$dev" "$S/keystore.key"
    if [[ $tpm == tpm ]]; then
        systemd-cryptenroll --unlock-key-file="$S/passphrase" --tpm2-device=auto \
            --tpm2-pcrs=7+15:sha256=0000000000000000000000000000000000000000000000000000000000000000 \
            "$dev"
    elif [[ $tpm == tpm-pin ]]; then
        NEWPIN=$(< "$S/tpm2.pin") systemd-cryptenroll --unlock-key-file="$S/passphrase" \
            --tpm2-device=auto --tpm2-pcrs= --tpm2-with-pin=yes "$dev"
    elif [[ $tpm == signed ]]; then
        systemd-cryptenroll --unlock-key-file="$S/passphrase" --tpm2-device=auto \
            --tpm2-public-key="$S/tpm2-pcr-public-key.pem" --tpm2-public-key-pcrs=11 \
            --tpm2-signature=/tmp/tpm2-pcr-signature-a.json --tpm2-pcrs= "$dev"
    elif [[ $tpm == pcrlock ]]; then
        systemd-cryptenroll --unlock-key-file="$S/passphrase" --tpm2-device=auto \
            --tpm2-pcrlock=/run/systemd/pcrlock.json --tpm2-pcrs= "$dev"
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

# The volume key and LUKS UUID of a keystore, for the tests' own computation
# of the PCR measurement (HMAC(volume key, "cryptsetup:NAME:UUID")).  The key
# goes from cryptsetup to a file and from the file to the report as hex; set
# -x only ever shows these commands, never the key.
record_volume_key() {  # record_volume_key NAME DEVICE
    record "$1-uuid" "$(cryptsetup luksUUID "$2")"
    cryptsetup luksDump --dump-volume-key --volume-key-file "/tmp/$1.vk" --batch-mode \
        --key-file "$S/passphrase" "$2" > /dev/null
    [[ -s /tmp/$1.vk ]]
    { printf 'secret %s.vk ' "$1"; od -An -v -tx1 "/tmp/$1.vk" | tr -d ' \n'; echo; } >> /tmp/records
    rm "/tmp/$1.vk"
}

# --- seed0: the seed's layout, TPM2 token enrolled ---------------------------
make_pool "$ID/virtio-seed0"
open_new_keystore rpool/volumes/bootsecrets tpm
seed_datasets
close_keystore
record_volume_key seed0-keystore /dev/zvol/rpool/volumes/bootsecrets-part1
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
zfs create -s -V 64M rpool/volumes/badluks
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
# A keystore whose token is sealed to a signed PCR 11 policy (and the
# passphrase): opens with signature A, not with B.  Sparse (-s), like badluks
# and slowkdf: keys0's 512 MiB (less ZFS's 128 MiB slop) hold no seventh
# 64 MiB reservation.
open_new_keystore rpool/volumes/signedks signed -s
put_key rpoolcrypt.key rpoolcrypt.key
close_keystore
# A keystore whose token is sealed to a pcrlock policy (and the passphrase):
# systemd-pcrlock predicts PCRs 0 and 2 from the firmware's event log
# (lock-firmware-code) and 7 (SeaBIOS measures only a separator there), and
# keeps the policy in a TPM NV index; /run/systemd/pcrlock.json (written in
# an initrd) goes to the tests, which put it where the config names it.
PCRLOCK=/usr/lib/systemd/systemd-pcrlock
"$PCRLOCK" lock-firmware-code
"$PCRLOCK" make-policy --pcr=0 --pcr=2 --pcr=7
record_file pcrlock.json /run/systemd/pcrlock.json
open_new_keystore rpool/volumes/pcrlockks pcrlock -s
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
zfs create -s -V 64M rpool/volumes/slowkdf
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
