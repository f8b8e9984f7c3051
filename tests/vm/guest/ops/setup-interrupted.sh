# Operations boot: `lczfs-unlockd setup` interrupted, on two pools made from
# nothing (blank disks new0, new1), each with two passphrase roots.
#
# rpool: setup killed (SIGKILL, its whole process group) as soon as it says
# "changed key of rpool/one:", while its `zfs change-key` of rpool/two is
# held (guest/zfs-wrap, "block"): a power cut between the two key changes.
# tank: `zfs change-key` of tank/two fails (guest/zfs-wrap, "fail"): setup
# must exit 1 and say which root uses which key.
# Afterwards every root must load with exactly one of its old passphrase and
# its new key file (which_key).  Session secrets: one.pass, two.pass,
# keystore.pass.
WRAP=/run/lczfs-ops/bin
mkdir -p "$WRAP"
install -m 0755 /usr/lib/lczfs-test/zfs-wrap "$WRAP/zfs"
wait_for "$ID/virtio-new0"
wait_for "$ID/virtio-new1"
for pool in rpool tank; do
    disk=new0
    [[ $pool == tank ]] && disk=new1
    make_pool "$pool" "$ID/virtio-$disk"
    make_passphrase_root "$pool/one" "$S/one.pass"
    make_passphrase_root "$pool/two" "$S/two.pass"
done

# --- rpool: killed between the two key changes --------------------------------
echo "block rpool/two" > /run/lczfs-ops/zfs-wrap
# setsid: a process group of its own, for the kill.
setsid env PATH="$WRAP:$PATH" lczfs-unlockd setup --yes --pool rpool --roots rpool/one,rpool/two \
    --passphrase-file "$S/keystore.pass" --config /run/lczfs-ops/rpool.toml \
    < /dev/null > "$OUT/killed.out" 2> "$OUT/killed.err" &
pid=$!
for ((i = 0; i < 1200; i++)); do
    grep -q '^changed key of rpool/one:' "$OUT/killed.out" && break
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
done
record killed.line-seen "$(grep -c '^changed key of rpool/one:' "$OUT/killed.out" || :)"
record killed.blocked "$([[ -e /run/lczfs-ops/zfs-blocked ]] && echo yes || echo no)"
# The power cut: setup's process group, and the held zfs change-key, which
# setup runs in a session of its own (a signal must not stop it half-way).
kill -9 -- -"$pid" || :
[[ -s /run/lczfs-ops/zfs-blocked ]] && kill -9 "$(cat /run/lczfs-ops/zfs-blocked)" || :
wait "$pid" || record killed.rc $?
record_file killed.out "$OUT/killed.out"
record_file killed.err "$OUT/killed.err"
cat "$OUT/killed.out" "$OUT/killed.err" | grep -v '^RECOVERY KEY' || :
recovery_key_from killed /run/lczfs-ops/killed-recovery.key && \
    record_secret killed-recovery.key /run/lczfs-ops/killed-recovery.key || :
rm -f /run/lczfs-ops/zfs-wrap
# What the kill left open (the keystore's mapping; a mount in setup's private
# mount namespace goes with its last process): after a real power cut,
# nothing.  Closed here so that the keystore can be opened to test the key
# files (the namespace's mounts may take a moment to go).
grep -E ' /bootsecrets ' /proc/self/mounts && record killed.left-mounted yes || record killed.left-mounted no
umount -R /bootsecrets 2> /dev/null || :
while read -r m _; do
    [[ $m == No ]] && break
    record "killed.left-mapping" "$m"
    for ((i = 0; i < 50; i++)); do
        cryptsetup close "$m" 2> /dev/null && break
        sleep 0.2
    done
done < <(dmsetup ls --target crypt)
dmsetup ls --target crypt
zfs list -r -o name,keyformat,keylocation,keystatus rpool
dev=/dev/zvol/rpool/volumes/bootsecrets-part1
mnt=
if [[ -e $dev ]] && mnt=$(open_keystore "$dev" "$S/keystore.pass"); then
    find "$mnt" -printf '%M %u %s %P\n' | sort -k4
    record_key_files "$mnt"
else
    record killed.keystore missing
    mnt=
fi
which_key killed-one rpool/one "$S/one.pass" "$mnt"
which_key killed-two rpool/two "$S/two.pass" "$mnt"
[[ -n $mnt ]] && close_keystore "$mnt"

# --- tank: zfs change-key fails for the second root ---------------------------
echo "fail tank/two" > /run/lczfs-ops/zfs-wrap
step -s failed env PATH="$WRAP:$PATH" lczfs-unlockd setup --yes --pool tank \
    --roots tank/one,tank/two --passphrase-file "$S/keystore.pass" \
    --config /run/lczfs-ops/tank.toml --name tank-keystore --mountpoint /run/tankks
rm -f /run/lczfs-ops/zfs-wrap
recovery_key_from failed /run/lczfs-ops/failed-recovery.key && \
    record_secret failed-recovery.key /run/lczfs-ops/failed-recovery.key || :
zfs list -r -o name,keyformat,keylocation,keystatus tank
dev=/dev/zvol/tank/volumes/bootsecrets-part1
mnt=
if [[ -e $dev ]] && mnt=$(open_keystore "$dev" "$S/keystore.pass"); then
    find "$mnt" -printf '%M %u %s %P\n' | sort -k4
    record_key_files "$mnt"
else
    record failed.keystore missing
    mnt=
fi
which_key failed-one tank/one "$S/one.pass" "$mnt"
which_key failed-two tank/two "$S/two.pass" "$mnt"
[[ -n $mnt ]] && close_keystore "$mnt"
