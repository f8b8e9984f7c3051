#!/usr/bin/python3 -I
"""Test only, before lczfs-unlockd in the initrd: do what whoever holds the
disk can do — add an encryption root rpool/evil whose keylocation is under
/bootsecrets (so ``datasets = auto`` picks it) and whose pbkdf2iters is
2**32 (hashlib cannot even take it; at 2**31 it is hours of one C call).

The zfs CLI would derive the key from a passphrase with those iterations
first; libzfs_core takes a raw wrapping key with the properties, as an
attacker writing the pool would.  Then the pool is exported again.
"""

import subprocess
import sys
import time

sys.path.append("/usr/lib/python3/dist-packages")
# pyzfs as the initrd carries it: declarations parsed at build time,
# libraries by full soname — loaded the way the daemon loads it.
from lczfs_unlockd.zfskeys import _pin_pyzfs_libraries

libzfs_core = _pin_pyzfs_libraries()

DISK = "/dev/disk/by-id/virtio-keys0-part1"  # zpool create on a whole disk made part1
ZIO_CRYPT_AES_256_GCM = 8  # include/sys/zio.h
ZFS_KEYFORMAT_PASSPHRASE = 3  # include/sys/fs/zfs.h

for _ in range(300):
    try:
        open(DISK, "rb").close()
        break
    except OSError:
        time.sleep(0.1)
subprocess.run(["modprobe", "zfs"], check=True)
subprocess.run(["/usr/sbin/zpool", "import", "-N", "-d", DISK, "rpool"], check=True)
try:
    libzfs_core.lzc_create(
        b"rpool/evil",
        props={
            b"encryption": ZIO_CRYPT_AES_256_GCM,
            b"keyformat": ZFS_KEYFORMAT_PASSPHRASE,
            b"keylocation": b"file:///bootsecrets/rpoolcrypt.key",
            b"pbkdf2iters": 2**32,
            b"pbkdf2salt": 0x5EED5EED5EED5EED,
            b"canmount": 0,
        },
        key=bytes(32),
    )
    print("evil-dataset: created rpool/evil with pbkdf2iters=4294967296", flush=True)
finally:
    subprocess.run(["/usr/sbin/zpool", "export", "rpool"], check=True)
