"""``python3 -m bench``: the bench's entry point (bench/run runs it; see bench/README.md)."""

import importlib.util
import sys

if importlib.util.find_spec("lczfsvm") is None:
    sys.exit(
        "bench: the VM harness (tests/vm/lczfsvm) is not on the module path: run bench/run, "
        "or PYTHONPATH=tests/vm python3 -m bench from the repository"
    )

from .cli import main

sys.exit(main())
