"""The CPU caching allocator: freed blocks come back by size, the cache stays under its cap, and every
tensor keeps its values. Each test runs in a fresh interpreter: installing it is for the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_qlora.quantization import cpu_caching_allocator

needs_compiler = pytest.mark.skipif(
    cpu_caching_allocator.compiler() is None,
    reason="no C++ compiler here: the allocator cannot be built (its fallback is tested below)",
)


@pytest.fixture(scope="module")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One build for this module, outside the user's cache."""
    return str(tmp_path_factory.mktemp("allocator-cache"))


PRELUDE = textwrap.dedent(
    """
    import json, os, sys, torch
    from lightning_qlora.quantization import cpu_caching_allocator as alloc

    MIB = 1 << 20

    def rss_anon_mib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

    if not os.environ.get("LQ_TEST_NO_INSTALL"):
        assert alloc.install(), "the allocator did not install"
    """
)


def run(cache: str, body: str, env: dict[str, str] | None = None) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XDG_CACHE_HOME": cache, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@needs_compiler
def test_a_freed_block_serves_the_next_request_of_its_size(build_cache: str) -> None:
    result = run(
        build_cache,
        """
        a = torch.full((MIB // 4,), 3.0)  # 1 MiB
        first = a.data_ptr()
        del a
        before = alloc.stats()
        b = torch.full((MIB // 4,), 5.0)
        after = alloc.stats()
        small = torch.ones(1000)  # below the minimum: not the cache's
        counts = {key: after[key] - before[key] for key in ("hits", "misses")}
        small_counted = alloc.stats()["misses"] - after["misses"]
        print(json.dumps({"same": b.data_ptr() == first, "values": bool((b == 5.0).all()), **counts,
                          "small_counted": small_counted}))
        """,
    )
    assert result == {"same": True, "values": True, "hits": 1, "misses": 0, "small_counted": 0}


@needs_compiler
def test_the_cache_stays_under_its_cap_and_returns_the_rest(build_cache: str) -> None:
    result = run(
        build_cache,
        """
        blocks = [torch.ones(MIB) for _ in range(64)]  # 64 blocks of 4 MiB: 256 MiB
        grown = rss_anon_mib()
        del blocks
        cached = alloc.stats()["cached_bytes"]
        freed = rss_anon_mib()
        huge = torch.ones(16 * MIB)  # 64 MiB: more than half the cap, never cached
        del huge
        after_huge = alloc.stats()["cached_bytes"]
        alloc.release_cached()
        print(json.dumps({"cached": cached, "returned_mib": grown - freed, "after_huge": after_huge,
                          "released": alloc.stats()["cached_bytes"], "cap": alloc.stats()["cap_bytes"]}))
        """,
    )
    cap = result["cap"]
    assert result["cached"] == cap == cpu_caching_allocator.CACHE_BYTES
    assert result["after_huge"] == cap  # the huge block went back to the OS, not into the cache
    assert result["released"] == 0
    # 256 MiB were resident; all but the cap went back to the OS when freed.
    assert isinstance(result["returned_mib"], float)
    assert result["returned_mib"] > 256 - cap / (1 << 20) - 16


@needs_compiler
def test_sizes_round_to_classes_so_a_slightly_smaller_request_reuses_a_block(build_cache: str) -> None:
    result = run(
        build_cache,
        """
        a = torch.empty(MIB // 4)  # 1 MiB
        ptr = a.data_ptr()
        del a
        b = torch.empty(MIB // 4 - 5000)  # 20 KiB less: the same class
        print(json.dumps({"same": b.data_ptr() == ptr}))
        """,
    )
    assert result == {"same": True}


@needs_compiler
def test_threads_and_a_forked_child_allocate_safely(build_cache: str) -> None:
    result = run(
        build_cache,
        """
        import threading

        def churn(seed):
            g = torch.Generator().manual_seed(seed)
            for _ in range(200):
                x = torch.randn(512, 512, generator=g)
                assert torch.equal(x * 2, x + x)

        threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        codes = []
        for _ in range(30):  # forks while the other threads allocate: a lock held at fork would hang a child
            pid = os.fork()
            if pid == 0:
                y = torch.ones(MIB) * 2
                os._exit(0 if float(y.sum()) == 2 * MIB else 1)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
        for t in threads:
            t.join()
        print(json.dumps({"children": sorted(set(codes)), "live": alloc.stats()["live_bytes"]}))
        """,
    )
    assert result["children"] == [0]
    assert result["live"] == 0  # every block handed out came back


@needs_compiler
def test_training_math_is_unchanged_by_the_allocator(build_cache: str) -> None:
    body = """
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            x = torch.randn(512, 256)
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        print(json.dumps({"loss": float(loss), "hits": (alloc.stats() or {}).get("hits", 0)}))
        """
    with_cache = run(build_cache, body)
    without = run(build_cache, body, {"LQ_TEST_NO_INSTALL": "1"})
    assert with_cache["hits"] > 0 and without["hits"] == 0
    assert with_cache["loss"] == without["loss"]


def test_without_a_compiler_it_falls_back_with_one_log_line(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from lightning_qlora.quantization import cpu_caching_allocator as alloc
        print(alloc.install(), alloc.installed(), alloc.stats())
        x = torch.ones(1 << 20)
        print(float(x.sum()))
        """
    )
    env = {**os.environ, "LIGHTNING_QLORA_CXX": "/nonexistent/c++", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["False False None", "1048576.0"]
    warnings = [line for line in proc.stderr.splitlines() if "caching allocator unavailable" in line]
    assert len(warnings) == 1 and "/nonexistent/c++" in warnings[0]


@needs_compiler
def test_impossible_and_raw_requests_behave_as_without_it(build_cache: str) -> None:
    result = run(
        build_cache,
        """
        errors = []
        for numel, dtype in ((2**63 - 1, torch.uint8), (2**62 - 1, torch.half), (2**40, torch.float32)):
            try:
                torch.empty(numel, dtype=dtype)
            except RuntimeError as err:
                errors.append(type(err).__name__)
        before = torch.randn(64, 64)  # mkldnn's scratch memory goes through raw_allocate/raw_deallocate
        for shape in ((64, 64), (512, 512)):
            x = torch.randn(*shape)
            assert torch.equal(x.to_mkldnn().to_dense(), x)
        assert torch.equal(before.to_mkldnn().to_dense(), before)
        print(json.dumps({"errors": errors, "cached": alloc.stats()["cached_bytes"] > 0}))
        """,
    )
    assert result == {"errors": ["RuntimeError"] * 3, "cached": True}


@needs_compiler
def test_the_memory_profiler_sees_its_blocks(build_cache: str) -> None:
    result = run(
        build_cache,
        """
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            x = torch.ones(MIB)  # 4 MiB, the cache's
            del x
        events = [e for e in prof.key_averages() if e.key in ("aten::ones", "aten::empty")]
        print(json.dumps({"bytes": max(e.cpu_memory_usage for e in events)}))
        """,
    )
    assert result["bytes"] == 4 << 20
