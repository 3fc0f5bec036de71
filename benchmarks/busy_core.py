"""A busy neighbour for speed benchmarks: one process spinning on one core while a configuration runs.

Why: a laptop always runs something else. A training step that spreads every layer over all cores waits,
at every parallel region, for its slowest thread, and a thread that shares its core with another program
runs at half speed or waits a scheduler slice. How much a configuration slows down beside one busy core
(busy / quiet s/step) is what users feel; measured side by side, it compares code paths fairly.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

LOADS = ("quiet", "busy")
# Pins itself to the given core, then spins until killed or orphaned (a benchmark killed mid-run leaves no
# spinner behind): pure CPU, no memory traffic to speak of.
_SPINNER = (
    "import os, sys\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(1000000):\n"
    "        pass\n"
)


def default_core() -> int:
    """The highest-numbered core this process may run on (the one a spinner takes)."""
    return max(os.sched_getaffinity(0))


@contextlib.contextmanager
def busy_core(core: int | None) -> Iterator[int | None]:
    """Run a spinning process pinned to `core` for the duration of the block; `None`: nothing (quiet)."""
    if core is None:
        yield None
        return
    if core not in os.sched_getaffinity(0):
        raise ValueError(
            f"busy_core: core {core} is not one this process may use ({sorted(os.sched_getaffinity(0))})."
        )
    spinner = subprocess.Popen([sys.executable, "-c", _SPINNER, str(core)])
    try:
        yield spinner.pid
    finally:
        spinner.kill()
        spinner.wait()
