"""Golden disk images and test boots: what the scenarios and the demo call.

guest = Guest.get()             # builds/reuses the tree, initrds, golden disks
result = guest.boot(Boot(...))  # one initrd-only boot, returns its report

A layout of its own: ``Guest.get(Provisioning(disks=..., script=...))``
provisions (and caches) its own golden disks instead of the project's;
``toml_config(name=..., mountpoint=..., partition=...)`` names its keystore;
``Boot(files=...)`` adds initrd files and the report follows the config's
unit names (or ``Boot(units=...)``).
"""

from __future__ import annotations

import base64
import builtins
import json
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

from . import build, cache, cpio, qemu
from .build import InitrdConfig
from .paths import GUEST_DIR
from .proc import log

GOLDEN_DISKS = ("seed0", "keys0", "mirror0", "mirror1", "dup0")
DISK_SIZE = "512M"
PROVISION_TIMEOUT = 900.0


# Files of the secrets directory that are no secret (not searched for in a boot).
PUBLIC_FILES = frozenset({"tpm2-pcr-public-key.pem"})


@dataclass(frozen=True)
class Secrets:
    """What provisioning put on the golden disks (random per provisioning).

    Besides what the harness generated (make_secrets), provisioning may
    report secrets of its own (``secret NAME HEX`` lines): e.g. the seed0
    keystore's LUKS volume key, ``seed0-keystore.vk``.
    """

    dir: Path
    more: tuple[Path, ...] = ()  # a session's own secrets (Session): they win by name

    def bytes(self, name: str) -> bytes:
        for d in self.more:
            if (d / name).exists():
                return (d / name).read_bytes()
        return (self.dir / name).read_bytes()

    @property
    def passphrase(self) -> str:
        return self.bytes("passphrase").decode()

    @property
    def tpm2_pin(self) -> str:
        return self.bytes("tpm2.pin").decode()

    @property
    def needles(self) -> tuple[builtins.bytes, ...]:
        """Every secret, as it could leak: raw bytes and, for text keys, the text."""
        out: list[builtins.bytes] = []
        for d in (self.dir, *self.more):
            if d.is_dir():  # a recipe without secrets has none
                out += _needles(d)
        return tuple(out)


def _needles(d: Path) -> list[bytes]:
    out: list[bytes] = []
    for p in sorted(d.iterdir()):
        if p.name in PUBLIC_FILES:
            continue
        data = p.read_bytes()
        out.append(data)
        stripped = data.rstrip(b"\n")
        if stripped != data:
            out.append(stripped)
        if p.name in ("raw.key", "keystore.key") or p.name.endswith(".vk"):
            out.append(data.hex().encode())
        if (
            p.name.endswith(".key")
            and len(stripped) == 64
            and all(c in b"0123456789abcdef" for c in stripped)
        ):
            out.append(bytes.fromhex(stripped.decode()))  # the derived wrapping key
    return out


def make_secrets(d: Path) -> None:
    """The project's secrets: the keystore's passphrase, key file, PIN; the datasets' keys."""
    d.mkdir()
    files = {
        "passphrase": f"lczfs-{secrets.token_hex(6)}".encode(),
        "keystore.key": secrets.token_bytes(64),
        "rpoolcrypt.key": (secrets.token_hex(32) + "\n").encode(),
        "raw.key": secrets.token_bytes(32),
        "hex.key": secrets.token_hex(32).encode(),  # no newline on purpose
        "pass.key": (f"pass-{secrets.token_hex(6)}\n").encode(),
        "garbage.key": bytes(range(256))[-64:],  # 64 bytes, not hex
        "wrong.key": (secrets.token_hex(32) + "\n").encode(),
        "tpm2.pin": f"pin-{secrets.token_hex(4)}".encode(),
        **_pcr_signing_key(),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)


