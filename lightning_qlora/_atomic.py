"""Crash-safe writes: a folder or file is either the old complete one or the new complete one, never half.

Everything is written into a temporary sibling (same filesystem, so a rename moves it), flushed to disk,
and only then renamed into place. A process killed mid-write leaves the previous good copy where it was;
its leftover temporary entry is cleaned up by the next write to the same path.

What is written gets the permissions of any new file (0666 and 0777 less the umask), so a serving process
of another user can read an export. A `path` that is a symlink is written through: the link stays and the
folder or file it points to is replaced. Where the kernel cannot swap two folders in one call, the old
folder is renamed aside before the new one takes its place; a crash between the two renames is undone by
the next write to the path or by `recover` (which the readers of exported folders call), so the old copy
comes back rather than the path staying empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

# Leftovers are named `.<name>.tmp-<pid>-<random>` (being written) and `.<name>.old-<pid>-<random>` (the
# previous copy, kept until the new one is in place), so the writer that owns them can be told apart.
_TMP = "tmp"
_OLD = "old"


def _sibling_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_mode(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give them the mode open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _target(path: str | os.PathLike[str]) -> Path:
    """The absolute path to write, through a symlink (even a dangling one) to what it points to."""
    return Path(os.path.realpath(os.fspath(path)))


def recover(path: str | os.PathLike[str]) -> None:
    """Finish what a writer of `path` that died mid-swap left: its old copy back, its temporaries gone."""
    _recover(_target(path))


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush one file (or a directory's entry list) to disk; a no-op where the OS cannot fsync folders."""
    if directory and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            _ordinary_mode(Path(dirpath, filename), directory=False)  # some writers (safetensors) use 0600
            _fsync_path(Path(dirpath, filename))
        _fsync_path(Path(dirpath), directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc older than 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_into_place(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`; the old `target` is deleted only once `new` is there."""
    parent = target.parent
    if not target.exists():
        os.rename(new, target)
        _fsync_path(parent, directory=True)
        return
    if _exchange(new, target):  # `new` now holds the old folder
        _fsync_path(parent, directory=True)
        shutil.rmtree(new, ignore_errors=True)
        return
    # Two renames: a crash between them leaves the old copy as `.<name>.old-*`, restored by `_recover`.
    old = parent / f"{_sibling_prefix(target, _OLD)}{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_path(parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


def _owner_pid(entry: Path, target: Path, kind: str) -> int | None:
    prefix = f".{target.name}.{kind}-"
    if not entry.name.startswith(prefix):
        return None
    pid, _, _ = entry.name[len(prefix) :].partition("-")
    return int(pid) if pid.isdigit() else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _recover(target: Path) -> None:
    """Undo what a writer that died mid-swap left behind: restore its old copy, delete its temporaries.

    Only entries whose owning process is gone are touched, so a concurrent writer is left alone.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    leftovers: dict[str, list[Path]] = {_TMP: [], _OLD: []}
    for entry in parent.iterdir():
        for kind, found in leftovers.items():
            pid = _owner_pid(entry, target, kind)
            if pid is not None and not _pid_alive(pid):
                found.append(entry)
    olds = sorted(leftovers[_OLD], key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.rename(olds.pop(), target)
    for entry in leftovers[_TMP] + olds:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces `path` (created or overwritten).

    If the block raises (or the process dies), `path` keeps its previous contents and the temporary
    folder is removed (after a crash: by the next write to `path`). Write everything `path` should hold
    into the yielded folder; files already in `path` are not carried over.
    """
    target = _target(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(target, _TMP), dir=target.parent))
    _ordinary_mode(tmp, directory=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on a clean exit it replaces `path` in one rename."""
    target = _target(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; refusing to replace it with a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    fd, name = tempfile.mkstemp(prefix=_sibling_prefix(target, _TMP), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    _ordinary_mode(tmp, directory=False)
    try:
        yield tmp
        _ordinary_mode(tmp, directory=False)  # the writer may have replaced the file with a 0600 one
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """`safetensors.torch.save_file`, atomically (tensors must be contiguous and not share memory)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)
