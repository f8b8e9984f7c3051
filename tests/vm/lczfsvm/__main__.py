"""Command line for the VM harness.

    python3 -m lczfsvm build            # guest tree, kernel, initrds, golden disks
    python3 -m lczfsvm boot NAME        # one scenario boot from scenarios.py, report summary
    python3 -m lczfsvm demo             # key-file unlock with the console streamed

(run from tests/vm, or use tests/vm/demo).  Cache: $LCZFS_VM_CACHE
(default /var/cache/lczfs-vm).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import scenarios
from .cache import cache_root
from .vm import Guest


def _build() -> Guest:
    start = time.monotonic()
    guest = Guest.get()
    print(
        f"guest ready in {time.monotonic() - start:.0f} s (cache {cache_root()})", file=sys.stderr
    )
    return guest


def cmd_build(_args: argparse.Namespace) -> int:
    g = _build()
    print(f"kernel  {g.kernel}\ninitrd  {g.base_initrd}\ngolden  {g.golden}")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    guest = _build()
    spec = scenarios.get(args.name, guest, echo=sys.stdout if args.console else None)
    result = guest.boot(spec, Path(args.workdir) if args.workdir else None)
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print(result.journal)
    print(result.describe(), file=sys.stderr)
    print(f"workdir {result.workdir}", file=sys.stderr)
    return 0


def cmd_demo(_args: argparse.Namespace) -> int:
    print(
        "== building the guest (cached after the first run; cold: ~17 min on 2 cores) ==",
        flush=True,
    )
    guest = _build()
    print("== booting: lczfs-unlockd opens the keystore with its key file ==", flush=True)
    spec = scenarios.get("keyfile", guest, echo=sys.stdout)
    result = guest.boot(spec)
    print("\n== journalctl -u lczfs-unlockd (from that boot) ==")
    print(result.report["journal_unit_short"]["out"], end="")
    print("\n== dataset key status after the initrd ==")
    for name, status in result.keystatus().items():
        print(f"  {name:32} {status}")
    print(f"\n{result.describe()}")
    ok = result.unit.get("Result") == "success"
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(prog="lczfsvm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").set_defaults(func=cmd_build)
    b = sub.add_parser("boot")
    b.add_argument("name", choices=scenarios.NAMES)
    b.add_argument("--console", action="store_true", help="stream the serial console")
    b.add_argument("--json", action="store_true", help="print the whole report")
    b.add_argument("--workdir")
    b.set_defaults(func=cmd_boot)
    sub.add_parser("demo").set_defaults(func=cmd_demo)
    args = p.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
