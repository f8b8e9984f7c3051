"""Every program the project's host-side scripts call is installed by scripts/setup-host.

bench/run failed on a fresh machine with ``FileNotFoundError: 'cpio'``
because nothing installed cpio (issue 14, item 1).  This test finds the
external programs the scripts call — argv literals in the Python (ast), the
commands of the shell scripts — resolves each on this host, asks dpkg which
package owns it, and checks that package is in what ``scripts/setup-host``
would install on a machine with nothing installed (``apt-get -s`` against an
empty dpkg status, the same arguments ``--check-fresh`` uses), or is part of
every Debian system (Priority: required, or Essential).

Host side only: files under a ``guest/`` directory run inside the QEMU guest,
whose packages come from tests/vm/guest/rootfs.sh.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# tests/vm/guest/rootfs.sh is the exception among guest/ files: build.py runs it
# on the host (debootstrap, then chroot for everything inside the tree).
SHELL_SCRIPTS = ["scripts/setup-host", "run-tests", "demo", ".ci/run", "tests/vm/guest/rootfs.sh"]
# What a fresh Debian machine's root has on its PATH (no /usr/local, no pyenv).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PYTHON_GLOBS = [
    "bench/*.py", "bench/run", "tests/vm/lczfsvm/*.py", "tests/vm/demo",
    "tests/integration/test_tpm2.py",  # swtpm, tpm2-tools
]  # fmt: skip

# Shell builtins and keywords (bash(1) SHELL BUILTIN COMMANDS, RESERVED WORDS):
# never an installed program.  Nothing else belongs here.
_BUILTIN_WORDS = """. : [ [[ ]] alias bg break builtin case cd command continue declare do done echo elif
    else esac eval exec exit export false fi for function getopts hash if in jobs kill let
    local mapfile popd printf pushd pwd read readarray readonly return select set shift
    shopt source test then time trap true type typeset ulimit umask unalias unset until wait
    while { } ! ;; ( )"""
BUILTINS = frozenset(_BUILTIN_WORDS.split())
# Words that run the next word as the command.
PREFIXES = frozenset({"exec", "command", "builtin", "time", "!", "sudo", "nice", "env"})


# --- what the scripts call ----------------------------------------------------------

_RUNNERS = re.compile(r"(run|Popen|call|check_call|check_output|run_\w+|_run)$")
_ARGV_NAMES = re.compile(r"(args|argv|cmd|command)$")
_PROGRAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*|/[^\s]+")


def _callee(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _argv_program(node: ast.AST) -> str | None:
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def python_programs(source: str) -> set[str]:
    """argv[0] of every literal command line: run([...]), Popen([...]), args = [...]."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        candidates: list[ast.AST] = []
        if isinstance(node, ast.Call):
            name = _callee(node)
            if _RUNNERS.search(name):
                candidates += node.args[:1] + [k.value for k in node.keywords if k.arg == "args"]
            if name == "which" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and _ARGV_NAMES.search(t.id) for t in targets):
                candidates.append(node.value)  # type: ignore[arg-type]
        for candidate in candidates:
            program = _argv_program(candidate)
            if program is None:
                continue
            found.add(program)
            # bash -c "literal script": its commands too.
            elts = candidate.elts  # type: ignore[attr-defined]
            if program in ("bash", "sh") and len(elts) > 2:
                flag, script = elts[1], elts[2]
                if (
                    isinstance(flag, ast.Constant)
                    and flag.value == "-c"
                    and isinstance(script, ast.Constant)
                    and isinstance(script.value, str)
                ):
                    found |= shell_programs(script.value)
    return {p for p in found if _PROGRAM.fullmatch(p)}


def _logical_lines(text: str) -> Iterable[str]:
    """Lines with continuations joined, comments and here-document bodies removed."""
    heredoc: str | None = None
    in_array = False
    pending = ""
    for raw in text.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if in_array:  # the words of a multi-line NAME=( ... ) are data
            in_array = ")" not in re.sub(r"#.*$", "", raw)
            continue
        if re.fullmatch(r"\s*\w+=\([^)]*", re.sub(r"\s#.*$", "", raw)):
            in_array = True
            continue
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        match = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if match:
            heredoc = match[1]
        yield re.sub(r"(^|\s)#.*$", "", line)


