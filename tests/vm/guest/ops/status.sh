# Operations boot: `lczfs-unlockd status` on seed0 (its keystore: passphrase
# slot 0, key-file slot 1, a TPM2 token sealed to 7+15:sha256=0), with the
# config at /etc/lczfs-unlockd.toml and, at /boot/initrd.img, a base initrd
# built with that config (what dracut gives a user).  Between the status
# runs: a recovery key enrolled; the passphrase and key-file slots removed;
# the last human slot's removal refused; PCR 7 extended; then the recovery
# slot killed behind the commands' back (cryptsetup), leaving token-bound
# slots only.
wait_for "$ID/virtio-seed0"
wait_for /dev/tpmrm0
import_pool
dev=$(keystore_device)
wait_for "$dev"
st() {  # st NAME: status as JSON
    step "$1" lczfs-unlockd status --json --no-journal --initrd /boot/initrd.img
}
record_header header-0 "$dev"
st status-golden
step -s enroll-recovery lczfs-unlockd enroll recovery --passphrase-file "$P/passphrase"
recovery_key_from enroll-recovery /run/lczfs-ops/recovery.key
record_secret recovery.key /run/lczfs-ops/recovery.key
step recovery-opens cryptsetup open --test-passphrase --key-file /run/lczfs-ops/recovery.key "$dev"
st status-recovery
# Two passphrase-like slots (0, 1): unenroll passphrase must ask which.  Each
# --yes proves with --passphrase-file that a slot which stays opens.
step unenroll-ambiguous lczfs-unlockd unenroll passphrase --yes --passphrase-file "$P/passphrase"
step unenroll-keyfile lczfs-unlockd unenroll passphrase --slot 1 --yes \
    --passphrase-file "$P/passphrase"
step unenroll-passphrase lczfs-unlockd unenroll passphrase --yes \
    --passphrase-file /run/lczfs-ops/recovery.key
record_header header-humans-gone "$dev"
# The recovery key is the last slot a person can open now.
step unenroll-recovery lczfs-unlockd unenroll recovery --yes \
    --passphrase-file /run/lczfs-ops/recovery.key
record_header header-refused "$dev"
st status-tpm-and-recovery
step pcrextend tpm2_pcrextend "7:sha256=$(printf 'lczfs test: PCR 7 changed' | sha256sum | cut -d' ' -f1)"
st status-pcr7-changed
# Behind the commands' back: the recovery slot and its token removed with cryptsetup.
read -r token slot < <(token_slots "$dev" systemd-recovery)
record recovery-token "$token"
record recovery-slot "$slot"
cryptsetup -q luksKillSlot "$dev" "$slot"
cryptsetup token remove --token-id "$token" "$dev" 2> /dev/null || :
record_header header-token-only "$dev"
st status-token-only
