# Operations boot: arm-reboot and disarm on seed0 with the golden swtpm state.
# The seed's permanent TPM2 token is removed first (unenroll tpm2), so that
# only the one-time unlock can open the keystore without a person.  Then:
# arm, disarm (the header must be back to what it was), arm again (left armed
# for the next boot), status.  SeaBIOS has no Secure Boot: arm-reboot refuses
# that unless told (--allow-without-secure-boot).
wait_for "$ID/virtio-seed0"
wait_for /dev/tpmrm0
import_pool
dev=$(keystore_device)
wait_for "$dev"
record_header header-golden "$dev"
step unenroll-tpm2 lczfs-unlockd unenroll tpm2 --yes --passphrase-file "$P/passphrase"
record_header header-unarmed "$dev"
step arm-1 lczfs-unlockd arm-reboot --passphrase-file "$P/passphrase" \
    --allow-without-secure-boot
record_header header-armed-1 "$dev"
step disarm lczfs-unlockd disarm
record_header header-disarmed "$dev"
step arm-2 lczfs-unlockd arm-reboot --passphrase-file "$P/passphrase" \
    --allow-without-secure-boot
record_header header-armed-2 "$dev"
step status-armed lczfs-unlockd status --json --no-journal --initrd /boot/initrd.img