def _pcr_signing_key() -> dict[str, builtins.bytes]:
    """An RSA-2048 key pair for signed TPM2 PCR policies (systemd-measure sign, PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "tpm2-pcr-private-key.pem": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "tpm2-pcr-public-key.pem": key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }


@dataclass(frozen=True)
class Checks:
    """What a boot's report records beyond the usual (each costs boot time).

    tpm: the PCR values (sysfs, every bank) and the measurement log
    (/run/log/systemd/tpm2-measure.log).  unseal: a second unseal of this
    LUKS device's systemd-tpm2 token after the daemon, check-only
    (``cryptsetup open --test-passphrase --token-only``).  sysroot: start
    sysroot.mount (after the natural attempt, with ``lczfs.test.report=late``),
    record its result, and unmount /sysroot if it mounted.  luks_dump: these
    LUKS devices' headers after the daemon (``cryptsetup luksDump
    --dump-json-metadata``; Result.luks_metadata), e.g. to see that a
    one-time key slot is gone.
    """

    tpm: bool = False
    unseal: str | None = None
    sysroot: bool = False
    luks_dump: tuple[str, ...] = ()

    def to_json(self) -> str:
        data: dict[str, object] = {"tpm": self.tpm, "unseal": self.unseal, "sysroot": self.sysroot}
        if self.luks_dump:
            data["luks_dump"] = list(self.luks_dump)
        return json.dumps(data)


@dataclass(frozen=True)
class Boot:
    """One test boot."""

    name: str
    config: str | None
    disks: Sequence[str] = ("seed0",)  # golden disks attached at power-on
    hotplug: Sequence[str] = ()  # plugged hotplug_delay s after the daemon starts
    hotplug_delay: float = 5.0
    cmdline: str = ""
    tpm: bool = False
    keyfile: bool = False  # put the LUKS key file at /etc/lczfs-unlockd/keystore.key
    files: Sequence[tuple[str, bytes, int]] = ()  # more initrd files: (path, content, mode)
    units: Sequence[str] | None = None  # masking reported for these (None: the config's)
    answers: Sequence[str] = ()  # typed at each password prompt, in order
    checks: Checks | None = None  # more for the report to record (None: the usual)
    # A base initrd of its own, built with this config (and the files it names) in
    # the tree, so the dracut module copies them in (None: the project's base).
    initrd_config: InitrdConfig | None = None
    prompt: str = r"Please enter the (passphrase|security token PIN) for keystore [^\n]*:"
    timeout: float = 300.0  # wall clock for the whole boot
    echo: IO[str] | None = None


@dataclass
class Result:
    boot: Boot
    report: dict[str, Any]
    console: str
    seconds: float  # wall clock, QEMU start to exit
    workdir: Path
    prompts: list[float] = field(default_factory=list)

    # -- what a user sees -------------------------------------------------------
    @property
    def unit(self) -> dict[str, str]:
        return self.report["unit"]  # type: ignore[no-any-return]

    @property
    def status(self) -> str:
        return self.unit.get("StatusText", "")

    @property
    def journal(self) -> str:
        return str(self.report["journal_unit"]["out"])

    def keystatus(self) -> dict[str, str]:
        return {d["name"]: d.get("keystatus", "") for d in self.report["datasets"]}

    def mounts_at(self, path: str) -> list[str]:
        return [line for line in self.report["mountinfo"].splitlines() if line.split()[4] == path]

    def mappings(self) -> list[str]:
        out = str(self.report["dmsetup_ls"]["out"]).strip()
        return [] if not out or out.startswith("No devices found") else out.splitlines()

    def luks_metadata(self, device: str) -> dict[str, Any]:
        """The LUKS2 JSON metadata of device as the report dumped it (Checks.luks_dump)."""
        dump = self.report["luks_dump"][device]
        if dump["rc"] != 0:
            raise AssertionError(f"cryptsetup luksDump {device} failed: {dump}")
        return json.loads(dump["out"])  # type: ignore[no-any-return]

    def daemon_seconds(self) -> float:
        """Daemon start to finish, from systemd's monotonic timestamps."""
        start = int(self.unit.get("ExecMainStartTimestampMonotonic") or 0)
        end = int(self.unit.get("ExecMainExitTimestampMonotonic") or 0) or int(
            self.unit.get("ActiveEnterTimestampMonotonic") or 0
        )
        return (end - start) / 1e6 if start and end > start else float("nan")

    def journal_time(self, pattern: str) -> float:
        """Monotonic seconds of the daemon's first journal line matching pattern."""
        rx = re.compile(pattern)
        for line in str(self.report["journal_unit_short"]["out"]).splitlines():
            m = re.match(r"\[\s*([0-9.]+)\]", line)
            if m and rx.search(line):
                return float(m.group(1))
        raise AssertionError(
            f"no journal line of lczfs-unlockd matches {pattern!r}\n{self.journal}"
        )

    def describe(self) -> str:
        return (
            f"{self.boot.name}: boot {self.seconds:.1f} s, daemon {self.daemon_seconds():.1f} s, "
            f"{self.unit.get('ActiveState')}/{self.unit.get('Result')}: {self.status}"
        )


