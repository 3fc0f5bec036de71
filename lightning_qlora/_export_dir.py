"""Export folders are owned: an export replaces only a folder that is new or that an earlier export wrote.

An export is written into a temporary sibling and swapped into place (see `_atomic`), so the folder it is
given is replaced as a whole. Pointed at the working directory, a run folder or a folder of the user's
own, that would delete files this package never wrote. So a folder is written only if it does not exist,
is empty, or holds a previous export of this package and nothing else: every export leaves a marker file
(`.lightning-qlora-export`) listing what it wrote, and a folder whose entries are all on that list (or are
themselves such exports, e.g. `loftq_base/`) may be replaced. Everything else is refused before any work,
with the reason and what to pass instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from lightning_qlora._atomic import atomic_directory

EXPORT_MARKER = ".lightning-qlora-export"
_MARKER_FORMAT = 1


class ExportDirError(ValueError):
    """An export folder that is not the package's to replace (or cannot be written); nothing was written."""


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))  # the folder actually replaced: symlinks are written through


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _marker_files(folder: Path) -> set[str] | None:
    """The names the export in `folder` wrote, from its marker; None without a readable marker."""
    try:
        record = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files)


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing folder that no export of this package wrote (empty: safe to replace)."""
    entries = sorted(entry.name for entry in folder.iterdir())
    if not entries:
        return []
    own = _marker_files(folder)
    if own is None:
        return entries
    foreign = []
    for name in entries:
        if name == EXPORT_MARKER or name in own:
            continue
        entry = folder / name
        nested = entry.is_dir() and not entry.is_symlink() and _marker_files(entry) is not None
        if nested and not foreign_entries(entry):  # an export of ours inside (loftq_base/), unmodified
            continue
        foreign.append(name)
    return foreign


def check_export_dir(
    path: str | os.PathLike[str],
    what: str,
    run_dir: str | os.PathLike[str] | None = None,
    written: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Refuse an export folder whose replacement would delete what this package did not write.

    `what` names the argument in messages (`LoRA export_dir`); `run_dir` is the run's own folder
    (checkpoints, logs), which the export may lie inside but must not be, nor contain. `written` names
    other folders the run writes to (`{"the checkpoint folder": ...}`), held to the same rule: they may be
    empty now and fill up during training, before the export replaces them.
    """
    raw = os.fspath(path)
    if raw == "":
        raise ExportDirError(
            f"{what}='' names the working directory ({os.getcwd()}); an export replaces the whole folder "
            "it is given. Pass a new folder, e.g. 'adapter', or null for no export."
        )
    given = Path(raw)
    target = _resolved(given)
    cwd = _resolved(Path.cwd())
    new_folder = "Pass a new folder (one that does not exist yet), or one an earlier export wrote."
    if _is_within(cwd, target):
        where = "is the working directory" if cwd == target else f"contains the working directory ({cwd})"
        raise ExportDirError(
            f"{what}={raw!r} {where}; an export replaces the whole folder it is given and would delete "
            f"the files there. {new_folder}"
        )
    if run_dir is not None:
        run = _resolved(Path(run_dir))
        if _is_within(run, target):
            where = "is the run folder" if run == target else f"contains the run folder ({run})"
            raise ExportDirError(
                f"{what}={raw!r} {where}; an export replaces the whole folder it is given and would delete "
                f"the run's checkpoints and logs. Pass a folder inside it, e.g. {str(run / 'adapter')!r}, or "
                "a new folder elsewhere."
            )
    for label, other in (written or {}).items():
        folder = _resolved(Path(other))
        if _is_within(folder, target):
            where = f"is {label}" if folder == target else f"contains {label} ({folder})"
            raise ExportDirError(
                f"{what}={raw!r} {where}, which the run writes into; the export replaces the whole folder "
                f"at the end and would delete those files. {new_folder}"
            )
    for folder in (given, *given.parents):
        if folder.exists():  # (follows links: a link to a folder is written through)
            if not folder.is_dir():
                place = "is" if folder == given else f"lies under {str(folder)!r}, which is"
                raise NotADirectoryError(
                    f"{what}={raw!r} {place} an existing file; an export is written as a folder. {new_folder}"
                )
            break
    if target.is_dir():
        foreign = foreign_entries(target)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ExportDirError(
                f"{what}={raw!r} is a folder that holds files no export of lightning-qlora wrote ({shown}); "
                f"an export replaces the whole folder and would delete them. {new_folder}"
            )
    _check_writable(target, what, raw)
    return given


def _check_writable(target: Path, what: str, raw: str) -> None:
    """The export is created beside `target` and renamed into place: its parent must be writable."""
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportDirError(
            f"{what}={raw!r} cannot be written: {str(existing)!r} is not writable by this user. Pass a "
            "folder in a writable place."
        )


@contextlib.contextmanager
def export_directory(path: str | os.PathLike[str], what: str, kind: str) -> Iterator[Path]:
    """`atomic_directory` for an export: checked again right before writing, then marked as ours.

    `kind` (e.g. `peft_adapter`) is recorded in the marker beside the names written.
    """
    check_export_dir(path, what)
    with atomic_directory(path) as tmp:
        yield tmp
        files = sorted(entry.name for entry in tmp.iterdir() if entry.name != EXPORT_MARKER)
        record = {"written_by": "lightning-qlora", "format": _MARKER_FORMAT, "kind": kind, "files": files}
        (tmp / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
