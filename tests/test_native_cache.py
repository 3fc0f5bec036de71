"""Native libraries load only from the user's own files.

A library planted where the package looks for one carries a constructor that appends to a marker file:
dlopen runs it before anything else, so "the marker never appears" proves the file was never loaded. The
control (the same plant in a folder of the user's own is loaded, then rebuilt because it is not the
package's) proves the plants sit under the names the package really uses. The tests run as root here;
the ones that need another owner `chown` to an unused uid and are skipped where that cannot be done.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_qlora import _native_build
from lightning_qlora._native_build import (
    RETRY_AFTER_FAILURE_S,
    NativeBuildError,
    UnsafeCacheError,
    compile_library,
    library_path,
)
from lightning_qlora.quantization import cpu_caching_allocator
from lightning_qlora.quantization.backends import cpu_kernel
from lightning_qlora.quantization.backends.cpu_kernel import build_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
OTHER_UID = 4242  # no one on this machine: a folder or file "of another user"
CC = cpu_kernel._compiler()
CXX = cpu_caching_allocator.compiler()

needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler: nothing native is ever built here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("LQ_PLANTED_MARKER");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
/* the package's own symbols, so only the checks before loading can tell it apart */
int lq_abi_version(void) { return 999; }
int lq_simd_level(void) { return 0; }
int lq_dequantize_4bit(void) { return 0; }
int lq_alloc_abi_version(void) { return 999; }
int lq_alloc_install(long long a, long long b) { return 1; }
int lq_alloc_uninstall(void) { return 1; }
int lq_alloc_current(void) { return 1; }
void lq_alloc_stats(long long *out) { (void)out; }
void lq_alloc_release_cached(void) {}
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real shared library with a constructor, sealed exactly as the package seals its own builds."""
    assert CC is not None
    folder = tmp_path_factory.mktemp("plant")
    source = folder / "planted.c"
    source.write_text(PLANTED_C)
    library = folder / "planted.so"
    compile_library(CC, ("-shared", "-fPIC", "-O1"), source, library)
    return library


def kernel_name() -> str:
    assert CC is not None
    flags = (*cpu_kernel.BASE_FLAGS, "-march=native")
    return library_path(Path("."), "dequant4bit", cpu_kernel.SOURCE, CC, flags).name


def allocator_name() -> str:
    assert CXX is not None
    link = cpu_caching_allocator._link()
    flags = cpu_caching_allocator._flags()
    key = f"{link} {torch.__version__}"
    source = cpu_caching_allocator.SOURCE
    return library_path(Path("."), "cpu_caching_allocator", source, CXX, flags, key).name


def plant(planted: Path, folder: Path, names: list[str]) -> dict[str, bytes]:
    for name in names:
        shutil.copyfile(planted, folder / name)
        os.chmod(folder / name, 0o755)
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "planted-code-ran.txt"
    monkeypatch.setenv("LQ_PLANTED_MARKER", str(path))
    return path


def private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@needs_cc
@pytest.mark.parametrize(
    "layout",
    ["world-writable cache", "world-writable parent", "sticky cache", "cache of another uid",
     "parent of another uid"],
)  # fmt: skip
def test_a_library_planted_in_a_cache_others_can_write_is_never_loaded(
    tmp_path: Path, planted: Path, marker: Path, layout: str
) -> None:
    parent = private(tmp_path / "cache")
    cache = private(parent / "native")
    names = [kernel_name()] + ([allocator_name()] if CXX else [])
    before = plant(planted, cache, names)
    if layout.startswith("world-writable"):
        os.chmod(cache if layout.endswith("cache") else parent, 0o777)
        reason = "can be written by others"
    elif layout == "sticky cache":  # fine above a private folder, not as the cache itself
        os.chmod(cache, 0o1777)
        reason = "can be written by others"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another uid needs root")
        os.chown(cache if layout.endswith("cache") else parent, OTHER_UID, -1)
        reason = f"belongs to uid {OTHER_UID}"
    with pytest.raises(UnsafeCacheError, match=reason):
        build_kernel(cache)
    if CXX:
        with pytest.raises(UnsafeCacheError, match=reason):
            cpu_caching_allocator.build(cache)
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # nothing built or changed there


