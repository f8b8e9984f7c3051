#!/bin/sh
# bench only: write what the host needs to the report disk (virtio serial
# "lczfsreport") as "LCZFSBENCH1 <size>\n" + sections "=== name\n...", then
# power off.  POSIX sh with what every dracut initrd has (dash, systemctl,
# journalctl, cat, grep, sleep): no bash, no dd, no Python on the seed side.
export SYSTEMD_PAGER= SYSTEMD_COLORS=0

# Type=notify: READY=1 comes before the process exits; wait for the exit so
# its peak memory and timing file are final.
i=0
while [ $i -lt 300 ]; do
    pid=$(systemctl show -P MainPID lczfs-unlockd.service 2> /dev/null)
    if [ -z "$pid" ] || [ "$pid" = 0 ]; then break; fi
    sleep 0.1
    i=$((i + 1))
done

props=Id,LoadState,ActiveState,SubState,Result,StatusText,InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic,ActiveExitTimestampMonotonic,InactiveEnterTimestampMonotonic,ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,ExecMainStatus,MemoryPeak,MemoryCurrent,CPUUsageNSec,UnitFileState

report=/tmp/lczfs-bench-report
{
    echo "=== uptime"
    cat /proc/uptime
    echo "=== manager"
    systemctl show -p KernelTimestampMonotonic,InitRDTimestampMonotonic,UserspaceTimestampMonotonic,FinishTimestampMonotonic,InitRDGeneratorsStartTimestampMonotonic,InitRDUnitsLoadStartTimestampMonotonic,Version
    for u in lczfs-unlockd.service \
        zfs-import-rpool-volumes.service zfs-import-rpool.service \
        'systemd-cryptsetup@secretsroot.service' bootsecrets.mount \
        mask-bootsecrets.service mask-secretsroot.service \
        'dev-disk-by\x2did-virtio\x2dseed0.device' 'dev-disk-by\x2did-virtio\x2dseed0\x2dpart1.device' \
        'dev-zvol-rpool-volumes-bootsecrets\x2dpart1.device' dev-mapper-secretsroot.device \
        systemd-udev-trigger.service systemd-journald.service; do
        echo "=== unit $u"
        systemctl show -p "$props" "$u"
    done
    echo "=== keystatus"
    zfs list -H -o name,keystatus -t filesystem,volume 2>&1
    echo "=== zpool"
    zpool list -H -o name,health 2>&1
    echo "=== dmsetup"
    dmsetup ls 2>&1
    echo "=== mounts"
    grep -E ' /bootsecrets ' /proc/self/mountinfo
    # Instrumented boots: the daemon's --timings file and the launcher's stamp.
    echo "=== timing"
    cat /run/lczfs-bench/timing.json 2> /dev/null
    echo
    echo "=== launcher"
    cat /run/lczfs-bench/launcher.json 2> /dev/null
    echo
    echo "=== journal"
    journalctl -b -o json --no-pager \
        --output-fields=MESSAGE,_SOURCE_MONOTONIC_TIMESTAMP,SYSLOG_IDENTIFIER,_SYSTEMD_UNIT,UNIT,_TRANSPORT,PRIORITY
    echo "=== end"
} > "$report" 2>&1

disk=
i=0
while [ $i -lt 100 ]; do
    for s in /sys/block/*/serial; do
        if [ "$(cat "$s" 2> /dev/null)" = lczfsreport ]; then
            disk=${s#/sys/block/}
            disk=/dev/${disk%/serial}
        fi
    done
    if [ -n "$disk" ] && [ -b "$disk" ]; then break; fi
    sleep 0.1
    i=$((i + 1))
done
if [ -n "$disk" ]; then
    # dash counts ${#var} in bytes; systemctl's forced poweroff syncs first.
    content=$(cat "$report")
    { printf 'LCZFSBENCH1 %d\n' "${#content}"; printf '%s' "$content"; } > "$disk"
else
    echo "lczfs-bench: no report disk"
fi
systemctl poweroff --force --force