@dataclass(frozen=True)
class Provisioning:
    """A recipe for the golden disks a Guest boots from: one provisioning boot.

    The provisioning initrd (build.provision_initrd) runs script as
    /usr/lib/lczfs-test/provision.sh, with the disks attached (virtio serials:
    each of disks, then lczfsreport), secrets(dir)'s files in
    /etc/lczfs-provision and swtpm.  The script writes ``LCZFSPROVISION OK``
    (and ``guid DISK GUID`` lines) to the lczfsreport disk and powers off, as
    guest/provision.sh does.  Cached as ``golden-<tree>-<hash of the script,
    the disks and their size>``: <disk>.qcow2 each, secrets/, tpm/ (the swtpm
    state), guids.json.  Subclass and override golden() for disks made
    another way.
    """

    disks: tuple[str, ...] = GOLDEN_DISKS
    script: Path = GUEST_DIR / "provision.sh"
    size: str = DISK_SIZE
    secrets: Callable[[Path], None] = make_secrets
    timeout: float = PROVISION_TIMEOUT

    def cache_name(self, root: Path) -> str:
        return f"golden-{root.name.removeprefix('rootfs-')}-" + cache.recipe_hash(
            [self.script, GUEST_DIR / "lczfs-test-provision.service",
             build.PROVISION_TOOLS, self.size, ",".join(self.disks)]
        )  # fmt: skip

    def golden(self, guest: Guest) -> Path:
        """The golden directory for guest's tree and kernel, provisioned if not cached."""
        name = self.cache_name(guest.root)

        def make(tmp: Path) -> None:
            initrd = build.provision_initrd(guest.root)

            def empty() -> None:
                for child in tmp.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()

            qemu.retry_on_crash(
                "provisioning", lambda: self._make_once(guest, initrd, name, tmp), empty
            )

        return cache.cached_dir(name, make)

    def _make_once(self, guest: Guest, provision_initrd: Path, name: str, tmp: Path) -> None:
        log(f"provisioning golden disks {name} (one boot, ~2 min)")
        self.secrets(tmp / "secrets")
        disks = [qemu.Disk(qemu.blank_image(tmp / f"{d}.qcow2", self.size), d) for d in self.disks]
        report = qemu.raw_image(tmp / "report.raw")
        disks.append(qemu.Disk(report, "lczfsreport", "raw"))
        (tmp / "tpm").mkdir()
        a = cpio.Archive()
        build.poweroff_links(a)
        a.copy(self.script, "usr/lib/lczfs-test/provision.sh", 0o755)
        unit = "lczfs-test-provision.service"
        a.copy(GUEST_DIR / unit, f"usr/lib/systemd/system/{unit}", 0o644)
        a.symlink(
            f"etc/systemd/system/initrd.target.wants/{unit}", f"/usr/lib/systemd/system/{unit}"
        )
        if (tmp / "secrets").is_dir():
            for p in sorted((tmp / "secrets").iterdir()):
                a.copy(p, f"etc/lczfs-provision/{p.name}", 0o400)
        initrd = tmp / "provision.img"
        initrd.write_bytes(cpio.append(provision_initrd.read_bytes(), a.to_bytes()))
        m = qemu.Machine(guest.kernel, initrd, tmp / "run", disks=disks, tpm_state=tmp / "tpm")
        start = time.monotonic()
        try:
            m.start()
            m.wait(self.timeout)
        finally:
            m.close()
        status = report.read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        if not status.startswith("LCZFSPROVISION OK"):
            tail = "\n".join(m.console_text().splitlines()[-60:])
            raise RuntimeError(
                f"provisioning failed ({status.splitlines()[:1]}); "
                f"console {tmp}/run/console.log:\n{tail}"
            )
        log(f"provisioned in {time.monotonic() - start:.0f} s")
        guids = {
            f[1]: int(f[2])
            for f in (line.split() for line in status.splitlines())
            if len(f) == 3 and f[0] == "guid" and f[2].isdigit()
        }
        (tmp / "guids.json").write_text(json.dumps(guids))
        _save_records(status, tmp)
        for p in (initrd, report):
            p.unlink()


