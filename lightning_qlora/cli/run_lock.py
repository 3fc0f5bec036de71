"""One command per run folder: a second command pointed at a folder a running one writes to is refused.

Two commands writing into one run folder (a resume started while the run still trains, two runs started
in the same second under the default timestamped folder, a sweep folder named twice) would overwrite
each other's checkpoints, adapters, logs and `.hydra/` records. The `RunFolderLock` Hydra callback takes
an exclusive `flock` on `<folder>/.lightning-qlora.lock` before Hydra writes anything into the folder and
holds it until the command ends; the kernel drops it when the process dies, so a killed run never leaves
a stale lock behind. Only the launching process locks: the other ranks of a DDP job, which Lightning or
torchrun start with the same arguments, write into the same folder on purpose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

LOCK_NAME = ".lightning-qlora.lock"
LOCKED_EXIT_CODE = 2  # a config error: nothing ran

_held: dict[Path, IO[str]] = {}
# Set by the launchers Lightning supports (its own, torchrun, SLURM, MPI) in every process but the first.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class RunFolderBusyError(RuntimeError):
    """Another process holds the run folder's lock."""


def _is_launching_process() -> bool:
    """False in the non-zero ranks of a DDP job (they share the folder of rank 0 by design)."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def lock_run_folder(folder: str | os.PathLike[str]) -> Path | None:
    """Hold the folder's lock until `unlock_run_folder` or the process ends; refuse if another holds it.

    Returns the lock file, or None where locks are not available (no `fcntl`: Windows) or not wanted.
    """
    if not _is_launching_process():
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = Path(folder).resolve() / LOCK_NAME
    if path in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole command
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusyError(
            f"{path.parent} is in use by another lightning-qlora command ({owner}); two commands in one run "
            "folder would overwrite each other's checkpoints and logs. Wait for it to end, or pass another "
            "folder (hydra.run.dir=... / hydra.sweep.dir=...)."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    _held[path] = handle
    return path


def unlock_run_folder(folder: str | os.PathLike[str]) -> None:
    """Release the lock taken by `lock_run_folder` (the lock file stays: removing it would race)."""
    handle = _held.pop(Path(folder).resolve() / LOCK_NAME, None)
    if handle is not None:
        handle.close()  # closing the descriptor releases the flock


def _lock_or_exit(folder: str, key: str) -> None:
    """Lock the folder, or say in one line why it cannot be the run's folder (in use, a file, read-only)."""
    try:
        lock_run_folder(folder)
    except RunFolderBusyError as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        sys.exit(LOCKED_EXIT_CODE)
    except OSError as err:  # the folder (or one above it) is a file, or not writable
        reason = f"{err.strerror or type(err).__name__}: {err.filename or folder}"
        print(
            f"Error: {key}={folder} cannot be the run folder ({reason}); pass a folder this user can "
            f"write, e.g. {key}=runs/my_run.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(LOCKED_EXIT_CODE)


class RunFolderLock(Callback):
    """Hydra callback: lock the run folder (a multirun: the sweep folder) before Hydra writes to it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _lock_or_exit(str(config.hydra.run.dir), "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        unlock_run_folder(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _lock_or_exit(str(config.hydra.sweep.dir), "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        unlock_run_folder(str(config.hydra.sweep.dir))
