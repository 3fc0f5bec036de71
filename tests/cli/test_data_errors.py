"""Every data problem is one line naming the file, the line and what was wrong, before any model loads.

Through Hydra composition and the job builder (which reads the data before it builds the model), and once
through the real command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from lightning_qlora.cli.job import SetupError, build
from lightning_qlora.tasks import SentimentDataModule
from lightning_qlora.tasks.data_files import DataError, RecordSchema, read_jsonl

Compose = Callable[..., DictConfig]
GOOD = '{"text": "fine", "label": 1}\n{"text": "bad", "label": 0}\n'


def _folder(tmp_path: Path, train: str | None = GOOD, validation: str | None = GOOD) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    if train is not None:
        (folder / "train.jsonl").write_text(train, encoding="utf-8")
    if validation is not None:
        (folder / "validation.jsonl").write_text(validation, encoding="utf-8")
    return folder


# (train.jsonl, validation.jsonl, extra overrides, the file and line named, words of the cause)
CASES = {
    "missing folder": (None, None, [], "data", "no such data folder"),
    "missing train": (None, GOOD, [], "train.jsonl", "no such file"),
    "missing validation": (GOOD, None, [], "validation.jsonl", "data.validation_split=0.1"),
    "empty file": ("\n\n", GOOD, [], "train.jsonl", "empty file"),
    "malformed line": (GOOD + '{"text": "x", "label": 1\n', GOOD, [], "train.jsonl:3", "not valid JSON"),
    "not an object": (GOOD, '["a", 1]\n', [], "validation.jsonl:1", "expected a JSON object"),
    "missing field": (
        GOOD + '{"txt": "typo", "label": 0}\n',
        GOOD,
        [],
        "train.jsonl:3",
        "missing field 'text'",
    ),
    "wrong type": ('{"text": "x", "label": "pos"}\n', GOOD, [], "train.jsonl:1", "'label' is a string"),
    "boolean label": ('{"text": "x", "label": true}\n', GOOD, [], "train.jsonl:1", "'label' is a boolean"),
    "label out of range": (
        GOOD,
        GOOD + '{"text": "x", "label": 2}\n',
        [],
        "validation.jsonl:3",
        "outside 0..1",
    ),
    "not UTF-8": ("", GOOD, [], "train.jsonl:1", "not UTF-8"),
    "split and file": (GOOD, GOOD, ["data.validation_split=0.5"], "validation.jsonl", "remove one of them"),
    "split too large": (GOOD, None, ["data.validation_split=0.9"], "train.jsonl", "too few"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_data_error_is_one_line_before_the_model(
    compose_train: Compose, tmp_path: Path, case: str
) -> None:
    train, validation, extra, where, cause = CASES[case]
    folder = tmp_path / "data" if train is None and validation is None else None
    if folder is None:
        folder = _folder(tmp_path, train, validation)
        if case == "not UTF-8":
            (folder / "train.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    cfg = compose_train(f"data.data_dir={folder}", "logger=none", *extra)
    with pytest.raises(SetupError) as info:
        build(cfg)
    assert info.value.component == "data"  # the model comes after the data: it was never built
    assert isinstance(info.value.error, DataError)
    message = str(info.value)
    assert "\n" not in message
    assert f"{folder}{'/' + where if where != 'data' else ''}" in message
    assert cause in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        ("data.validation_split=1.5", "strictly between 0 and 1, got 1.5"),
        ("data.num_labels=1", "num_labels must be an integer >= 2"),
    ],
)
def test_bad_data_settings_fail_in_the_data_node(
    compose_train: Compose, override: str, expected: str
) -> None:
    with pytest.raises(SetupError, match=r"^data: ") as info:
        build(compose_train(override, "logger=none"))
    assert expected in str(info.value)


def test_validation_split_holds_out_part_of_train(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(20))
    folder = _folder(tmp_path, lines, None)
    splits = SentimentDataModule(data_dir=str(folder), validation_split=0.25, seed=1).read_records()
    assert (len(splits["train"]), len(splits["validation"])) == (15, 5)
    texts = set(splits["train"]["text"]) | set(splits["validation"]["text"])
    assert len(texts) == 20  # a partition: nothing lost or repeated
    again = SentimentDataModule(data_dir=str(folder), validation_split=0.25, seed=1).read_records()
    assert again["validation"]["text"] == splits["validation"]["text"]  # seeded


def test_optional_fields_are_filled_and_unknown_ones_dropped(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b", "extra": [1]}\n'
        '{"instruction": "c", "output": "d", "input": "e"}\n'
    )
    schema = RecordSchema(
        required={"instruction": (str,), "output": (str,)}, optional={"input": (str, type(None))}
    )
    assert read_jsonl(path, schema) == [
        {"instruction": "a", "output": "b", "input": None},
        {"instruction": "c", "output": "d", "input": "e"},
    ]


def test_the_command_reports_a_bad_line_in_one_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, GOOD + "{oops\n", GOOD)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_qlora.cli.train",
            f"data.data_dir={folder}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "train.jsonl" in line]
    assert lines == [
        f"Error in config node data: DataError: {folder}/train.jsonl:3: not valid JSON "
        "(Expecting property name enclosed in double quotes at column 2)"
    ]
    assert "Traceback" not in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout  # no model was loaded


def test_a_chat_template_the_tokenizer_lacks_fails_in_the_data_node(compose_train: Compose) -> None:
    """The tiny Llama uses MiniLM's tokenizer, which has no chat template: refused before any model loads."""
    cfg = compose_train("experiment=smoke_tiny_llama", "data=skills", "logger=none")
    with pytest.raises(SetupError, match=r"^data: ") as info:
        build(cfg)
    assert "chat_template=true needs a tokenizer with a chat template" in str(info.value)
