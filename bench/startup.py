"""Start-up on the host CPU: ``python3 -X importtime`` of the daemon's imports.

Runs the launcher's import (``from lczfs_unlockd.cli import main``) plus the
imports the run itself makes lazily (the adapters ``cli.real_ports`` builds,
pyzfs through the declarations parsed ahead of time, pystemd's bus module),
in a fresh ``python3 -I`` on the host CPU, chrooted into the guest tree so
that the interpreter and the third-party modules are the initrd's (Python
3.13, OpenZFS's pyzfs, pystemd), several times, and lists the slowest imports
by cumulative time (median over the runs).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .common import REPO, build

# Runs in the guest tree under python3 -I, which ignores PYTHONPATH: the only
# way to put the staged package (argv[1]) on its path is in code -- as the
# initrd's own launcher spells its module path (``sys.path += [...]``).
PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from lczfs_unlockd.cli import main, real_ports  # the launcher's import
from lczfs_unlockd import notify, units
ports = real_ports(notify.SystemdNotifier())  # the adapters, as the run builds them
try:
    units._dbuslib()
except ImportError:
    pass
try:
    ports.keys._module()
except Exception:
    pass
"""


DRIVER = r"""
import json, os, re, subprocess, sys
stage, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
pkg = os.path.join(stage, "lczfs_unlockd")
os.makedirs(pkg)
src = "/mnt/src/lczfs_unlockd"
for name in os.listdir(src):
    if name.endswith(".py"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(pkg, name), "wb") as g:
            g.write(f.read())
ffi = os.path.join(pkg, "_pyzfs_ffi.py")
subprocess.run([sys.executable, "-m", "lczfs_unlockd.pyzfs_ffi", ffi],
               env=dict(os.environ, PYTHONPATH=stage), capture_output=True, check=True)
subprocess.run([sys.executable, "-m", "compileall", "-q", stage], check=True)
results = []
for i in range(runs + 1):  # the first run warms up
    r = subprocess.run([sys.executable, "-I", "-X", "importtime", "/mnt/bench/probe.py", stage],
                       capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(1)), int(m.group(2))))
    if i:
        results.append(rows)
with open(out, "w") as f:
    json.dump({"python": sys.version.split()[0], "runs": results}, f)
"""


def run(runs: int = 7, top: int = 15) -> dict[str, Any]:
    """In the guest tree (Python, pyzfs, pystemd exactly as in the initrd)."""
    root = build.rootfs()
    with tempfile.TemporaryDirectory(prefix="lczfs-bench-importtime-") as t:
        tmp = Path(t)
        (tmp / "probe.py").write_text(PROBE)
        (tmp / "driver.py").write_text(DRIVER)
        build.chroot_script(
            root,
            f"python3 -I /mnt/bench/driver.py /tmp/stage /mnt/bench/out.json {runs}",
            {"/mnt/bench": tmp, "/mnt/src/lczfs_unlockd": REPO / "lczfs_unlockd"},
            log_to=tmp / "log",
        )
        data = json.loads((tmp / "out.json").read_text())
    samples: dict[str, list[tuple[int, int]]] = {}
    totals = []
    for rows in data["runs"]:
        for name, self_us, cum_us in rows:
            samples.setdefault(name, []).append((self_us, cum_us))
        totals.append(sum(s for _n, s, _c in rows))
    table: list[dict[str, Any]] = [
        {
            "module": name,
            "self_us": statistics.median(s for s, _ in v),
            "cumulative_us": statistics.median(c for _, c in v),
        }
        for name, v in samples.items()
    ]
    table.sort(key=lambda e: -e["cumulative_us"])
    return {
        "where": f"host CPU, guest tree {root.name} (the initrd's python3, pyzfs, pystemd)",
        "python": data["python"],
        "runs": runs,
        "modules": len(samples),
        "total_import_us_median": statistics.median(totals),
        "top": table[:top],
    }