def _parse_report_lines(
    text: str,
) -> tuple[dict[str, str], dict[str, builtins.bytes], dict[str, builtins.bytes]]:
    """``record NAME VALUE``, ``file NAME BASE64`` and ``secret NAME HEX`` lines:
    (records, files, secrets) by name; names with a slash or a leading dot are
    ignored (they become file names)."""
    records: dict[str, str] = {}
    files: dict[str, builtins.bytes] = {}
    made: dict[str, builtins.bytes] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        name, _, value = rest.partition(" ")
        if not name or "/" in name or name.startswith("."):
            continue
        if kind == "record":
            records[name] = value.strip()
        elif kind == "secret":
            made[name] = bytes.fromhex(value.strip())
        elif kind == "file":
            files[name] = base64.b64decode(value.strip())
    return records, files, made


def _save_records(status: str, golden: Path) -> None:
    """What a provisioning script reported besides GUIDs, one line each:

    ``record NAME VALUE`` -> records.json (facts: a LUKS UUID, PCR values);
    ``secret NAME HEX`` -> secrets/NAME (a secret made in the guest: the
    harness greps every boot for it); ``file NAME BASE64`` -> files/NAME.
    """
    records, files, made = _parse_report_lines(status)
    for sub, entries in (("secrets", made), ("files", files)):
        for name, data in entries.items():
            (golden / sub).mkdir(exist_ok=True)
            (golden / sub / name).write_bytes(data)
    (golden / "records.json").write_text(json.dumps(records, indent=1, sort_keys=True))


PROJECT_DISKS = Provisioning()  # guest/provision.sh: seed0, keys0, mirror0, mirror1, dup0


