"""bench only: /usr/bin/lczfs-unlockd with timestamps, for instrumented boots.

Records CLOCK_MONOTONIC (systemd's clock) at: the launcher's first line
(interpreter start-up done), the daemon's modules imported, the first
subprocess (the first action: the pool scan), the start of the pyzfs import
(``libzfs_core`` with the pre-parsed declarations) and the end of the first
``lzc_load_key``; and at exit the process's peak RSS (VmHWM).  Written to
/run/lczfs-bench/timing.json; the process start comes from systemd
(ExecMainStartTimestampMonotonic).  Wrappers only: no audit hook, so the
overhead is a few function calls.
"""

import time

T = {"launcher": time.monotonic()}
RSS = {}


def _rss(label):
    """VmRSS now: the peak outside libcryptsetup's PBKDF is the max of these."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                RSS[label] = int(line.split()[1]) * 1024


import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

# The real launcher's module path (python3 -IS: no site module), from it;
# launchers that relied on site (python3 -I) had Debian's dist-packages.
PATH = ["/usr/lib/python3/dist-packages"]
with open("/usr/bin/lczfs-unlockd") as f:
    for line in f:
        if line.startswith("sys.path += "):
            PATH = json.loads(line.split("=", 1)[1].strip().replace("'", '"'))
sys.path += [p for p in PATH if p not in sys.path]

from lczfs_unlockd import zfskeys  # noqa: E402
from lczfs_unlockd.cli import main  # noqa: E402

T["imported"] = time.monotonic()
_rss("imported")

_popen = subprocess.Popen._execute_child


def _execute_child(self, args, *rest):
    if "first_subprocess" not in T:
        _rss("first_subprocess")
    T.setdefault("first_subprocess", time.monotonic())
    T.setdefault("first_subprocess_argv", " ".join(map(str, args))[:80])
    return _popen(self, args, *rest)


subprocess.Popen._execute_child = _execute_child

_pin = zfskeys._pin_pyzfs_libraries


def _pin_pyzfs_libraries():
    T.setdefault("pyzfs_import_start", time.monotonic())
    module = _pin()
    T.setdefault("pyzfs_import_end", time.monotonic())
    _rss("pyzfs_imported")
    return module


zfskeys._pin_pyzfs_libraries = _pin_pyzfs_libraries
_load_key = zfskeys.PyzfsKeyLoader.load_key


def load_key(self, *args, **kwargs):
    T.setdefault("first_lzc_start", time.monotonic())
    try:
        return _load_key(self, *args, **kwargs)
    finally:
        T.setdefault("first_lzc_end", time.monotonic())
        _rss("first_lzc_end")


zfskeys.PyzfsKeyLoader.load_key = load_key

# The keystore: RSS just before libcryptsetup derives the key (its PBKDF,
# argon2id, allocates the keyslot's memory cost) and just after.
from lczfs_unlockd import cryptsetup  # noqa: E402

_open = cryptsetup.LibCryptsetup.open


def _open_device(self, *args, **kwargs):
    _rss("keystore_open")
    return _open(self, *args, **kwargs)


cryptsetup.LibCryptsetup.open = _open_device
_activate = cryptsetup.LuksVolume.activate_by_keyfile


def _activate_by_keyfile(self, *args, **kwargs):
    _rss("before_pbkdf")
    try:
        return _activate(self, *args, **kwargs)
    finally:
        _rss("after_pbkdf")


cryptsetup.LuksVolume.activate_by_keyfile = _activate_by_keyfile


@atexit.register
def _write():
    T["exit"] = time.monotonic()
    _rss("exit")
    T["rss"] = RSS
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:", "VmPeak:")):
                key, value = line.split(":", 1)
                T[key] = int(value.split()[0]) * 1024
    os.makedirs("/run/lczfs-bench", exist_ok=True)
    with open("/run/lczfs-bench/timing.json", "w") as f:
        json.dump(T, f)


raise SystemExit(main())
