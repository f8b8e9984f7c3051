"""The package's import graph: every import between its modules goes downward.

Parsed from the source (``ast``), so a new module or a new import that does
not fit the layers fails here, naming the edge.  Reading the layers top to
bottom is reading the design: the command line wires real adapters into
the sequence; the sequence runs the steps; the steps talk only to the
ports; adapters talk to the machine and import only small helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lczfs_unlockd"

# Top to bottom.  A module may import modules of lower layers only — and
# within its layer only where ALSO_SAME_LAYER says so.
LAYERS: list[tuple[str, set[str]]] = [
    ("entry", {"__main__"}),
    ("command line", {"cli"}),
    # The operations commands of the running system: they build adapters too.
    ("operations", {"ops_setup", "ops_status", "ops_enroll", "ops_arm"}),
    ("operations helpers", {"ops_common"}),
    ("sequence", {"sequence"}),
    ("teardown", {"teardown"}),
    ("steps", {"pool", "keystore", "mount", "keys", "rootcheck"}),
    ("measurement", {"measure"}),
    ("step context", {"context"}),
    (
        "adapters",
        {
            "zpool",
            "zfskeys",
            "cryptsetup",
            "filesystem",
            "units",
            "askpass",
            "notify",
            "tpm2",
            "luksadmin",
        },
    ),
    ("pure helpers", {"config", "report", "keyformat", "unitnames", "tpm2policy"}),
    ("low-level", {"process", "libc", "pyzfs_ffi"}),
    ("logging", {"log"}),
    ("leaves", {"errors", "ports", "paths", "secretbuf", "text", "__init__"}),
]
# What an adapter may import: the ports it implements, the errors it raises
# and the small low-level helpers -- never config, a step or another adapter.
ADAPTER_MAY_IMPORT = {
    "ports", "errors", "process", "libc", "pyzfs_ffi", "paths", "secretbuf", "log", "text",
}  # fmt: skip
# What a step may import besides lower steps: never an adapter.
STEP_MAY_IMPORT = {
    "context", "config", "errors", "ports", "report", "keyformat", "unitnames",
    "secretbuf", "log", "paths", "text",
}  # fmt: skip
# Modules that import nothing of the package at all.
LEAVES = {"errors", "ports", "secretbuf", "text", "unitnames"}
# Written at build time, imported if present: paths.py's absolute paths,
# pyzfs_ffi's pre-parsed declarations.
GENERATED = {"_build_paths", "_pyzfs_ffi"}


def _layer_of() -> dict[str, int]:
    return {m: i for i, (_, modules) in enumerate(LAYERS) for m in modules}


def package_imports(path: Path) -> set[str]:
    """Names of the package's modules that ``path`` imports (anywhere in it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "lczfs_unlockd":
                    rest = node.module.split(".")[1:]
                    found |= {rest[0]} if rest else {a.name for a in node.names}
                continue
            if node.level != 1:
                raise AssertionError(f"{path.name}: relative import beyond the package")
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # "from . import x": a module, or a name of __init__.py
                found |= {
                    a.name if (path.parent / f"{a.name}.py").exists() else "__init__"
                    for a in node.names
                }
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lczfs_unlockd" and len(parts) > 1:
                    found.add(parts[1])
    return found - GENERATED


def modules() -> dict[str, set[str]]:
    return {
        p.stem: package_imports(p)
        for p in sorted(PACKAGE.glob("*.py"))
        if p.stem not in GENERATED  # a packaged tree has them (Nix's check phase)
    }


def violations(graph: dict[str, set[str]]) -> list[str]:
    layer = _layer_of()
    out = []
    for module, imported in graph.items():
        if module not in layer:
            out.append(f"{module}.py is in no layer: add it to LAYERS in {Path(__file__).name}")
            continue
        for target in sorted(imported):
            if target not in layer:
                out.append(f"{module} imports {target}, which is in no layer")
            elif layer[target] <= layer[module]:
                out.append(
                    f"{module} ({LAYERS[layer[module]][0]}) imports {target} "
                    f"({LAYERS[layer[target]][0]}): not downward"
                )
            elif module in LAYERS[layer["zpool"]][1] and target not in ADAPTER_MAY_IMPORT:
                out.append(f"adapter {module} imports {target}: adapters import only helpers")
            elif (
                module in LAYERS[layer["pool"]][1] | {"context", "teardown", "sequence"}
                and target not in STEP_MAY_IMPORT
                and layer[target] >= layer["zpool"]
                and target not in LAYERS[layer["pool"]][1]
            ):
                out.append(f"{module} imports {target}: the steps talk to ports, not adapters")
        if module in LEAVES and imported:
            out.append(f"{module} must import nothing of the package, imports {sorted(imported)}")
    return out


def test_every_import_goes_downward():
    assert violations(modules()) == []


def test_only_the_command_line_builds_adapters():
    adapters = LAYERS[_layer_of()["zpool"]][1]
    importers = {m for m, imported in modules().items() if imported & adapters}
    # Adapters are built in cli.py (and, in the running system, by the
    # operations commands); an adapter may use no other adapter.
    assert importers <= {"cli", *LAYERS[_layer_of()["ops_setup"]][1], "ops_common"}
    assert "cli" in importers


def test_sequence_reads_like_the_boot():
    """The steps are entered in boot order in sequence.run."""
    text = (PACKAGE / "sequence.py").read_text()
    order = [
        text.index(call)
        for call in (
            "teardown.mask_at_end(",
            "pool.import_pool(",
            "keystore.open_keystore(",
            "mount.mount_keystore(",
            "keys.load_keys(",
            "rootcheck.check_root(",
            "teardown.verify(",
        )
    ]
    assert order == sorted(order)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"errors": {"config"}}, "errors (leaves) imports config (pure helpers): not downward"),
        ({"keys": {"zpool"}}, "keys imports zpool: the steps talk to ports, not adapters"),
        ({"pool": {"sequence"}}, "pool (steps) imports sequence (sequence): not downward"),
        ({"zpool": {"config"}}, "adapter zpool imports config: adapters import only helpers"),
        ({"zpool": {"notify"}}, "zpool (adapters) imports notify (adapters): not downward"),
        ({"teardown": {"zfskeys"}}, "teardown imports zfskeys: the steps talk to ports"),
        ({"newstep": set()}, "newstep.py is in no layer"),
        ({"ports": {"paths"}}, "ports must import nothing of the package"),
    ],
)
def test_the_check_catches(graph, expected):
    """The checker itself: each kind of wrong edge is reported."""
    assert any(expected in v for v in violations(graph)), violations(graph)


def test_parser_sees_every_import_form(tmp_path):
    for name in "abdh":
        (tmp_path / f"{name}.py").touch()
    source = tmp_path / "m.py"
    source.write_text(
        "from . import a, b as c, __version__\nfrom .d import x\nimport lczfs_unlockd.e\n"
        "from lczfs_unlockd import f\nfrom lczfs_unlockd.g import y\n"
        "def late():\n    from .h import z\n"
    )
    assert package_imports(source) == {"a", "b", "__init__", "d", "e", "f", "g", "h"}
