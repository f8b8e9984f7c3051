"""pyzfs with its C declarations parsed ahead of time.

pyzfs declares its C API with ``cffi.FFI.cdef()`` when ``libzfs_core`` is
imported: pycparser parses ~250 lines of C on every boot (1.4 s under QEMU
TCG, plus 2.3 s for the first call).  cffi's *out-of-line ABI mode* does
that parse once, at build time, and writes a small Python module holding the
parsed types, loaded by cffi's C backend alone (no pycparser, no ``cffi``
Python package at run time).

* build time: ``python3 -m lczfs_unlockd.pyzfs_ffi OUT.py`` reads pyzfs's own
  ``CDEF`` strings (whatever pyzfs version is installed) and writes
  ``OUT.py`` — installed as ``lczfs_unlockd/_pyzfs_ffi.py`` by the dracut
  module and the Nix package;
* run time: :func:`preload` puts ready ``libzfs_core.bindings.*`` modules in
  ``sys.modules`` so that ``import libzfs_core`` uses them.  Without the
  generated module it returns False and pyzfs parses as usual.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import types
from typing import Any

MODULES = ("libnvpair", "libzfs_core")  # pyzfs's bindings, in its own order


def _bindings_dir() -> str:
    spec = importlib.util.find_spec("libzfs_core")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("OpenZFS's pyzfs (module libzfs_core) is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "bindings")


def _cdef(name: str) -> str:
    namespace: dict[str, Any] = {}
    with open(os.path.join(_bindings_dir(), f"{name}.py"), encoding="utf-8") as f:
        exec(compile(f.read(), f.name, "exec"), namespace)  # noqa: S102 - pyzfs's own declarations
    return str(namespace["CDEF"])


def generate(path: str) -> None:
    import cffi  # type: ignore[import-untyped,unused-ignore]

    builder = cffi.FFI()
    for name in MODULES:
        builder.cdef(_cdef(name))
    builder.set_source("lczfs_unlockd._pyzfs_ffi", None)
    builder.emit_python_code(path)


class _LazyLibrary:
    """pyzfs's LazyLibrary: dlopen() on first use, by full soname/path."""

    def __init__(self, ffi: Any, libname: str) -> None:
        self._ffi = ffi
        self._libname = libname
        self._lib: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    self._lib = self._ffi.dlopen(self._libname)
        return getattr(self._lib, name)


def preload(libraries: dict[str, str]) -> bool:
    """Make ``import libzfs_core`` use the pre-parsed declarations.

    ``libraries`` maps "libnvpair"/"libzfs_core" to the name dlopen() gets.
    """
    if "libzfs_core.bindings" in sys.modules:
        return False
    try:
        from ._pyzfs_ffi import ffi  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    package = types.ModuleType("libzfs_core.bindings")
    package.__path__ = [_bindings_dir()]
    for name in MODULES:
        module = types.ModuleType(f"libzfs_core.bindings.{name}")
        module.ffi = ffi  # type: ignore[attr-defined]
        module.lib = _LazyLibrary(ffi, libraries[name])  # type: ignore[attr-defined]
        module.LIBRARY = libraries[name]  # type: ignore[attr-defined]
        sys.modules[module.__name__] = module
        setattr(package, name, module)
    sys.modules[package.__name__] = package
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m lczfs_unlockd.pyzfs_ffi OUTPUT.py")
    generate(sys.argv[1])
