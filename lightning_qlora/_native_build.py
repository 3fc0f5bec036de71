"""Compile a native source file once per machine into a private cache, and load only what the user owns.

Why: the package's native parts (the CPU dequantization kernel, the CPU caching allocator) are built on the
user's machine with the system compiler at first use; no torch extension tooling, no ninja. Loading a
shared library runs its code (its constructors) before anything can check it, so a library is loaded only
from a folder that nobody else can write to, right after checking the file itself, through the one file
descriptor that was checked (no window between the check and the load).

The cache is ``$LIGHTNING_QLORA_CACHE/native``, else ``$XDG_CACHE_HOME/lightning_qlora/native``, else
``$HOME/.cache/lightning_qlora/native``; never a shared temporary folder. It is created 0700 and used only
if it and every folder above it belong to the user (or root) and are writable by no one else (a root-owned
sticky folder such as the system temporary folder may sit above it), as ssh checks its key folders. Without
such a folder there is no native code: one warning, and the pure paths. ``LIGHTNING_QLORA_DISABLE_NATIVE=1``
turns all native code off. A library is named by a hash of everything that shapes it and sealed with a
SHA-256 trailer, so a file cut short is never loaded; processes that need the same library build it once
(a file lock), and a failed build is remembered for `RETRY_AFTER_FAILURE_S`, so DDP ranks and later runs
do not each spend the compiler's time on it again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120
RETRY_AFTER_FAILURE_S = 3600  # a failed build is not tried again for an hour (unless its inputs change)
CACHE_ENV = "LIGHTNING_QLORA_CACHE"
DISABLE_ENV = "LIGHTNING_QLORA_DISABLE_NATIVE"
CACHE_ROOT_NAME = "lightning_qlora"  # the same root as the package's other caches
NATIVE_SUBDIR = "native"
_TRAILER_TAG = b"\0lightning-qlora-sha256:"
_TRUE = ("1", "true", "yes", "on")

T = TypeVar("T")

_warned_no_cache = False
_warn_lock = threading.Lock()
# Descriptors of loaded libraries stay open for the life of the process: the loader knows each library by
# its /proc/self/fd/N name, so that number must never be reused for another one.
_held_fds: list[int] = []


class NativeBuildError(RuntimeError):
    """A native library could not be compiled, loaded or verified on this machine."""


class UnsafeCacheError(NativeBuildError):
    """There is no cache folder that only the user can write to: no native code is loaded."""


class NativeDisabledError(NativeBuildError):
    """Native code is turned off by ``LIGHTNING_QLORA_DISABLE_NATIVE``."""


def native_disabled() -> bool:
    """Whether ``LIGHTNING_QLORA_DISABLE_NATIVE`` turns every native part off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in _TRUE


def configured_cache_dir() -> Path | None:
    """Where the native cache is meant to be, from the environment alone; None without a usable HOME.

    No fallback to the passwd entry or a temporary folder: with neither ``$LIGHTNING_QLORA_CACHE``,
    ``$XDG_CACHE_HOME`` nor ``$HOME`` set to an absolute path, there is no cache.
    """
    explicit = os.environ.get(CACHE_ENV, "")
    if explicit:
        return Path(os.path.abspath(os.path.expanduser(explicit))) / NATIVE_SUBDIR
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec ignores relative values
        return Path(xdg) / CACHE_ROOT_NAME / NATIVE_SUBDIR
    home = os.environ.get("HOME", "")
    if os.path.isabs(home) and home.strip("/"):  # HOME="" or "/" is no home of the user's own
        return Path(home) / ".cache" / CACHE_ROOT_NAME / NATIVE_SUBDIR
    return None


def cache_dir() -> Path:
    """The native cache folder, created 0700 and checked; raise UnsafeCacheError (after one warning per
    process) when there is none that only the user can write to."""
    where = configured_cache_dir()
    try:
        if where is None:
            raise UnsafeCacheError(
                f"no cache folder: set HOME, XDG_CACHE_HOME or {CACHE_ENV} to a folder of your own"
            )
        return ensure_private_dir(where)
    except UnsafeCacheError as err:
        _warn_no_cache(err)
        raise


