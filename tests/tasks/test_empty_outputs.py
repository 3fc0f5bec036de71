"""Instruction data whose every response is empty is refused when read: there would be no loss to learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_qlora.tasks import InstructionDataModule
from lightning_qlora.tasks.data_files import DataError


def write(folder: Path, split: str, outputs: list[str]) -> None:
    lines = [json.dumps({"instruction": f"say {i}", "output": out}) for i, out in enumerate(outputs)]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_all_empty_outputs_are_refused_naming_the_split(tmp_path: Path) -> None:
    write(tmp_path, "train", ["", "  ", "\n"])
    write(tmp_path, "validation", ["yes"])
    module = InstructionDataModule(data_dir=str(tmp_path), batch_size=2, max_length=24)
    with pytest.raises(
        DataError, match=r"every train record's \"output\" is empty, so there is nothing to learn"
    ):
        module.read_records()
    write(tmp_path, "train", ["", "one answer", ""])  # one record with a response is enough to train on
    assert len(InstructionDataModule(data_dir=str(tmp_path), batch_size=2).read_records()["train"]) == 3
