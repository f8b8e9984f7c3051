# Operations boot: `lczfs-unlockd setup` on a pool made from nothing (a blank
# disk, new0) whose roots use passphrase prompts.  Session secrets:
# crypt.pass, data.pass (the roots' passphrases), keystore.pass (the new
# keystore's).  Records setup's output and config, the key files it wrote (as
# secrets), and whether the old passphrases and the new key files load.
wait_for "$ID/virtio-new0"
make_pool rpool "$ID/virtio-new0"
make_passphrase_root rpool/crypt "$S/crypt.pass"
zfs create rpool/crypt/local
zfs create -u -o mountpoint=/ -o canmount=noauto rpool/crypt/local/root
make_passphrase_root rpool/data "$S/data.pass"
zfs list -o name,encryption,keyformat,keylocation,keystatus

step -s setup lczfs-unlockd setup --yes --pool rpool --roots rpool/crypt,rpool/data \
    --passphrase-file "$S/keystore.pass"
[[ -f /etc/lczfs-unlockd.toml ]] && record_file config /etc/lczfs-unlockd.toml
zfs list -o name,encryption,keyformat,keylocation,keystatus
grep -E ' /bootsecrets | /run/lczfs' /proc/self/mounts || echo "nothing mounted on the keystore's mount point"
record left-mappings "$(dmsetup ls --target crypt | tr '\n\t' '; ')"

dev=$(keystore_device)
record keystore-device "$dev"
recovery_key_from setup /run/lczfs-ops/recovery.key
record_secret recovery.key /run/lczfs-ops/recovery.key
step recovery-opens cryptsetup open --test-passphrase --key-file /run/lczfs-ops/recovery.key "$dev"
step passphrase-opens cryptsetup open --test-passphrase --key-file "$S/keystore.pass" "$dev"
step -i /dev/null wrong-refused cryptsetup open --test-passphrase --key-file "$S/crypt.pass" "$dev"
step dump cryptsetup luksDump --dump-json-metadata "$dev"

mnt=$(open_keystore "$dev" "$S/keystore.pass")
find "$mnt" -printf '%M %u %s %P\n' | sort -k4
record_key_files "$mnt"
which_key crypt rpool/crypt "$S/crypt.pass" "$mnt"
which_key data rpool/data "$S/data.pass" "$mnt"
close_keystore "$mnt"