def _warn_no_cache(err: UnsafeCacheError) -> None:
    global _warned_no_cache
    with _warn_lock:
        if _warned_no_cache:
            return
        _warned_no_cache = True
    log.warning("lightning-qlora: native code is not used (%s); running the pure-Python paths.", err)


def ensure_private_dir(path: Path) -> Path:
    """Create the missing folders of `path` (mode 0700) and return its real path once it and every folder
    above it pass `check_private_dir`; raise UnsafeCacheError otherwise."""
    path = Path(os.path.abspath(path))
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    check_private_dir(probe, final=not missing)  # never create anything inside a folder others can change
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue  # another process made it at the same moment: checked below like any other
        except OSError as err:
            raise UnsafeCacheError(f"cannot create {folder}: {err.strerror}") from err
        os.chmod(folder, 0o700)  # whatever the umask
    return check_private_dir(path)


def check_private_dir(path: Path, final: bool = True) -> Path:
    """Return the real path of `path` if it and every folder above it belong to the user or root and are
    writable by no one else; a root-owned sticky folder (the system temporary folder) may be writable by
    all when it is not `path` itself (`final`). Raise UnsafeCacheError naming the first folder that fails.
    """
    real = Path(os.path.realpath(path))
    euid = os.geteuid()
    parts = real.parts
    for depth in range(1, len(parts) + 1):
        folder = Path(*parts[:depth])
        try:
            info = os.lstat(folder)
        except OSError as err:
            raise UnsafeCacheError(f"cannot check {folder}: {err.strerror}") from err
        if not stat.S_ISDIR(info.st_mode):  # a symbolic link swapped in after realpath
            raise UnsafeCacheError(f"{folder} is not a folder")
        if info.st_uid not in (euid, 0):
            raise UnsafeCacheError(f"{folder} belongs to uid {info.st_uid}, not to you (uid {euid}) or root")
        if info.st_mode & 0o022:
            last = depth == len(parts) and final
            shared = info.st_uid == 0 and info.st_mode & stat.S_ISVTX
            if last or not shared:
                raise UnsafeCacheError(
                    f"{folder} can be written by others (mode {stat.S_IMODE(info.st_mode):o}); "
                    "use a folder only you can write to"
                )
    return real


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
    """Compile into a temp file in `target`'s folder (checked private first), seal it, then rename it into
    place (atomically)."""
    folder = ensure_private_dir(target.parent)
    target = folder / target.name
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
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
    only if its trailer matches its content; trailing bytes do not change how the loader maps it. The seal
    guards against accidents, not people: who may write the file is what `load_library` checks.
    """
    data = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(_TRAILER_TAG + hashlib.sha256(data).hexdigest().encode())
        handle.flush()
        os.fsync(handle.fileno())


def _sealed(data: bytes) -> bool:
    size = len(_TRAILER_TAG) + 64
    if len(data) <= size or not data[-size:].startswith(_TRAILER_TAG):
        return False
    return hashlib.sha256(data[:-size]).hexdigest().encode() == data[-64:]


def is_sealed(path: Path) -> bool:
    """Whether `path` is a complete library written by `compile_library` (its trailer matches its content)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return _sealed(data)


