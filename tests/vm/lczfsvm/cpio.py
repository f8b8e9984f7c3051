"""A minimal newc cpio writer for initrd overlays.

The kernel unpacks every archive concatenated to the initrd in order, later
files replacing earlier ones, so a test initrd is ``base.img + overlay``
without re-running dracut.  All entries are owned by root.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass, field
from pathlib import Path

_TRAILER = "TRAILER!!!"


@dataclass
class Archive:
    _entries: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self._entries.setdefault(d, (stat.S_IFDIR | 0o755, b""))

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self._entries[path.strip("/")] = (stat.S_IFDIR | mode, b"")

    def file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._parents(path)
        self._entries[path.strip("/")] = (stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self._entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode())

    def copy(self, src: Path, dst: str, mode: int | None = None) -> None:
        self.file(dst, src.read_bytes(), mode if mode is not None else src.stat().st_mode & 0o7777)

    def tree(self, src: Path, dst: str) -> None:
        """Copy a directory tree (files only), skipping __pycache__."""
        for p in sorted(src.rglob("*")):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            self.copy(p, f"{dst.rstrip('/')}/{p.relative_to(src)}")

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        ino = 1000
        # Directories first (sorted order puts parents before children).
        for name in sorted(self._entries):
            mode, data = self._entries[name]
            ino += 1
            _entry(out, name, mode, data, ino)
        _entry(out, _TRAILER, 0, b"", 0)
        pad = (-out.tell()) % 512
        out.write(b"\0" * pad)
        return out.getvalue()


def _entry(out: io.BytesIO, name: str, mode: int, data: bytes, ino: int) -> None:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = "070701" + "".join(f"{v:08X}" for v in fields)
    out.write(header.encode() + name.encode() + b"\0")
    out.write(b"\0" * ((-out.tell()) % 4))
    out.write(data)
    out.write(b"\0" * ((-out.tell()) % 4))


def read(data: bytes) -> dict[str, tuple[int, bytes]]:
    """The entries of one newc archive (as to_bytes writes it): path -> (mode, data)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"not a newc cpio header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize + (-(pos + namesize)) % 4
        if name == _TRAILER:
            return out
        out[name] = (mode, data[pos : pos + size])
        pos += size + (-(pos + size)) % 4


def append(base: bytes, overlay: bytes) -> bytes:
    """base initrd + overlay archive; the kernel needs the archive 4-byte aligned."""
    return base + b"\0" * ((-len(base)) % 4) + overlay