def shell_programs(text: str) -> set[str]:
    """The command word of every simple command of a bash script."""
    functions = set(re.findall(r"^\s*(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\)", text, re.M))
    found: set[str] = set()
    for line in _logical_lines(text):
        # Quoted strings hold no commands, except a "$(...)" in double quotes.
        line = re.sub(r"'[^']*'", "''", line)
        line = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: m[0] if "$(" in m[0] else '""', line)
        line = re.sub(r"\b\w+=\([^)]*\)", " ", line)  # NAME=(array words)
        line = re.sub(r"\d*(?:>>|>|<)&?\d*", " ", line)  # redirections, 2>&1
        for part in re.split(r"\|\||&&|[;|&`]|\$\(|\(|\)|\bthen\b|\bdo\b|\belse\b", line):
            words = part.split()
            while words and (
                re.fullmatch(r"\w+=\S*", words[0]) or words[0] in PREFIXES or words[0] in BUILTINS
            ):
                if words[0] not in PREFIXES and not re.fullmatch(r"\w+=\S*", words[0]):
                    break  # a builtin: its arguments are not commands
                words.pop(0)
            if not words:
                continue
            word = words[0]
            if (
                word in BUILTINS
                or word in functions
                or not _PROGRAM.fullmatch(word)
                or word.endswith(")")
                or ("/" in word and not word.startswith("/"))  # the project's own files
            ):
                continue
            found.add(word)
    return found


def host_programs() -> dict[str, set[str]]:
    """program -> the scripts that call it."""
    users: dict[str, set[str]] = {}
    for name in SHELL_SCRIPTS:
        for program in shell_programs((ROOT / name).read_text()):
            users.setdefault(program, set()).add(name)
    for pattern in PYTHON_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            if "guest" in path.relative_to(ROOT).parts:
                continue
            for program in python_programs(path.read_text()):
                users.setdefault(program, set()).add(str(path.relative_to(ROOT)))
    return users


# --- what setup-host installs -------------------------------------------------------


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=env, **kw)  # type: ignore[call-overload, no-any-return]


