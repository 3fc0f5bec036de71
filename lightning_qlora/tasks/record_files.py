"""Read a data folder as users have it: JSON Lines, Parquet or Arrow files, or a `datasets` folder on disk.

Every record keeps where it came from (``train.jsonl:12``, ``train.parquet: row 3``, ``saved/train: row
3``; rows count from 0, as ``dataset[3]`` does) so a bad record can be reported by file and line or row
before any model loads. Accepted layouts of ``data_dir``:

* split files: ``train.jsonl`` / ``train.parquet`` / ``train.arrow`` (or shards ``train-*.<ext>``, also
  under ``data/``, the Hub's layout) and the same for ``validation`` (``test`` is used when there is no
  ``validation``);
* a folder written by ``DatasetDict.save_to_disk`` (``dataset_dict.json``: its ``train`` and
  ``validation`` or ``test`` splits) or by ``Dataset.save_to_disk`` (training records only).

Without validation records, ``validation_split`` holds out a seeded fraction of the training ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_files import DataError, MissingDataError, _json_type, check_validation_split, json_lines

EXTENSIONS = ("jsonl", "parquet", "arrow")
VALIDATION_NAMES = ("validation", "test")


@dataclass(frozen=True)
class SourcedRecord:
    """One record and where it was read from (for error messages)."""

    record: dict[str, Any]
    where: str


def _jsonl_records(path: Path) -> list[SourcedRecord]:
    records: list[SourcedRecord] = []
    for where, value in json_lines(path):
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {_json_type(value)}")
        records.append(SourcedRecord(value, where))
    return records


def _table_records(rows: list[dict[str, Any]], where: str) -> list[SourcedRecord]:
    return [SourcedRecord(row, f"{where}: row {i}") for i, row in enumerate(rows)]


def _read_file(path: Path) -> list[SourcedRecord]:
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            from datasets import Dataset

            rows = Dataset.from_file(str(path)).to_list()
    except Exception as err:  # a damaged or foreign file: say which one
        raise DataError(
            f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: {err})"
        ) from None
    return _table_records(rows, str(path))


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of one split: ``<split>.<ext>`` or its shards ``<split>-*.<ext>``, in the folder or data/."""
    for base in (folder, folder / "data"):
        for ext in EXTENSIONS:
            single = base / f"{split}.{ext}"
            if single.is_file():
                return [single]
            shards = sorted(base.glob(f"{split}-*.{ext}"))
            if shards:
                return shards
    return []


def _saved_splits(folder: Path) -> dict[str, list[SourcedRecord]] | None:
    """The splits of a ``save_to_disk`` folder, or None when the folder is not one."""
    if (folder / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        saved = load_from_disk(str(folder))
        splits = {name: _table_records(saved[name].to_list(), str(folder / name)) for name in saved}
        validation = next((n for n in VALIDATION_NAMES if n in splits), None)
        if "train" not in splits:
            raise MissingDataError(
                f"{folder}: the saved DatasetDict has no 'train' split (has {sorted(splits)})"
            )
        out = {"train": splits["train"]}
        if validation is not None:
            out["validation"] = splits[validation]
        return out
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        from datasets import load_from_disk

        return {"train": _table_records(load_from_disk(str(folder)).to_list(), str(folder))}
    return None


def read_folder(
    data_dir: str | Path, validation_split: float | None = None, seed: int = 0
) -> dict[str, list[SourcedRecord]]:
    """``train`` and ``validation`` records of a data folder in any accepted layout (module docstring)."""
    check_validation_split(validation_split)
    folder = Path(data_dir)
    expected = "a folder with train.jsonl/.parquet/.arrow (and validation.*), or one written by save_to_disk"
    if not folder.is_dir():
        raise MissingDataError(f"{folder}: no such data folder; expected {expected}")
    splits = _saved_splits(folder)
    if splits is None:
        train_files = split_files(folder, "train")
        if not train_files:
            present = sorted(p.name for p in folder.iterdir())
            raise MissingDataError(f"{folder}: no training records; expected {expected}; found {present}")
        splits = {"train": [r for f in train_files for r in _read_file(f)]}
        for name in VALIDATION_NAMES:
            files = split_files(folder, name)
            if files:
                splits["validation"] = [r for f in files for r in _read_file(f)]
                break
    if not splits["train"]:
        raise DataError(f"{folder}: the training split is empty")
    if "validation" in splits and validation_split is not None:
        raise DataError(
            f"{folder}: has validation records, and data.validation_split={validation_split} asks to split "
            "the training records too; remove one of them"
        )
    if "validation" not in splits:
        if validation_split is None:
            raise MissingDataError(
                f"{folder}: no validation records; add validation.jsonl (or .parquet/.arrow) or hold out "
                "part of the training records with data.validation_split=0.1"
            )
        splits = hold_out(splits["train"], float(validation_split), seed, str(folder))
    return splits


def hold_out(
    train: list[SourcedRecord], fraction: float, seed: int, where: str
) -> dict[str, list[SourcedRecord]]:
    """A seeded random partition of the training records into train and validation."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(len(train) * fraction))
    if n_validation >= len(train):
        raise DataError(
            f"{where}: {len(train)} record(s) are too few to hold out data.validation_split={fraction} and "
            "keep some for training"
        )
    held = set(order[:n_validation])
    return {
        "train": [r for i, r in enumerate(train) if i not in held],
        "validation": [r for i, r in enumerate(train) if i in held],
    }
