"""bench/run: initrd size, unlock time against the seed's chain, late disk, memory, start-up.

    bench/run                 # everything (~35 min on 2 cores under TCG), prints a table
    bench/run --json          # the same, as one JSON object on stdout
    bench/run --only size     # size | startup | boots (comma-separated)
    bench/run --boots 3 --late-boots 1
    bench/run --only boots --boots 0 --late-boots 0   # one instrumented boot (--timings)
    bench/run --from FILE     # print the table/JSON of a saved result

Every run saves its full result (per-boot numbers included) under
$LCZFS_VM_CACHE/bench-results/ (default /var/cache/lczfs-vm).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import boots, size, startup
from .common import cache, log

MIB = 1024 * 1024
TARGETS = {
    "initrd_delta_compressed_bytes": 10 * MIB,
    "unlock_ratio_median": 1.0,
    "late_disk_import_ms": 300.0,
    "peak_rss_bytes": 40 * MIB,
}


def _median(d: dict[str, Any] | None) -> Any:
    return d.get("median") if isinstance(d, dict) else None


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The flat keys the issue asks for, from the detailed result."""
    out: dict[str, Any] = {}
    s = result.get("size")
    if s:
        out["initrd_delta_compressed_bytes"] = s["initrd_delta_compressed_bytes"]
        out["initrd_delta_uncompressed_bytes"] = s["initrd_delta_uncompressed_bytes"]
        out["initrd_delta_gzip9_bytes"] = s["initrd_delta_gzip9_bytes"]
        out["initrd_compressor"] = s["compressor"]
        out["initrd_breakdown"] = s["breakdown"]
    b = result.get("boots")
    if b:
        out["unlock_seconds_median"] = _median(b["unlock"])
        out["seed_chain_seconds_median"] = _median(b["seed_chain"])
        out["unlock_ratio_median"] = b["unlock_ratio_median"]
        out["unlock_seconds"] = b["unlock"]
        out["seed_chain_seconds"] = b["seed_chain"]
        out["unlock_ratio_pairs"] = b["ratio_pairs"]
        out["unlock_seconds_from_kernel"] = b["unlock_from_kernel"]
        out["seed_chain_seconds_from_kernel"] = b["seed_chain_from_kernel"]
        out["unlock_ratio_from_kernel"] = b["unlock_ratio_from_kernel"]
        out["keys_loaded_seconds"] = b.get("keys_loaded_lczfs")
        out["seed_keys_loaded_seconds"] = b.get("keys_loaded_seed")
        out["late_disk_import_ms"] = _median(b["late_disk_lczfs_ms"])
        out["late_disk_import_ms_spread"] = b["late_disk_lczfs_ms"]
        out["late_disk_detect_ms"] = b["late_disk_detect_lczfs_ms"]
        out["late_disk_poll_1s_ms"] = b["late_disk_poll_ms"]
        out["peak_rss_bytes"] = _median(b["vmhwm_bytes"])
        out["peak_rss_outside_pbkdf_bytes"] = _median(b.get("rss_outside_pbkdf_bytes"))
        out["keyslot_pbkdf_memory_bytes"] = b.get("keyslot_pbkdf_memory_bytes")
        out["memory_peak_cgroup_bytes"] = _median(b["memory_peak_cgroup"])
        out["guest_start_to_first_action_s"] = _median(b["start_to_first_action_s"])
        out["guest_start_to_interpreter_ready_s"] = _median(b["start_to_launcher_s"])
        out["guest_start_to_imports_done_s"] = _median(b["start_to_imported_s"])
        out["guest_pyzfs_import_to_first_lzc_end_s"] = _median(b["pyzfs_import_to_first_lzc_end_s"])
        out["guest_keyslot_kdf_s"] = _median(b.get("kdf_s"))
    st = result.get("startup")
    if st:
        out["host_import_total_us"] = st["total_import_us_median"]
        out["host_importtime_top"] = st["top"]
    return out


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    return f"{n / MIB:.2f} MiB" if abs(n) >= MIB else f"{n / 1024:.0f} KiB"


def _fmt_s(d: Any) -> str:
    if not isinstance(d, dict) or d.get("median") is None:
        return "-"
    return f"{d['median']:.2f} s (min {d['min']:.2f}, max {d['max']:.2f}, n={d['n']})"


def _fmt_ms(d: Any) -> str:
    if not isinstance(d, dict) or d.get("median") is None:
        return "-"
    return f"{d['median']:.0f} ms (min {d['min']:.0f}, max {d['max']:.0f}, n={d['n']})"


def _mark(key: str, value: Any) -> str:
    target = TARGETS.get(key)
    if target is None or not isinstance(value, int | float):
        return ""
    return "  ok" if value <= target else "  MISSES target"