def _read_fd(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def load_library(path: Path) -> ctypes.CDLL:
    """Load the library at `path` only if its folder passes `check_private_dir` and the file itself is a
    regular file (not a symbolic link), owned by the user or root, writable by no one else and sealed.

    The file is opened once (no symbolic link followed), checked through that descriptor and loaded through
    it (``/proc/self/fd/N``), so what is loaded is what was checked. Raise NativeBuildError otherwise.
    """
    folder = check_private_dir(path.parent)
    name = path.name
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise NativeBuildError(f"cannot open {name}: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        euid = os.geteuid()
        if not stat.S_ISREG(info.st_mode):
            raise NativeBuildError(f"{name} is not a regular file")
        if info.st_uid not in (euid, 0):
            raise NativeBuildError(f"{name} belongs to uid {info.st_uid}, not to you (uid {euid}) or root")
        if info.st_mode & 0o022:
            raise NativeBuildError(f"{name} can be written by others (mode {stat.S_IMODE(info.st_mode):o})")
        if not _sealed(_read_fd(fd, info.st_size)):
            raise NativeBuildError(f"{name} is incomplete or was not written by this package")
        fd_path = f"/proc/self/fd/{fd}"
        if not os.path.exists(fd_path):
            raise NativeBuildError("this system has no /proc/self/fd to load a checked file through")
        try:
            lib = ctypes.CDLL(fd_path)
        except OSError as err:
            raise NativeBuildError(f"cannot load {name}: {err}") from err
    except BaseException:
        os.close(fd)
        raise
    _held_fds.append(fd)
    return lib


@contextlib.contextmanager
def build_lock(directory: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on `name` in the checked `directory` (processes building one library wait)."""
    fd = os.open(directory / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _failure_marker(directory: Path, name: str) -> Path:
    return directory / f".{name}.failed"


def _recent_failure(directory: Path, name: str) -> str | None:
    """Why the last build of `name` failed, if that was less than `RETRY_AFTER_FAILURE_S` ago."""
    marker = _failure_marker(directory, name)
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            record = json.loads(handle.read(1 << 16))
        age = time.time() - float(record["time"])
        error = str(record["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 <= age < RETRY_AFTER_FAILURE_S:
        return None
    return (
        f"its build failed {age:.0f} s ago ({error}); not tried again for {RETRY_AFTER_FAILURE_S // 60} "
        f"minutes after a failure (delete {marker} to try now)"
    )


def _remember_failure(directory: Path, name: str, error: BaseException) -> None:
    marker = _failure_marker(directory, name)
    with contextlib.suppress(OSError):
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".failed.tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"time": time.time(), "error": str(error)[:500]}, handle)
            os.replace(tmp_name, marker)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def build_and_load(
    stem: str,
    source: Path,
    cc: str,
    flags: Sequence[str],
    check: Callable[[ctypes.CDLL, Path], T],
    *,
    link: Sequence[str] = (),
    extra_key: str = "",
    directory: Path | None = None,
) -> T:
    """Load the cached build of `source` (compiling it first if needed) and return `check(lib, path)`.

    `check` declares the library's functions and raises NativeBuildError if the library is not the one
    expected (wrong ABI, failed self-check): a cached library that fails to load or to pass it is rebuilt
    once. Every load goes through `load_library`. Processes building the same library wait for one
    another (`build_lock`); a failed build is remembered for `RETRY_AFTER_FAILURE_S`. `directory`
    defaults to `cache_dir()`. Raise NativeBuildError (a subclass saying why) when there is no library.
    """
    if native_disabled():
        raise NativeDisabledError(f"native code disabled by {DISABLE_ENV}")
    folder = cache_dir() if directory is None else ensure_private_dir(directory)
    path = library_path(folder, stem, source, cc, flags, extra_key)
    tried: tuple[int, int] | None = None
    if os.path.lexists(path):
        try:
            return check(load_library(path), path)
        except NativeBuildError as err:
            log.debug("lightning-qlora: rebuilding the cached %s (%s)", path.name, err)
            tried = _identity(path)
    with build_lock(folder, path.name):
        current = _identity(path)
        if current is not None and current != tried:  # another process built it while this one waited
            with contextlib.suppress(NativeBuildError):
                return check(load_library(path), path)
        failure = _recent_failure(folder, path.name)
        if failure is not None:
            raise NativeBuildError(f"{path.name}: {failure}")
        try:
            compile_library(cc, flags, source, path, link)
            result = check(load_library(path), path)
        except (NativeBuildError, OSError) as err:
            _remember_failure(folder, path.name, err)
            if isinstance(err, NativeBuildError):
                raise
            raise NativeBuildError(f"building {path.name} failed: {err}") from err
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_failure_marker(folder, path.name))
        return result