@needs_cc
@pytest.mark.parametrize("plant_as", ["symbolic link", "file of another uid", "group-writable file"])
def test_a_library_file_that_is_not_the_users_own_is_never_loaded_but_rebuilt(
    tmp_path: Path, planted: Path, marker: Path, plant_as: str
) -> None:
    cache = private(tmp_path / "cache" / "native")
    target = cache / kernel_name()
    if plant_as == "symbolic link":
        plant(planted, private(tmp_path / "elsewhere"), [target.name])
        target.symlink_to(tmp_path / "elsewhere" / target.name)
    else:
        plant(planted, cache, [target.name])
        if plant_as == "file of another uid":
            if os.geteuid() != 0:
                pytest.skip("giving a file to another uid needs root")
            os.chown(target, OTHER_UID, -1)
        else:
            os.chmod(target, 0o775)
    kernel = build_kernel(cache)
    assert not marker.exists()
    assert kernel.path == target and kernel.simd_level >= 0
    info = os.lstat(target)  # the plant was replaced by the package's own build
    assert stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022
    assert target.read_bytes() != planted.read_bytes()


@needs_cc
@pytest.mark.slow
def test_control_the_same_plant_in_the_users_own_cache_is_loaded_then_rebuilt(
    tmp_path: Path, planted: Path, marker: Path
) -> None:
    """The user's own files are trusted (the plant's constructor runs), and a library that is not the
    package's (wrong ABI) is rebuilt: the kernel's, and the allocator's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a root-owned sticky folder, like the system temporary folder
    cache = shared / "mine" / "native"  # created 0700 by the package
    names = [kernel_name()] + ([allocator_name()] if CXX else [])
    if os.geteuid() != 0:
        cache = private(tmp_path / "mine" / "native")
    else:
        _native_build.ensure_private_dir(cache)
        assert stat.S_IMODE(os.stat(shared / "mine").st_mode) == 0o700
    plant(planted, cache, names)
    kernel = build_kernel(cache)
    assert marker.read_text() == "planted code ran\n"
    assert kernel.path.name == names[0] and kernel.path.read_bytes() != planted.read_bytes()
    if CXX:
        lib = cpu_caching_allocator.build(cache)
        assert marker.read_text() == "planted code ran\n" * 2
        assert lib.lq_alloc_abi_version() == cpu_caching_allocator.ABI_VERSION
        assert (cache / names[1]).read_bytes() != planted.read_bytes()


def test_the_cache_folder_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LIGHTNING_QLORA_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    assert _native_build.configured_cache_dir() is None
    for home in ("", "/", "relative/home"):
        monkeypatch.setenv("HOME", home)
        assert _native_build.configured_cache_dir() is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _native_build.configured_cache_dir() == tmp_path / "home/.cache/lightning_qlora/native"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert _native_build.configured_cache_dir() == tmp_path / "home/.cache/lightning_qlora/native"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native_build.configured_cache_dir() == tmp_path / "xdg/lightning_qlora/native"
    monkeypatch.setenv("LIGHTNING_QLORA_CACHE", str(tmp_path / "mine"))
    assert _native_build.configured_cache_dir() == tmp_path / "mine/native"
    made = _native_build.cache_dir()
    assert made == tmp_path / "mine/native"
    for folder in (made, made.parent):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    # never created inside a folder others can write to
    shared = tmp_path / "open"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeCacheError, match="open can be written by others"):
        _native_build.ensure_private_dir(shared / "a" / "b")
    assert not (shared / "a").exists()


# HOME unset or empty, no compiler, native code turned off: a fresh process each, the pure paths.
PROBE = textwrap.dedent(
    """
    import logging
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(name)s %(message)s")
    from lightning_qlora.quantization import cpu_caching_allocator as alloc
    from lightning_qlora.quantization.backends import cpu_kernel
    print("result", cpu_kernel.kernel_available(), alloc.install(), cpu_kernel.kernel_available(),
          alloc.install())
    """
)
CASES = {
    "home-unset": ({}, "native code is not used (no cache folder: set HOME"),
    "home-empty": ({"HOME": ""}, "native code is not used (no cache folder: set HOME"),
    "no-compiler": ({"HOME": "{home}", "PATH": "{empty}"}, "no C compiler found|no C++ compiler found"),
    "disabled": ({"HOME": "{home}", "LIGHTNING_QLORA_DISABLE_NATIVE": "1"}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_a_safe_cache_or_a_compiler_there_is_no_native_code(tmp_path: Path, case: str) -> None:
    extra, expected = CASES[case]
    home, empty, tmp = (private(tmp_path / name) for name in ("home", "empty-bin", "tmp"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HOME", "XDG_CACHE_HOME", "CC", "CXX") and not key.startswith("LIGHTNING_QLORA_")
    }
    env.update({k: v.format(home=home, empty=empty) for k, v in extra.items()})
    env.update({"TMPDIR": str(tmp), "PYTHONPATH": str(REPO_ROOT)})
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "result False False False False" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("LOG WARNING lightning_qlora")]
    if expected is None:
        assert warnings == []
    elif case.startswith("home"):
        assert len(warnings) == 1 and expected in warnings[0], done.stderr  # one line for all native parts
    else:
        assert len(warnings) == 2 and all(any(e in w for e in expected.split("|")) for w in warnings)
    assert list(tmp.iterdir()) == []  # never a temporary-folder fallback
    assert not list(home.rglob("*.so")) and not list(home.rglob(".*.failed"))  # no compiler: no failure


def wrapper_compiler(
    tmp_path: Path, log: Path, fail: bool, real: str | None = CC, tag: str = "build"
) -> Path:
    """A compiler that logs each build (not `--version`) and takes a second; fails every build if asked."""
    assert real is not None
    script = tmp_path / f"{'failing' if fail else 'logging'}-{tag}"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--version*) exec {real} "$@";; esac\n'
        f"echo {tag} >> {log}\n"
        "sleep 1\n" + ("echo 'error: planted failure' >&2\nexit 1\n" if fail else f'exec {real} "$@"\n')
    )
    script.chmod(0o755)
    return script


def start_ranks(tmp_path: Path, cc: Path, count: int) -> list[subprocess.Popen[str]]:
    code = "from lightning_qlora.quantization.backends import cpu_kernel as k; print(k.kernel_available())"
    env = {**os.environ, "LIGHTNING_QLORA_CC": str(cc), "LIGHTNING_QLORA_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(count)
    ]


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[str, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append((out.strip(), err))
    return results


@needs_cc
@pytest.mark.slow
def test_ranks_starting_together_build_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    results = finish(start_ranks(tmp_path, wrapper_compiler(tmp_path, log, fail=False), 3))
    assert [out for out, _ in results] == ["True"] * 3
    assert log.read_text().splitlines() == ["build"]  # one rank built it, the others waited and loaded it
    cache = tmp_path / "cache" / "native"
    assert len(list(cache.glob("*.so"))) == 1 and not list(cache.glob(".*.tmp"))


@needs_cc
@pytest.mark.slow
def test_a_failed_build_is_remembered_not_retried_by_every_rank(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    cc = wrapper_compiler(tmp_path, log, fail=True)
    results = finish(start_ranks(tmp_path, cc, 2))
    assert [out for out, _ in results] == ["False"] * 2
    # two flag sets (-march=native, then portable), each tried by one rank only
    assert log.read_text().splitlines() == ["build"] * 2
    assert any("not tried again for 60 minutes" in err for _, err in results), results
    cache = tmp_path / "cache" / "native"
    markers = sorted(cache.glob(".*.failed"))
    assert len(markers) == 2
    for marker in markers:
        record = json.loads(marker.read_text())
        assert abs(record["time"] - time.time()) < 300 and "planted failure" in record["error"]
    # a later run does not try again ...
    with pytest.raises(NativeBuildError, match=r"failed \d+ s ago .*delete .*\.failed to try now"):
        build_kernel(cache, cc=str(cc))
    assert len(log.read_text().splitlines()) == 2
    # ... until the failure is old enough
    for marker in markers:
        record = json.loads(marker.read_text())
        marker.write_text(json.dumps({**record, "time": time.time() - RETRY_AFTER_FAILURE_S - 1}))
    with pytest.raises(NativeBuildError, match="planted failure"):
        build_kernel(cache, cc=str(cc))
    assert len(log.read_text().splitlines()) == 4


@needs_cc
@pytest.mark.slow
@pytest.mark.skipif(CXX is None, reason="no C++ compiler: the allocator is not built")
def test_a_real_ddp_fit_builds_each_library_once(tmp_path: Path) -> None:
    """Two CPU ranks (Lightning's launcher, gloo) on an empty cache: each library is compiled by one rank."""
    log = tmp_path / "builds.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")
        and not k.startswith("LIGHTNING_Q")
    }
    env["LIGHTNING_QLORA_CACHE"] = str(tmp_path / "cache")
    env["LIGHTNING_QLORA_CC"] = str(wrapper_compiler(tmp_path, log, fail=False, real=CC, tag="cc"))
    env["LIGHTNING_QLORA_CXX"] = str(wrapper_compiler(tmp_path, log, fail=False, real=CXX, tag="cxx"))
    script = REPO_ROOT / "tests" / "strategies" / "ddp_script.py"
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(out), "--max-steps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert (out / "rank0.pt").exists() and (out / "rank1.pt").exists()
    builds = log.read_text().splitlines()
    # the allocator and the 4-bit linear operator (C++): one rank built each, the other loaded it
    assert builds.count("cxx") == 2, builds
    assert builds.count("cc") <= 1, builds  # the kernel, where the 4-bit layers dequantize on the CPU
    assert "unavailable" not in done.stderr
    assert len(list((tmp_path / "cache" / "native").glob("cpu_caching_allocator-*.so"))) == 1
    assert len(list((tmp_path / "cache" / "native").glob("linear4bit_op-*.so"))) == 1
