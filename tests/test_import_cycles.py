"""scripts/import_cycles.py: the package has no cycle of module-level imports, and the script finds one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_cycles.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_package_has_no_cycle_nor_back_arrow() -> None:
    result = run()
    assert result.returncode == 0, result.stdout + result.stderr
    counts = [line.rpartition(": ")[2] for line in result.stdout.splitlines()[1:]]
    assert counts == ["0", "0", "0", "0"], result.stdout  # not even deferred or type-checking ones


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_finds_each_kind_of_cycle(tmp_path: Path) -> None:
    package = write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/_helper.py": "from pkg.sub import c\n",  # a back arrow
            "pkg/a.py": "from . import b\n",  # relative, to a module
            "pkg/b.py": "import json\nfrom pkg.sub.c import thing\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import name\nthing = 1\n",  # relative, a name of a module
            "pkg/d.py": "def f():\n    from pkg import e\n",
            "pkg/e.py": "from pkg import d\n",
            "pkg/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import g\n",
            "pkg/g.py": "import pkg.f\n",
        },
    )
    result = run(str(package))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "pkg: 10 modules; imports of its own modules: 6 module-level, 1 function-level, 1 type-checking only"
    )
    assert lines[1:] == [
        "module-level cycles: 1",
        "  a -> b -> sub.c -> a",
        "cycles closed by function-level imports (deferred, not an error): 1",
        "  d -> e -> d",
        "cycles closed by type-checking imports (never run, not an error): 1",
        "  f -> g -> f",
        "back arrows, a shared helper (pkg._*) importing a subpackage (not an error): 1",
        "  module: _helper -> sub.c",
    ]


def test_package_without_cycles_passes(tmp_path: Path) -> None:
    package = write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": ""})
    result = run(str(package))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "module-level cycles: 0" in result.stdout


def test_refuses_a_folder_that_is_not_a_package(tmp_path: Path) -> None:
    result = run(str(tmp_path))
    assert result.returncode == 2
    assert "is not a package (no __init__.py)" in result.stderr
