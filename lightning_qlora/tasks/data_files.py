"""Reading the packaged tasks' data folders: JSON Lines with line numbers, checked field by field.

A data folder holds ``train.jsonl`` and ``validation.jsonl``, one JSON object per line (blank lines are
skipped). Without ``validation.jsonl``, ``validation_split`` holds out a seeded fraction of the training
records instead. Every problem (a missing folder or file, an empty file, a line that is not JSON or not an
object, a missing field, a value of the wrong type, a label out of range) is a `DataError` whose message is
one line naming the file, the line number and what was wrong, raised before any model is loaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"

Record = dict[str, Any]
RecordCheck = Callable[[Record], "str | None"]
"""Extra per-record check: returns what is wrong (a short phrase) or None."""

_TYPE_NAMES: dict[type, str] = {str: "a string", int: "an integer", float: "a number", type(None): "null"}


class DataError(ValueError):
    """A data file cannot be used; the message is one line: ``<file>[:<line>]: <what was wrong>``."""


class MissingDataError(DataError, FileNotFoundError):
    """A data folder or file does not exist (also a `FileNotFoundError`, for callers that catch that)."""


@dataclass(frozen=True)
class RecordSchema:
    """The fields a task reads from each record and the JSON types each may have.

    Fields not listed are ignored (and dropped). ``check`` adds a task rule, such as a label range.
    """

    required: Mapping[str, tuple[type, ...]]
    optional: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    check: RecordCheck | None = None

    def describe(self) -> str:
        return ", ".join([*self.required, *(f"{k} (optional)" for k in self.optional)])


def _type_ok(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false are not numbers here
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _kinds(kinds: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line's JSON value with where it is (``file:line``); bad UTF-8 or JSON is a DataError."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            yield where, value


def read_jsonl(path: str | Path, schema: RecordSchema) -> list[Record]:
    """The records of one JSON Lines file, each reduced to the schema's fields (missing optional: None)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: no such file")
    records: list[Record] = []
    for where, value in json_lines(path):
        if not isinstance(value, dict):
            raise DataError(
                f"{where}: expected a JSON object with {schema.describe()}, got {_json_type(value)}"
            )
        records.append(_check_record(value, schema, where))
    if not records:
        raise DataError(f"{path}: empty file; expected one JSON object per line with {schema.describe()}")
    return records


def _check_record(value: dict[str, Any], schema: RecordSchema, where: str) -> Record:
    missing = [name for name in schema.required if name not in value]
    if missing:
        raise DataError(
            f"{where}: missing field {missing[0]!r} (each line needs {', '.join(schema.required)}; "
            f"found {', '.join(map(repr, value)) or 'no fields'})"
        )
    record: Record = {}
    for name, kinds in (*schema.required.items(), *schema.optional.items()):
        item = value.get(name)
        if name in value and not _type_ok(item, kinds):
            raise DataError(
                f"{where}: field {name!r} is {_json_type(item)} ({item!r:.40}), expected {_kinds(kinds)}"
            )
        record[name] = item
    if schema.check is not None:
        problem = schema.check(record)
        if problem:
            raise DataError(f"{where}: {problem}")
    return record


def label_range_check(name: str, num_labels: int, setting: str = "model.num_labels") -> RecordCheck:
    """A record check: ``record[name]`` is a class index in ``0 .. num_labels - 1``."""

    def check(record: Record) -> str | None:
        label = record[name]
        if not 0 <= label < num_labels:
            return f"{name} {label} is outside 0..{num_labels - 1} ({setting}={num_labels})"
        return None

    return check


def check_validation_split(validation_split: float | None) -> None:
    """``None`` or a fraction strictly between 0 and 1 (checked when the data module is built)."""
    if validation_split is None:
        return
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise DataError(f"validation_split must be a fraction between 0 and 1, got {validation_split!r}")
    if not 0.0 < float(validation_split) < 1.0:
        raise DataError(
            f"validation_split must be a fraction strictly between 0 and 1, got {validation_split}"
        )


def read_splits(
    data_dir: str | Path, schema: RecordSchema, validation_split: float | None = None, seed: int = 0
) -> dict[str, list[Record]]:
    """``train`` and ``validation`` records of a data folder (see the module docstring for the layout)."""
    check_validation_split(validation_split)
    folder = Path(data_dir)
    if not folder.is_dir():
        raise MissingDataError(
            f"{folder}: no such data folder; expected a folder with {TRAIN_FILE} and {VALIDATION_FILE}"
        )
    train_path, validation_path = folder / TRAIN_FILE, folder / VALIDATION_FILE
    if not train_path.is_file():
        raise MissingDataError(
            f"{train_path}: no such file; a data folder needs {TRAIN_FILE} (and {VALIDATION_FILE})"
        )
    has_validation = validation_path.is_file()
    if has_validation and validation_split is not None:
        raise DataError(
            f"{validation_path}: exists, and data.validation_split={validation_split} asks to split the "
            "training file too; remove one of them"
        )
    if not has_validation and validation_split is None:
        raise MissingDataError(
            f"{validation_path}: no such file; add it or hold out part of {TRAIN_FILE} with "
            "data.validation_split=0.1"
        )
    train = read_jsonl(train_path, schema)
    if has_validation:
        return {"train": train, "validation": read_jsonl(validation_path, schema)}
    assert validation_split is not None
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(len(train) * float(validation_split)))
    if n_validation >= len(train):
        raise DataError(
            f"{train_path}: {len(train)} record(s) are too few to hold out data.validation_split="
            f"{validation_split} and keep some for training"
        )
    held_out = set(order[:n_validation])
    return {
        "train": [r for i, r in enumerate(train) if i not in held_out],
        "validation": [r for i, r in enumerate(train) if i in held_out],
    }