def table(result: dict[str, Any]) -> str:
    h = headline(result)
    b = result.get("boots") or {}
    rows: list[tuple[str, str]] = []

    def add(label: str, value: str, key: str | None = None, raw: Any = None) -> None:
        rows.append((label, value + (_mark(key, raw) if key else "")))

    if "initrd_delta_compressed_bytes" in h:
        v = h["initrd_delta_compressed_bytes"]
        add(f"initrd delta, {h['initrd_compressor']}", _fmt_bytes(v) + " (target <= 10 MiB, aim 6)",
            "initrd_delta_compressed_bytes", v)  # fmt: skip
        add("initrd delta, gzip -9", _fmt_bytes(h["initrd_delta_gzip9_bytes"]))
        add("initrd delta, uncompressed", _fmt_bytes(h["initrd_delta_uncompressed_bytes"]))
        for part, d in h["initrd_breakdown"].items():
            raw = f"{_fmt_bytes(d['uncompressed_bytes'])} raw, {d['files']} files"
            add(f"  {part}", f"{_fmt_bytes(d['compressed_bytes'])} zstd, {raw}")
    if "unlock_seconds_median" in h:
        add("unlock, lczfs-unlockd (initrd systemd start -> keys loaded, keystore closed)",
            _fmt_s(h["unlock_seconds"]))  # fmt: skip
        add("unlock, seed chain (same)", _fmt_s(h["seed_chain_seconds"]))
        r = h["unlock_ratio_median"]
        add("ratio lczfs/seed (medians)", (f"{r:.2f}" if r else "-") + " (target <= 1.0, aim 0.8)",
            "unlock_ratio_median", r)  # fmt: skip
        rp = h["unlock_ratio_pairs"]
        if rp.get("median") is not None:
            add("  ratio of interleaved pairs",
                f"median {rp['median']:.2f}, min {rp['min']:.2f}, max {rp['max']:.2f}")  # fmt: skip
        rk = h["unlock_ratio_from_kernel"]
        add("  from kernel start (incl. initrd unpack)",
            f"{_fmt_s(h['unlock_seconds_from_kernel'])} vs "
            f"{_fmt_s(h['seed_chain_seconds_from_kernel'])}; ratio "
            + (f"{rk:.2f}" if rk else "-"))  # fmt: skip
        add("  keys loaded (keystore still open), lczfs", _fmt_s(h["keys_loaded_seconds"]))
        add("  keys loaded (keystore still open), seed", _fmt_s(h["seed_keys_loaded_seconds"]))
        v = h["late_disk_import_ms"]
        add("late disk: appeared -> imported, lczfs-unlockd",
            _fmt_ms(h["late_disk_import_ms_spread"]) + " (target <= 300 ms)",
            "late_disk_import_ms", v)  # fmt: skip
        add("  appeared -> zpool import started", _fmt_ms(h["late_disk_detect_ms"]))
        add("late disk: NixOS 1-second polling", _fmt_ms(h["late_disk_poll_1s_ms"]))
        v = h["peak_rss_bytes"]
        add("peak RSS (VmHWM) of the daemon", _fmt_bytes(v) + " (target < 40 MiB)",
            "peak_rss_bytes", v)  # fmt: skip
        add("  of which keyslot PBKDF (argon2id memory cost)",
            _fmt_bytes(h["keyslot_pbkdf_memory_bytes"]))  # fmt: skip
        add("  peak RSS outside the PBKDF", _fmt_bytes(h["peak_rss_outside_pbkdf_bytes"]))
        add("  cgroup memory.peak (MemoryPeak=)", _fmt_bytes(h["memory_peak_cgroup_bytes"]))
        for key, label in (
            ("start_to_launcher_s", "guest: process start -> interpreter ready"),
            ("start_to_imported_s", "guest: process start -> daemon imported"),
            ("start_to_first_action_s", "guest: process start -> first action (pool scan)"),
            ("pyzfs_import_to_first_lzc_end_s", "guest: import libzfs_core -> first lzc call done"),
            ("kdf_s", "guest: keyslot KDF (libcryptsetup's activation call)"),
        ):
            add(label, _fmt_s(b.get(key)))
        for step, d in (b.get("step_s") or {}).items():
            add(f"  step {step}", _fmt_s(d))
    if "host_import_total_us" in h:
        add("host CPU: all imports (-X importtime, self sum)",
            f"{h['host_import_total_us'] / 1000:.1f} ms")  # fmt: skip
        for e in h["host_importtime_top"][:10]:
            cum, own = e["cumulative_us"] / 1000, e["self_us"] / 1000
            add(f"  {e['module']}", f"{cum:.1f} ms cumulative, {own:.1f} ms self")
    width = max(len(k) for k, _ in rows) if rows else 0
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--only", default="size,startup,boots")
    p.add_argument("--boots", type=int, default=5, help="boots per side (default 5)")
    p.add_argument("--late-boots", type=int, default=2, help="late-disk boots per side")
    p.add_argument("--instrumented", type=int, default=1, help="instrumented lczfs boots")
    p.add_argument("--keep", action="store_true", help="keep the boots' work directories")
    p.add_argument("--from", dest="load", help="print a saved result instead of running")
    args = p.parse_args(argv)
    if args.load:
        result = json.loads(Path(args.load).read_text())
        if isinstance(result.get("boots"), dict) and "boots" in result["boots"]:
            result["boots"] = boots.resummarize(result["boots"])
    else:
        only = set(args.only.split(","))
        result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if "size" in only:
            result["size"] = size.run()
        if "startup" in only:
            result["startup"] = startup.run()
        if "boots" in only:
            result["boots"] = boots.series(
                args.boots, args.late_boots, args.instrumented, keep=args.keep
            )
        result["headline"] = headline(result)
        out = cache.cache_root() / "bench-results"
        out.mkdir(exist_ok=True)
        path = out / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        log(f"full result: {path}")
    if args.json:
        print(json.dumps(headline(result), indent=1, default=str))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