class Guest:
    """The built guest: tree, kernel, initrds, golden disks (PROJECT_DISKS unless told)."""

    _instances: ClassVar[dict[Provisioning, Guest]] = {}

    def __init__(self, provisioning: Provisioning = PROJECT_DISKS) -> None:
        start = time.monotonic()
        self.provisioning = provisioning
        self.root = build.rootfs()
        self.kernel = build.kernel(self.root)
        self.base_initrd = build.base_initrd(self.root)
        self.golden = provisioning.golden(self)
        self.secrets = Secrets(self.golden / "secrets")
        # Each golden disk's pool GUID (zpool get guid), for pool_guid.
        guids = self.golden / "guids.json"
        self.guids: dict[str, int] = json.loads(guids.read_text()) if guids.exists() else {}
        # What provisioning recorded (``record NAME VALUE``), e.g. seed0-keystore-uuid.
        records = self.golden / "records.json"
        self.records: dict[str, str] = json.loads(records.read_text()) if records.exists() else {}
        self.build_seconds = time.monotonic() - start

    @classmethod
    def get(cls, provisioning: Provisioning = PROJECT_DISKS) -> Guest:
        """One Guest per provisioning recipe and process."""
        if provisioning not in cls._instances:
            cls._instances[provisioning] = cls(provisioning)
        return cls._instances[provisioning]

    def file(self, name: str) -> bytes:
        """A file provisioning made (``file NAME BASE64``), e.g. a PCR signature."""
        return (self.golden / "files" / name).read_bytes()

    # -- test boots -----------------------------------------------------------------
    def boot(
        self, spec: Boot, workdir: Path | None = None, session: Session | None = None
    ) -> Result:
        """One test boot on fresh overlays of the golden disks (or, in a session,
        of the disks and TPM state the session's previous boot left)."""
        work = workdir or Path(tempfile.mkdtemp(prefix=f"lczfs-vm-{spec.name}-"))
        work.mkdir(parents=True, exist_ok=True)
        needles = session.secrets.needles if session is not None else ()
        initrd = build.test_initrd(
            self.root, self.overlay(spec, needles), work / "initrd.img", spec.initrd_config
        )

        def keep_crash_logs() -> None:
            n = len(list(work.glob("crashed*-qemu.log"))) + 1
            for f in ("console.log", "qemu.log"):
                if (work / f).exists():
                    (work / f).rename(work / f"crashed{n}-{f}")

        source = session if session is not None else _Golden(self.golden)
        return qemu.retry_on_crash(
            spec.name, lambda: self._boot_once(spec, initrd, work, source), keep_crash_logs
        )

    def overlay(self, spec: Boot, needles: Sequence[builtins.bytes] = ()) -> build.Overlay:
        """What spec's boot appends to the base initrd."""
        files: list[tuple[str, bytes, int]] = []
        if spec.keyfile:
            files.append(
                ("etc/lczfs-unlockd/keystore.key", self.secrets.bytes("keystore.key"), 0o400)
            )
        files += spec.files
        return build.Overlay(
            config=spec.config,
            files=tuple(files),
            # Typed answers, wrong ones included, must not leak either.
            needles=(*self.secrets.needles, *needles, *(a.encode() for a in spec.answers)),
            units=None if spec.units is None else tuple(spec.units),
            checks=None if spec.checks is None else spec.checks.to_json(),
        )

    def _boot_once(self, spec: Boot, initrd: Path, work: Path, source: _Source) -> Result:
        """One QEMU run on fresh copy-on-write disks (a retry must not see the last one's writes)."""
        disks = [qemu.overlay_image(source.disk(d), work / f"{d}.qcow2") for d in spec.disks]
        late = [qemu.overlay_image(source.disk(d), work / f"{d}.qcow2") for d in spec.hotplug]
        report_disk = qemu.raw_image(work / "report.raw")
        tpm = _copy_tpm(source, work) if spec.tpm else None
        m = qemu.Machine(
            self.kernel, initrd, work,
            cmdline=spec.cmdline,
            disks=[
                *(qemu.Disk(p, p.stem) for p in disks),
                qemu.Disk(report_disk, "lczfsreport", "raw"),
            ],
            tpm_state=tpm, echo=spec.echo,
        )  # fmt: skip
        prompts: list[float] = []
        try:
            m.start()
            pos = 0
            if late:
                started = m.expect(r"Start(ing|ed) [^\n]*lczfs-unlockd", spec.timeout)
                time.sleep(spec.hotplug_delay)
                for p in late:
                    m.hotplug(qemu.Disk(p, p.stem))
                log(f"{spec.name}: hot-plugged {[p.stem for p in late]} at {m.elapsed():.1f} s")
                pos = started.end()
            for answer in spec.answers:
                match = m.expect(_prompt_rx(spec.prompt), spec.timeout, pos)
                prompts.append(m.elapsed())
                time.sleep(0.3)
                m.type(answer)
                pos = match.end()
            m.wait(spec.timeout)
        finally:
            m.close()
        seconds = m.elapsed()
        console = m.console_text()
        report = _read_report(report_disk, console)
        if report is None:
            tail = "\n".join(console.splitlines()[-40:]) or "(the console printed nothing)"
            qemu_log = (work / "qemu.log").read_text(errors="replace").strip()
            raise AssertionError(
                f"{spec.name}: no report after {seconds:.1f} s (QEMU exit status "
                f"{m.returncode}); qemu.log: {qemu_log[-2000:] or '(empty)'}\n"
                f"console {work}/console.log:\n{tail}"
            )
        source.advance(work, (*spec.disks, *spec.hotplug), tpm)
        return Result(spec, report, console, seconds, work, prompts)

    # -- sessions -------------------------------------------------------------------
    def session(
        self,
        name: str,
        workdir: Path,
        disks: Mapping[str, str | None],
        *,
        tpm: bool = False,
        secrets: Callable[[Path], None] | None = None,
    ) -> Session:
        """Boots in order on the same disks and TPM: see Session."""
        return Session(self, name, workdir, disks, tpm=tpm, secrets=secrets)


class _Source(Protocol):
    """Where a boot's disks and TPM state come from, and what it leaves for the next."""

    def disk(self, name: str) -> Path: ...  # the image the boot's overlay is made on

    @property
    def tpm(self) -> Path: ...  # the swtpm state the boot starts from (copied)

    def advance(self, work: Path, disks: Sequence[str], tpm: Path | None) -> None: ...


@dataclass(frozen=True)
class _Golden:
    """Every boot from the golden disks and TPM state, nothing carried over."""

    golden: Path

    def disk(self, name: str) -> Path:
        return self.golden / f"{name}.qcow2"

    @property
    def tpm(self) -> Path:
        return self.golden / "tpm"

    def advance(self, work: Path, disks: Sequence[str], tpm: Path | None) -> None:
        pass


