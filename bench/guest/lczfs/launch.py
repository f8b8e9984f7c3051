"""bench only: the real /usr/bin/lczfs-unlockd with --timings, for instrumented boots.

The daemon records its own milestones (``--timings``: main, first_subprocess,
each step, kdf, pyzfs_import, lzc_load_key, exit; see lczfs_unlockd/log.py).
What it cannot see is how long the interpreter took to reach the first line
of a script, so this launcher notes that (CLOCK_MONOTONIC, systemd's clock),
then runs the real launcher's code unchanged in this interpreter -- its
module path, its import, its main() -- with ``--timings`` added, and writes
its one number beside the daemon's file.  Nothing of the daemon is wrapped
or replaced.  The drop-in (bench.conf) starts it with the real launcher's
interpreter flags (python3 -IS); a launcher with other flags is warned about.
"""

import time

LAUNCHER = time.monotonic()

import sys  # noqa: E402 (built in: loaded before the first line anyway)

REAL = "/usr/bin/lczfs-unlockd"
FLAGS = "#!/usr/bin/python3 -IS"
OUT = "/run/lczfs-bench"  # RuntimeDirectory= of the drop-in

with open(REAL) as f:
    source = f.read()
if source.partition("\n")[0] != FLAGS:
    print(f"lczfs-bench: {REAL} does not start with {FLAGS!r}", file=sys.stderr)
sys.argv = [REAL, *sys.argv[1:], "--timings", f"{OUT}/timing.json"]
try:
    exec(compile(source, REAL, "exec"), {"__name__": "__main__", "__file__": REAL})
finally:
    try:
        with open(f"{OUT}/launcher.json", "w") as f:
            f.write(f'{{"launcher": {LAUNCHER!r}}}\n')
    except OSError as exc:  # the daemon's exit status is what counts
        print(f"lczfs-bench: {OUT}/launcher.json: {exc}", file=sys.stderr)
