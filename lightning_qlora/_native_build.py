"""Compile a native source file once per machine into a cached, sealed shared library.

Why: the package's two native parts (the CPU dequantization kernel and the CPU caching allocator) are
built on the user's machine with the system compiler, at first use, in under a second or two; no torch
extension tooling, no ninja. A library is cached under ``$XDG_CACHE_HOME/lightning-qlora`` (default
``~/.cache/lightning-qlora``), named by a hash of everything that shapes it, and written atomically with a
SHA-256 trailer, so processes building at the same time (DDP ranks) never load a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

BUILD_TIMEOUT_S = 120
_TRAILER_TAG = b"\0lightning-qlora-sha256:"


class NativeBuildError(RuntimeError):
    """A native library could not be compiled, loaded or verified on this machine."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry (a container's arbitrary uid)
            base = tempfile.gettempdir()
    return Path(base) / "lightning-qlora"


def find_compiler(env_names: Sequence[str], names: Sequence[str]) -> str | None:
    """The compiler to use: an explicit setting wins (and is not second-guessed), else the first found."""
    for env in env_names:
        value = os.environ.get(env)
        if value:
            return value
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    features = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):
                features = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}|{platform.processor()}|{features}"


def _compiler_identity(cc: str) -> str:
    try:
        done = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, errors="replace", timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeBuildError(f"compiler {cc!r} cannot be run: {err}") from err
    if done.returncode != 0:
        raise NativeBuildError(f"compiler {cc!r} --version failed: {done.stderr.strip()[:200]}")
    return done.stdout.strip()


def library_path(
    directory: Path, stem: str, source: Path, cc: str, flags: Sequence[str], extra_key: str = ""
) -> Path:
    """Where the build of `source` with `cc` and `flags` is cached; `extra_key`: whatever else shapes it."""
    digest = hashlib.sha256()
    for part in (source.read_bytes(), cc.encode(), _compiler_identity(cc).encode(), " ".join(flags).encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(extra_key.encode())
    if "-march=native" in flags:
        digest.update(_cpu_signature().encode())
    return directory / f"{stem}-{digest.hexdigest()[:20]}.so"


def compile_library(
    cc: str, flags: Sequence[str], source: Path, target: Path, link: Sequence[str] = ()
) -> None:
    """Compile into a temp file beside `target`, seal it, then rename it into place (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        command = [cc, *flags, str(source), "-o", tmp_name, *link]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as err:
            raise NativeBuildError(f"running {cc!r} failed: {err}") from err
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise NativeBuildError(f"{cc!r} failed ({done.returncode}): {' | '.join(detail[-3:])[:400]}")
        _seal(Path(tmp_name))
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _seal(path: Path) -> None:
    """Append the library's own SHA-256 and flush it to disk.

    A shared object that is cut short can crash the process inside dlopen (SIGBUS), so a file is loaded
    only if its trailer matches its content; trailing bytes do not change how the loader maps it.
    """
    data = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(_TRAILER_TAG + hashlib.sha256(data).hexdigest().encode())
        handle.flush()
        os.fsync(handle.fileno())


def is_sealed(path: Path) -> bool:
    """Whether `path` is a complete library written by `compile_library` (its trailer matches its content)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    size = len(_TRAILER_TAG) + 64
    if len(data) <= size or not data[-size:].startswith(_TRAILER_TAG):
        return False
    return hashlib.sha256(data[:-size]).hexdigest().encode() == data[-64:]
