#!/bin/bash
# Test only, runs in the operations initrd (build.ops_initrd): what every
# operations boot's script shares.  ops.sh sources this, then the scenario's
# script (/usr/lib/lczfs-test/scenario.sh).
#
# The script runs the operations commands as a person would in the running
# system and records what they did, one line each on the lczfsreport disk
# (vm.OpsResult reads them):
#   record NAME VALUE   a fact (an exit status, a key status)
#   file NAME BASE64    a file (a command's stdout/stderr, the config setup wrote)
#   secret NAME HEX     a secret made in the guest (a key file setup wrote): the
#                       harness greps every later boot of the session for it
# `step NAME CMD...` runs one command, bounded, and records NAME.rc, NAME.out
# and NAME.err.  Secrets: /etc/lczfs-provision (the golden disks'),
# /etc/lczfs-session (this session's, made by the harness).
set -euo pipefail
shopt -s inherit_errexit  # $(...) fails like the rest
exec > /dev/console 2>&1

P=/etc/lczfs-provision
S=/etc/lczfs-session
ID=/dev/disk/by-id
OUT=/run/lczfs-ops
REPORT=
# argon2id at a fixed minimal cost (as provision.sh): seconds per slot under TCG otherwise.
PBKDF=(--pbkdf argon2id --pbkdf-memory 32768 --pbkdf-parallel 1 --pbkdf-force-iterations 4)
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
mkdir -p "$OUT"
: > "$OUT/records"

record() {  # record NAME VALUE
    printf 'record %s %s\n' "$1" "$2" >> "$OUT/records"
}

record_file() {  # record_file NAME PATH
    { printf 'file %s ' "$1"; base64 -w0 "$2"; echo; } >> "$OUT/records"
}

record_secret() {  # record_secret NAME PATH: never on the console
    { printf 'secret %s ' "$1"; od -An -v -tx1 "$2" | tr -d ' \n'; echo; } >> "$OUT/records"
}

# Closes what the script left open so the next boot of the session finds the
# disks as the commands left them (the pools exported: every write on disk).
_ops_close() {
    local m
    for m in $(grep -o ' /run/lczfs-ops-mnt/[^ ]*' /proc/self/mounts | sort -r); do
        umount "$m" || :
    done
    for m in $(dmsetup ls --target crypt 2> /dev/null | grep -v '^No devices' | cut -f1); do
        cryptsetup close "$m" || :
    done
    # An export can hang for good (a zvol held open): the report is written anyway.
    zpool export -a &
    local pid=$! i
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2> /dev/null || return 0
        sleep 0.1
    done
    echo "lczfs-test: zpool export -a still running after 60 s"
    record export-hung yes
}

_ops_finish() {
    local rc=$?
    set +ex
    echo "lczfs-test: operations script ended with $rc"
    _ops_close
    if [[ -n $REPORT ]]; then
        {
            if ((rc == 0)); then echo "LCZFSOPS OK"; else echo "LCZFSOPS FAILED rc=$rc"; fi
            cat "$OUT/records"
            echo "record zpool-list $(zpool list -H -o name,health 2>&1 | tr '\n\t' '; ')"
            echo "record dmsetup-ls $(dmsetup ls 2>&1 | tr '\n\t' '; ')"
        } > /tmp/lczfs-ops-status
        dd if=/tmp/lczfs-ops-status of="$REPORT" conv=fsync status=none
    fi
    sync
    systemctl poweroff --force --force
}
trap _ops_finish EXIT

wait_for() {  # wait_for PATH: up to ~60 s
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -e $1 ]] && return 0
        udevadm settle -t 5 || :
        sleep 0.1
    done
    echo "timed out waiting for $1"
    return 1
}

# step [-s] [-i FILE] NAME CMD...: run CMD with stdin from /dev/null (or FILE),
# at most STEP_TIMEOUT seconds; record NAME.rc, NAME.out, NAME.err.  Never
# fails itself: the test asserts on what it recorded.  -s: stdout holds a
# secret (a recovery key): not shown on the console.
step() {
    local quiet=0 rc=0 input=/dev/null
    while [[ $1 == -* ]]; do
        case $1 in
            -s) quiet=1 ;;
            -i) input=$2 && shift ;;
        esac
        shift
    done
    local name=$1
    shift
    timeout -k 5 "$STEP_TIMEOUT" "$@" < "$input" > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
    record "$name.rc" "$rc"
    record_file "$name.out" "$OUT/$name.out"
    record_file "$name.err" "$OUT/$name.err"
    { set +x; } 2> /dev/null
    echo "--- $name: exit $rc"
    if ((quiet)); then
        echo "(stdout not shown: it holds a secret)"
    else
        cat "$OUT/$name.out"
    fi
    sed 's/^/stderr: /' "$OUT/$name.err"
    set -x
    return 0
}