def _copy_tpm(source: _Source, work: Path) -> Path:
    """A copy of source's swtpm state for one boot (a directory swtpm fills if new)."""
    tpm = work / "tpm"
    shutil.rmtree(tpm, ignore_errors=True)
    if source.tpm.is_dir():
        shutil.copytree(source.tpm, tpm)
    else:
        tpm.mkdir()
    return tpm


@dataclass(frozen=True)
class OpsBoot:
    """An operations boot: stage-2 commands in a provisioning-style boot.

    The initrd is build.ops_initrd (the daemon package and its launcher
    /usr/bin/lczfs-unlockd, the whole standard library, the tools the commands
    and the checks run) with lczfs-unlockd.service masked; it runs script
    (bash, after guest/ops-lib.sh: ``step``, ``record``, ``record_file``,
    ``record_secret``, ``import_pool``, ``open_keystore``...), then exports
    the pools and powers off.  config: /etc/lczfs-unlockd.toml (None: none,
    e.g. for setup to write).  files: more initrd files (path, content, mode).
    """

    name: str
    script: Path
    disks: Sequence[str] = ("seed0",)
    tpm: bool = False
    config: str | None = None
    files: Sequence[tuple[str, bytes, int]] = ()
    cmdline: str = ""
    timeout: float = 600.0
    echo: IO[str] | None = None


@dataclass
class OpsResult:
    """What an operations boot's script recorded (guest/ops-lib.sh's lines)."""

    boot: OpsBoot
    status: str  # LCZFSOPS OK
    records: dict[str, str]
    files: dict[str, builtins.bytes]
    console: str
    seconds: float
    workdir: Path

    def rc(self, step: str) -> int:
        return int(self.records[f"{step}.rc"])

    def out(self, step: str) -> str:
        return self.files[f"{step}.out"].decode(errors="replace")

    def err(self, step: str) -> str:
        return self.files[f"{step}.err"].decode(errors="replace")

    def explain(self, step: str) -> str:
        """A step's exit status and output, for an assertion's message."""
        if f"{step}.rc" not in self.records:
            return f"{step}: not run (console {self.workdir}/console.log)"
        return (
            f"{step}: exit {self.rc(step)}\n--- stdout\n{self.out(step)}"
            f"--- stderr\n{self.err(step)}---"
        )

    def describe(self) -> str:
        return f"{self.boot.name}: operations boot {self.seconds:.1f} s, {self.status}"


