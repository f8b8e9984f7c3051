#!/usr/bin/python3 -I
"""Test only, before lczfs-unlockd in the initrd: do to the pool what whoever
holds the disk can do (an evil maid), then export it again.  The mode is the
first word of /etc/lczfs-test/evil-mode (the scenario installs it):

hostile-kdf (keys0; the default)
    Add an encryption root rpool/evil whose keylocation is under /bootsecrets
    (so ``datasets = auto`` picks it) and whose pbkdf2iters is 2**32
    (hashlib cannot even take it; at 2**31 it is hours of one C call).  The
    zfs CLI would derive the key from a passphrase with those iterations
    first; libzfs_core takes a raw wrapping key with the properties, as an
    attacker writing the pool would.

unencrypted-root (seed0)
    Rename rpool/crypt to rpool/crypt-real (its keylocation still points into
    the keystore, so ``datasets = auto`` still loads it) and create an
    unencrypted rpool/crypt/local/root (canmount=noauto, mountpoint=/): the
    impostor that root=zfs:rpool/crypt/local/root would mount, no key asked.

foreign-root (seed0)
    Rename the real rpool/crypt/local/root away and put an encryption root
    of the attacker's (passphrase known to the attacker, keylocation=prompt)
    at its name: encrypted, but not under rpool/crypt.  ZFS moves an
    encryption root anywhere without any key (only a dataset that inherits
    its key may not change encryption roots); its key is unloaded again.

Only the zfs CLI (and, for hostile-kdf, pyzfs), as the initrd carries them.
"""

import subprocess
import sys
import time

MODE_FILE = "/etc/lczfs-test/evil-mode"
DISKS = {  # zpool create on a whole disk made part1
    "hostile-kdf": "/dev/disk/by-id/virtio-keys0-part1",
    "unencrypted-root": "/dev/disk/by-id/virtio-seed0-part1",
    "foreign-root": "/dev/disk/by-id/virtio-seed0-part1",
}
ZPOOL = "/usr/sbin/zpool"
ZFS = "/usr/sbin/zfs"
ROOT = "rpool/crypt/local/root"
ATTACKER_PASSPHRASE = b"evil-maid-passphrase\n"  # known to the attacker, nobody else


def zfs(*args: str, stdin: bytes | None = None) -> None:
    print("evil-dataset: zfs " + " ".join(args), flush=True)
    subprocess.run([ZFS, *args], input=stdin, check=True)


def hostile_kdf() -> None:
    sys.path.append("/usr/lib/python3/dist-packages")
    # pyzfs as the initrd carries it: declarations parsed at build time,
    # libraries by full soname -- loaded the way the daemon loads it.
    from lczfs_unlockd.zfskeys import _pin_pyzfs_libraries

    libzfs_core = _pin_pyzfs_libraries()
    zio_crypt_aes_256_gcm = 8  # include/sys/zio.h
    zfs_keyformat_passphrase = 3  # include/sys/fs/zfs.h
    libzfs_core.lzc_create(
        b"rpool/evil",
        props={
            b"encryption": zio_crypt_aes_256_gcm,
            b"keyformat": zfs_keyformat_passphrase,
            b"keylocation": b"file:///bootsecrets/rpoolcrypt.key",
            b"pbkdf2iters": 2**32,
            b"pbkdf2salt": 0x5EED5EED5EED5EED,
            b"canmount": 0,
        },
        key=bytes(32),
    )
    print("evil-dataset: created rpool/evil with pbkdf2iters=4294967296", flush=True)


def unencrypted_root() -> None:
    zfs("rename", "rpool/crypt", "rpool/crypt-real")
    # -p: rpool/crypt and rpool/crypt/local again, unencrypted like rpool.
    zfs("create", "-p", "-u", "-o", "canmount=noauto", "-o", "mountpoint=/", ROOT)
    print(f"evil-dataset: {ROOT} is now an unencrypted impostor", flush=True)


def foreign_root() -> None:
    zfs("rename", ROOT, ROOT + "-real")
    zfs(
        "create", "-u", "-o", "encryption=on", "-o", "keyformat=passphrase",
        "-o", "keylocation=prompt", "-o", "pbkdf2iters=100000",
        "-o", "canmount=noauto", "-o", "mountpoint=/", "rpool/impostor",
        stdin=ATTACKER_PASSPHRASE,
    )  # fmt: skip
    zfs("rename", "rpool/impostor", ROOT)
    zfs("unload-key", ROOT)
    print(f"evil-dataset: {ROOT} is now an encryption root of the attacker's", flush=True)


MODES = {
    "hostile-kdf": hostile_kdf,
    "unencrypted-root": unencrypted_root,
    "foreign-root": foreign_root,
}


def main() -> int:
    try:
        with open(MODE_FILE) as f:
            mode = (f.read().split() or ["hostile-kdf"])[0]
    except FileNotFoundError:
        mode = "hostile-kdf"
    if mode not in MODES:
        print(f"evil-dataset: unknown mode {mode!r} in {MODE_FILE}", flush=True)
        return 2
    disk = DISKS[mode]
    for _ in range(300):
        try:
            open(disk, "rb").close()
            break
        except OSError:
            time.sleep(0.1)
    subprocess.run(["modprobe", "zfs"], check=True)
    subprocess.run([ZPOOL, "import", "-N", "-d", disk, "rpool"], check=True)
    try:
        MODES[mode]()
    finally:
        subprocess.run([ZPOOL, "export", "rpool"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
