# NixOS's zfs-import-rpool script (importLib + createImportService of
# nixos/modules/tasks/filesystems/zfs.nix) for boot.zfs.devNodes =
# /dev/disk/by-id, in POSIX sh: NixOS runs it with bash, a dracut initrd has
# only dash.  Same commands, same 1-second polling.
poolReady() {
    pool="$1"
    state="$(zpool import -d /dev/disk/by-id 2> /dev/null | awk "/pool: $pool/ { found = 1 }; /state:/ { if (found == 1) { print \$2; exit } }; END { if (found == 0) { print \"MISSING\" } }")"
    if [ "$state" = "ONLINE" ]; then
        return 0
    else
        echo "Pool $pool in state $state, waiting"
        return 1
    fi
}
poolImported() {
    pool="$1"
    zpool list "$pool" > /dev/null 2> /dev/null
}
poolImport() {
    pool="$1"
    zpool import -d /dev/disk/by-id -N $ZFS_FORCE "$pool"
}
ZFS_FORCE=
# bench: --import-only stops after the import (the late-disk comparison).
IMPORT_ONLY=${1:-}

if ! poolImported "rpool"; then
    printf '%s' "importing ZFS pool \"rpool\"..."
    # Loop across the import until it succeeds, because the devices needed may not be discovered yet.
    trial=1
    while [ $trial -le 60 ]; do
        # bench: the two echo lines mark when the import starts and ends.
        poolReady "rpool" && echo "lczfs-bench: importing rpool" && poolImport "rpool" &&
            echo "lczfs-bench: rpool imported" && break
        sleep 1
        trial=$((trial + 1))
    done
    poolImported "rpool" || poolImport "rpool" # Try one last time, e.g. to import a degraded pool.
fi
[ "$IMPORT_ONLY" = --import-only ] && exit 0
if poolImported "rpool"; then
    tab=$(printf '\t')
    zfs list -rHo name,keylocation,keystatus -t volume,filesystem rpool | while IFS="$tab" read -r ds kl ks; do
        {
            if [ "$ks" != unavailable ]; then
                continue
            fi
            case "$kl" in
                none) ;;
                prompt) ;; # not used by the seed (its keys are files)
                *)
                    zfs load-key "$ds"
                    ;;
            esac
        } < /dev/null # To protect while read ds kl in case anything reads stdin
    done
    echo "Successfully imported rpool"
else
    exit 1
fi
