"""The plugin keeps a CPU process's heap from growing by freed activation-size blocks (glibc only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lightning_qlora.quantization import cpu_caching_allocator
from lightning_qlora.quantization.cpu_allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")

# A 16 MiB block freed (which raises glibc's dynamic threshold to 16 MiB), then 50 blocks of 4 MiB: without
# the limit glibc serves them from its heap (which fragments and keeps what it cannot trim); with it they
# are mapped (or come from the caching allocator) and what is freed goes back to the OS. Whether a plain
# heap can trim depends on where small blocks of the imports happened to land, so the test reads where
# the blocks came from (`mallinfo2`: the heap's size), not how much a plain heap kept.
CHURN = textwrap.dedent(
    """
    import ctypes, json, sys, torch
    from lightning_qlora.quantization.cpu_allocator import heap_growth_limit, start_lean_cpu_memory

    MIB = 1 << 20

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def rss_anon_mib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

    if sys.argv[1] == "limit":
        start_lean_cpu_memory()
    big = torch.ones(4 * MIB)  # 16 MiB
    del big
    heap_before, anon_before = libc.mallinfo2().arena / MIB, rss_anon_mib()
    blocks = [torch.ones(MIB) for _ in range(50)]  # 200 MiB
    heap_growth = libc.mallinfo2().arena / MIB - heap_before
    del blocks
    print(json.dumps({"heap_growth": heap_growth, "anon_left": rss_anon_mib() - anon_before,
                      "limit": heap_growth_limit()}))
    """
)


def run(mode: str, env: dict[str, str] | None = None) -> dict[str, float | None]:
    proc = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, **(env or {})},
    )
    result: dict[str, float | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_limiting_heap_growth_returns_freed_blocks_to_the_os() -> None:
    plain, limited = run("plain"), run("limit")
    assert plain["limit"] is None and limited["limit"] == 1 << 20
    assert plain["heap_growth"] is not None and limited["heap_growth"] is not None
    assert plain["heap_growth"] > 150  # glibc's heap served the 200 MiB
    assert limited["heap_growth"] < 10  # mapped, or the caching allocator's
    # Freed, they went back to the OS but for what the caching allocator keeps (at most 64 MiB).
    assert limited["anon_left"] is not None
    assert limited["anon_left"] < cpu_caching_allocator.CACHE_BYTES / (1 << 20) + 16


def test_a_threshold_set_in_the_environment_wins() -> None:
    assert run("limit", {"MALLOC_MMAP_THRESHOLD_": "131072"})["limit"] is None


# Both places that set the limit, each in a fresh process: the plugin at setup, `load_quantized` before
# reading (so loading's temporaries never fill the heap that training then reuses).
SETTER_PRELUDE = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from lightning_qlora import QLoRAPrecision, load_quantized
    from lightning_qlora.quantization.cpu_allocator import heap_growth_limit
    from lightning_qlora.quantization.cpu_caching_allocator import installed, stats
    on = sys.argv[1] == "on"
    """
)
SETTERS = {
    "plugin": """
        plugin = QLoRAPrecision(compute_dtype="float32", log_report=False, limit_cpu_heap=on)
        plugin.connect(plugin.convert_module(nn.Sequential(nn.Linear(64, 64))), [], [])
        """,
    "load_quantized": """
        model = nn.Sequential(nn.Linear(64, 64))
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        load_quantized(model, state, limit_cpu_heap=on)
        """,
}


@pytest.mark.parametrize("setter", sorted(SETTERS))
def test_it_is_set_on_cpu_unless_told_not_to(setter: str) -> None:
    """The threshold and, where a C++ compiler can build it, the caching allocator: the plugin holds it
    until its teardown (not called here), `load_quantized` for the load only (then `stats()` shows it ran)."""
    code = SETTER_PRELUDE + textwrap.dedent(SETTERS[setter])
    code += "print(heap_growth_limit(), installed(), stats() is not None)\n"
    built = cpu_caching_allocator.compiler() is not None
    held = built and setter == "plugin"
    for flag, expected in (("on", f"{1 << 20} {held} {built}"), ("off", "None False False")):
        proc = subprocess.run(
            [sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=300, check=True
        )
        assert proc.stdout.strip().splitlines()[-1] == expected, proc.stderr[-2000:]


def test_load_quantized_refuses_a_non_bool_limit() -> None:
    from torch import nn

    from lightning_qlora import load_quantized

    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="load_quantized limit_cpu_heap must be True or False, got 'yes'"):
        load_quantized(model, dict(model.state_dict()), limit_cpu_heap="yes")  # type: ignore[arg-type]
    assert isinstance(model[0], nn.Linear)  # refused before anything was replaced