@cache
def fresh_install() -> frozenset[str]:
    """Package names a fresh Debian machine gets from scripts/setup-host."""
    listed = _run([str(ROOT / "scripts/setup-host"), "--list"], cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    packages = listed.stdout.split()
    empty = ROOT / ".pytest-empty-dpkg-status"
    try:
        empty.write_text("")
        result = _run(
            ["apt-get", "-s", "-o", f"Dir::State::status={empty}",
             "install", "--no-install-recommends", *packages]
        )  # fmt: skip
    finally:
        empty.unlink(missing_ok=True)
    assert result.returncode == 0, f"the package set does not resolve:\n{result.stderr}"
    installed = set(re.findall(r"^Inst (\S+)", result.stdout, re.M))
    return frozenset(installed | {p.split("/")[0] for p in packages})


@cache
def _owner(path: str) -> str | None:
    candidates = [path, os.path.realpath(path)]
    for p in list(candidates):  # merged /usr: dpkg knows one spelling only
        if p.startswith("/usr/"):
            candidates.append(p[len("/usr") :])
        else:
            candidates.append("/usr" + p)
    for p in candidates:
        result = _run(["dpkg", "-S", p])
        if result.returncode == 0:
            line = next(iter(result.stdout.splitlines()), "")
            if not line.startswith("diversion "):
                return line.split(":", 1)[0].split(",")[0].strip()
    return None


@cache
def _always_there(package: str) -> bool:
    result = _run(["dpkg-query", "-W", "-f=${Priority} ${Essential}", package])
    return result.returncode == 0 and (
        result.stdout.startswith("required") or result.stdout.endswith("yes")
    )


def problems(users: dict[str, set[str]]) -> list[str]:
    found = []
    for program, scripts in sorted(users.items()):
        where = ", ".join(sorted(scripts))
        path = program if program.startswith("/") else shutil.which(program, path=SYSTEM_PATH)
        if path is None or not os.path.exists(path):
            found.append(f"{program} ({where}): not found on this host, and nothing installs it")
            continue
        package = _owner(path)
        if package is None:
            found.append(f"{program} ({where}): {path} belongs to no Debian package")
        elif package not in fresh_install() and not _always_there(package):
            found.append(
                f"{program} ({where}): {path} is in package {package}, which scripts/setup-host "
                "does not install (add it to its list or to tests/vm/host-packages.txt)"
            )
    return found


needs_debian = pytest.mark.skipif(
    shutil.which("dpkg") is None or shutil.which("apt-get") is None, reason="needs dpkg and apt"
)


# --- the tests ----------------------------------------------------------------------


def test_the_scripts_calls_are_found():
    """The extraction itself: the programs item 1 was about, and the usual ones."""
    users = host_programs()
    for program in ("cpio", "zstd", "readelf", "qemu-img", "qemu-system-x86_64", "swtpm",
                    "unshare", "apt-get", "dpkg-query", "debootstrap",
                    "swtpm_setup", "tpm2_pcrread", "tpm2_getcap"):  # fmt: skip
        assert program in users, sorted(users)
    assert "installed" not in users  # a function of setup-host
    assert not any(p.startswith(("scripts/", ".venv/")) for p in users)


@needs_debian
def test_every_program_the_scripts_call_is_installed_by_setup_host():
    assert problems(host_programs()) == []


# Programs often on a developer's machine, from packages a fresh one does not get.
_ELSEWHERE = ("strace", "jq", "tmux", "lsof", "make", "gcc", "curl", "wget", "file", "less")


def _installed_but_not_provided() -> str | None:
    """A program on this host whose package setup-host does not install, if any."""
    for program in _ELSEWHERE:
        path = shutil.which(program, path=SYSTEM_PATH)
        package = _owner(path) if path else None
        if package and package not in fresh_install() and not _always_there(package):
            return program
    return None


@needs_debian
@pytest.mark.parametrize(
    ("kind", "template"),
    [
        ("shell", "#!/usr/bin/env bash\nset -e\n{} --help 2>&1 | grep -q x || true\n"),
        ("shell", "#!/usr/bin/env bash\nif true; then exec {} -x; fi\n"),
        ("python", "import subprocess\nsubprocess.run(['{}', '-x'], check=True)\n"),
        ("python", "import subprocess\nargs = ['{}', 'status']\nsubprocess.run(args, check=False)\n"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("where", ["nowhere", "elsewhere"])
def test_a_program_nobody_installs_is_reported(kind, template, where):
    program = "lczfs-no-such-program"
    if where == "elsewhere":
        found = _installed_but_not_provided()
        if found is None:
            pytest.skip("no program of a package setup-host does not install on this host")
        program = found
    script = template.format(program)
    extracted = python_programs(script) if kind == "python" else shell_programs(script)
    assert program in extracted
    (problem,) = problems({program: {"example"}})
    assert problem.startswith(f"{program} (example): ")
    if where == "nowhere":
        assert "not found on this host, and nothing installs it" in problem
    else:
        assert "which scripts/setup-host does not install" in problem


def test_shell_extraction_ignores_builtins_functions_heredocs_and_strings():
    script = """#!/usr/bin/env bash
set -euo pipefail
helper() { printf '%s\\n' "$1"; }
cat > /tmp/x <<SRC
notacommand --flag
SRC
if [ -f x ] && ! grep -q y x; then echo "mkfs.ext4 in a string"; fi
out=$(apt-get -s install foo 2>&1) || true
X=1 sort -u file | awk '{print $1; system("rm -rf /")}'
case $1 in --list) exec tr a b ;; esac
"""
    assert shell_programs(script) == {"cat", "grep", "apt-get", "sort", "awk", "tr"}


@needs_debian
def test_the_fresh_machine_of_issue_14_is_caught(monkeypatch):
    """Before cpio, zstd and binutils were added, bench/size.py's calls were reported."""
    before = fresh_install() - {"cpio", "zstd", "binutils"}
    monkeypatch.setattr("tests.integration.test_host_packages.fresh_install", lambda: before)
    users = host_programs()
    reported = {p.split(" ", 1)[0] for p in problems(users)}
    assert {"cpio", "zstd", "readelf"} <= reported