class Session:
    """Several boots in order on the same disks and the same TPM state: an
    operations boot (stage-2 commands), then real test boots, each starting
    where the one before left off.

    disks: name -> None (the golden image of that name) or a size (``512M``:
    a blank disk, e.g. for ``zpool create``).  Every boot's disks are new qcow2
    overlays on the previous boot's (a chain: a boot QEMU crashed in is redone
    from the same starting point, and every step stays there to look at), and
    it gets a copy of the previous boot's swtpm state: the golden one (which
    seed0's TPM2 token is sealed to) with tpm=True, else a TPM made fresh at
    the first boot that has one.  secrets(dir) makes the session's own
    secrets (old passphrases...), given to operations boots as
    /etc/lczfs-session (the golden ones as /etc/lczfs-provision); those the
    guest made (``record_secret``) and add_secret()'s join them, and every
    test boot of the session is grepped for them all.
    """

    def __init__(
        self,
        guest: Guest,
        name: str,
        workdir: Path,
        disks: Mapping[str, str | None],
        *,
        tpm: bool = False,
        secrets: Callable[[Path], None] | None = None,
    ) -> None:
        self.guest = guest
        self.name = name
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        if secrets is not None:
            secrets(self.dir / "secrets")
        else:
            (self.dir / "secrets").mkdir()
        self._layers: dict[str, Path] = {}
        for disk, size in disks.items():
            if size is None:
                self._layers[disk] = guest.golden / f"{disk}.qcow2"
            else:
                self._layers[disk] = qemu.blank_image(self.dir / f"blank-{disk}.qcow2", size)
        self._tpm = guest.golden / "tpm" if tpm else self.dir / "tpm-fresh"
        self.files: dict[str, builtins.bytes] = {}  # what operations boots recorded, by name
        self.results: list[Result | OpsResult] = []
        self._count = 0

    @property
    def secrets(self) -> Secrets:
        """The session's secrets and the golden ones, as every boot of it is grepped for."""
        return Secrets(self.guest.secrets.dir, (self.dir / "secrets",))

    def add_secret(self, name: str, data: builtins.bytes) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"secret name {name!r}")
        (self.dir / "secrets" / name).write_bytes(data)

    def file(self, name: str) -> builtins.bytes:
        """The latest file an operations boot recorded under name (``record_file``)."""
        return self.files[name]

    # -- _Source ----------------------------------------------------------------------
    def disk(self, name: str) -> Path:
        if name not in self._layers:
            raise KeyError(f"session {self.name}: no disk {name!r} (it has {list(self._layers)})")
        return self._layers[name]

    @property
    def tpm(self) -> Path:
        return self._tpm

    def advance(self, work: Path, disks: Sequence[str], tpm: Path | None) -> None:
        for d in disks:
            self._layers[d] = work / f"{d}.qcow2"
        if tpm is not None:
            self._tpm = tpm

    # -- boots --------------------------------------------------------------------------
    def _workdir(self, name: str) -> Path:
        self._count += 1
        work = self.dir / f"{self._count:02d}-{name}"
        work.mkdir()
        return work

    def boot(self, spec: Boot) -> Result:
        """A real test boot (Guest.boot) on the disks the previous boot left."""
        result = self.guest.boot(spec, self._workdir(spec.name), session=self)
        self.results.append(result)
        return result

    def ops(self, spec: OpsBoot) -> OpsResult:
        """An operations boot on the disks the previous boot left."""
        work = self._workdir(spec.name)
        initrd = work / "ops.img"
        base = build.ops_initrd(self.guest.root).read_bytes()
        initrd.write_bytes(cpio.append(base, self.ops_overlay(spec)))

        def keep_crash_logs() -> None:
            n = len(list(work.glob("crashed*-qemu.log"))) + 1
            for f in ("console.log", "qemu.log"):
                if (work / f).exists():
                    (work / f).rename(work / f"crashed{n}-{f}")

        result = qemu.retry_on_crash(
            spec.name, lambda: self._ops_once(spec, initrd, work), keep_crash_logs
        )
        self.results.append(result)
        return result

    def ops_overlay(self, spec: OpsBoot) -> builtins.bytes:
        """What an operations boot appends to build.ops_initrd."""
        a = cpio.Archive()
        build.poweroff_links(a)
        # The daemon is in this initrd for its package and launcher only.
        a.symlink("etc/systemd/system/lczfs-unlockd.service", "/dev/null")
        a.copy(GUEST_DIR / "ops.sh", "usr/lib/lczfs-test/ops.sh", 0o755)
        a.copy(GUEST_DIR / "ops-lib.sh", "usr/lib/lczfs-test/ops-lib.sh", 0o644)
        a.copy(spec.script, "usr/lib/lczfs-test/scenario.sh", 0o644)
        unit = "lczfs-test-ops.service"
        a.copy(GUEST_DIR / unit, f"usr/lib/systemd/system/{unit}", 0o644)
        a.symlink(
            f"etc/systemd/system/initrd.target.wants/{unit}", f"/usr/lib/systemd/system/{unit}"
        )
        for src, dest in ((self.guest.secrets.dir, "lczfs-provision"),
                          (self.dir / "secrets", "lczfs-session")):  # fmt: skip
            if src.is_dir():
                for p in sorted(src.iterdir()):
                    a.copy(p, f"etc/{dest}/{p.name}", 0o400)
        if spec.config is not None:
            a.file("etc/lczfs-unlockd.toml", spec.config, 0o644)
        for path, data, mode in spec.files:
            a.file(path, data, mode)
        return a.to_bytes()

    def _ops_once(self, spec: OpsBoot, initrd: Path, work: Path) -> OpsResult:
        disks = [qemu.overlay_image(self.disk(d), work / f"{d}.qcow2") for d in spec.disks]
        report = qemu.raw_image(work / "report.raw", 32 * 1024 * 1024)
        tpm = _copy_tpm(self, work) if spec.tpm else None
        m = qemu.Machine(
            self.guest.kernel, initrd, work,
            cmdline=spec.cmdline,
            disks=[*(qemu.Disk(p, p.stem) for p in disks), qemu.Disk(report, "lczfsreport", "raw")],
            tpm_state=tpm, echo=spec.echo,
        )  # fmt: skip
        try:
            m.start()
            m.wait(spec.timeout)
        except qemu.BootTimeout as e:
            tail = "\n".join(m.console_text().splitlines()[-80:])
            raise qemu.BootTimeout(
                f"{spec.name}: operations boot: {e}; console {work}/console.log:\n{tail}"
            ) from None
        finally:
            m.close()
        text = report.read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        (work / "ops-report.txt").write_text(text)
        status = text.split("\n", 1)[0]
        if status != "LCZFSOPS OK":
            tail = "\n".join(m.console_text().splitlines()[-80:])
            raise AssertionError(
                f"{spec.name}: operations boot {status or 'wrote no report'} after "
                f"{m.elapsed():.1f} s; report {work}/ops-report.txt, "
                f"console {work}/console.log:\n{tail}"
            )
        records, files, made = _parse_report_lines(text)
        for name, data in made.items():
            self.add_secret(name, data)
        self.files.update(files)
        self.advance(work, spec.disks, tpm)
        return OpsResult(spec, status, records, files, m.console_text(), m.elapsed(), work)