# import_pool [POOL]: by id, without mounting.  The disk's by-id link can be
# there before its partitions' (a whole-disk vdev is -part1): settle, retry.
import_pool() {
    local i
    for ((i = 1; ; i++)); do
        udevadm settle -t 30 || :
        zpool import -N -d "$ID" "${1:-rpool}" && return 0
        ((i < 10)) || return 1
        sleep 1
    done
}

# The keystore's files, read-only: open_keystore DEVICE KEYFILE -> prints the mount point.
open_keystore() {
    local dev=$1 key=$2 name
    name=lczfs-ops-$RANDOM
    cryptsetup open --readonly --key-file "$key" "$dev" "$name" >&2 || return 1
    mkdir -p "/run/lczfs-ops-mnt/$name"
    if ! mount -o ro "/dev/mapper/$name" "/run/lczfs-ops-mnt/$name" >&2; then
        cryptsetup close "$name"
        return 1
    fi
    echo "/run/lczfs-ops-mnt/$name"
}

close_keystore() {  # close_keystore MOUNTPOINT
    umount "$1"
    cryptsetup close "${1##*/}"
}

# The keystore's LUKS device as a config names it (keystore.volume, .partition).
keystore_device() {  # keystore_device [CONFIG]
    python3 -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    k = tomllib.load(f)["keystore"]
part = k.get("partition", 1)
print("/dev/zvol/" + k["volume"] + ("-part%d" % part if part else ""))
' "${1:-/etc/lczfs-unlockd.toml}"
}

# The recovery key a command printed (RECOVERY KEY: ...) into a file, without
# a newline (cryptsetup --key-file reads the whole file).
recovery_key_from() {  # recovery_key_from STEP DEST
    local key
    key=$(sed -n 's/^RECOVERY KEY: *//p' "$OUT/$1.out" | tail -n 1)
    [[ -n $key ]] || { echo "no RECOVERY KEY line in $1's output"; return 1; }
    install -m 0400 /dev/null "$2"
    printf '%s' "$key" > "$2"
}

# Each key file in the keystore mounted at MOUNTPOINT as a secret of the
# session (keyfile-<path with / as _>), so later boots are grepped for it.
record_key_files() {  # record_key_files MOUNTPOINT
    local f rel
    while IFS= read -r f; do
        rel=${f#"$1"/}
        record_secret "keyfile-${rel//\//_}" "$f"
    done < <(find "$1" -type f -name '*.key')
}

# The key slots of DEVICE's tokens of TYPE, one per line (from the header's JSON).
token_slots() {  # token_slots DEVICE TYPE
    cryptsetup luksDump --dump-json-metadata "$1" | python3 -c '
import json, sys
for tid, t in json.load(sys.stdin)["tokens"].items():
    if t["type"] == sys.argv[1]:
        print(tid, " ".join(t["keyslots"]))
' "$2"
}

# The header's JSON metadata as file NAME.json.
record_header() {  # record_header NAME DEVICE
    cryptsetup luksDump --dump-json-metadata "$2" > "$OUT/$1.json"
    record_file "$1.json" "$OUT/$1.json"
}

# A passphrase root made from nothing: make_passphrase_root DATASET PASSFILE [zfs create options]
make_passphrase_root() {
    local ds=$1 pass=$2
    shift 2
    zfs create -o encryption=on -o keyformat=passphrase -o keylocation=prompt "$@" "$ds" < "$pass"
}

make_pool() {  # make_pool NAME DISK...
    local name=$1
    shift
    zpool create -f -o ashift=12 -o cachefile=none \
        -O mountpoint=none -O canmount=off -O compression=lz4 -O atime=off "$name" "$@"
}

# Which key loads DATASET now: load-key -n with the old passphrase and with the
# new key file (KEYDIR: where the keystore is mounted, standing in for the
# mount point in keylocation), with the key unloaded first.  Records
# NAME.keylocation, NAME.keyformat and the steps NAME-old, NAME-new.
which_key() {  # which_key NAME DATASET OLDPASSFILE KEYDIR
    local name=$1 ds=$2 old=$3 dir=$4
    record "$name.keylocation" "$(zfs get -H -o value keylocation "$ds")"
    record "$name.keyformat" "$(zfs get -H -o value keyformat "$ds")"
    if [[ $(zfs get -H -o value keystatus "$ds") == available ]]; then
        zfs unload-key "$ds"
    fi
    step -i "$old" "$name-old" zfs load-key -n -L prompt "$ds"
    if [[ -n $dir && -f $dir/$ds.key ]]; then
        step "$name-new" zfs load-key -n -L "file://$dir/$ds.key" "$ds"
    else
        record "$name-new.rc" missing
    fi
}

modprobe zfs
wait_for "$ID/virtio-lczfsreport"
REPORT=$(readlink -f "$ID/virtio-lczfsreport")
set -x