def _prompt_rx(pattern: str) -> str:
    # The console agent prints the prompt without a newline; match it at the
    # end of what has arrived so far.
    return pattern if "(?m)" in pattern else "(?m)" + pattern


def _read_report(path: Path, console: str) -> dict[str, Any] | None:
    data = path.read_bytes()
    if data.startswith(b"LCZFSREPORT1 "):
        header, _, rest = data.partition(b"\n")
        size = int(header.split()[1])
        return json.loads(rest[:size])  # type: ignore[no-any-return]
    begin = console.find("LCZFSREPORT-BEGIN\n")
    end = console.find("\nLCZFSREPORT-END")
    if begin >= 0 and end > begin:
        return json.loads(console[begin + len("LCZFSREPORT-BEGIN\n") : end])  # type: ignore[no-any-return]
    return None


def toml_config(
    *,
    pool: str = "rpool",
    devices: Sequence[str] = (),
    datasets: str | Sequence[str] = "auto",
    online_grace: str = "10s",
    timeout: str = "2min",
    volume: str = "rpool/volumes/bootsecrets",
    unlock: Sequence[str] = ("token", "keyfile", "passphrase"),
    keyfile: str | None = None,
    tries: int = 3,
    prompt_timeout: str = "0",
    token_timeout: str = "30s",
    mask: Sequence[str] = (),
    pool_guid: int | None = None,
    partition: int = 1,
    name: str = "secretsroot",
    mountpoint: str = "/bootsecrets",
    measure_pcr: int | bool | None = None,
    tpm2_signature: str | None = None,
    tpm2_pcrlock: str | None = None,
) -> str:
    """The daemon's config file, in the documented format.

    partition, name and mountpoint are the keystore's (its partition on the
    zvol, the device-mapper name, where it is mounted); measure_pcr,
    tpm2_signature and tpm2_pcrlock are left out when None (the daemon's
    defaults).
    """

    def q(v: object) -> str:
        return json.dumps(v)  # TOML basic strings/arrays are JSON-compatible here

    lines = [
        f"pool = {q(pool)}",
        f"devices = {q(list(devices))}",
        'dev_nodes = "/dev/disk/by-id"',
        "force_import = false",
        f"online_grace = {q(online_grace)}",
        f"timeout = {q(timeout)}",
        f"datasets = {q(datasets if isinstance(datasets, str) else list(datasets))}",
        f"mask = {q(list(mask))}",
        *([f"pool_guid = {q(str(pool_guid))}"] if pool_guid is not None else []),
        "",
        "[keystore]",
        f"volume = {q(volume)}",
        f"partition = {partition}",
        f"name = {q(name)}",
        f"mountpoint = {q(mountpoint)}",
        f"unlock = {q(list(unlock))}",
    ]
    if keyfile:
        lines.append(f"keyfile = {q(keyfile)}")
    lines += [
        f"tries = {tries}",
        f"prompt_timeout = {q(prompt_timeout)}",
        f"token_timeout = {q(token_timeout)}",
    ]
    if measure_pcr is not None:
        lines.append(f"measure_pcr = {q(measure_pcr)}")  # JSON false/15 are TOML too
    if tpm2_signature is not None:
        lines.append(f"tpm2_signature = {q(tpm2_signature)}")
    if tpm2_pcrlock is not None:
        lines.append(f"tpm2_pcrlock = {q(tpm2_pcrlock)}")
    return "\n".join(lines) + "\n"
