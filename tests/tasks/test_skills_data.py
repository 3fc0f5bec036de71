"""The packaged `skills` data: exactly what its generator writes, answers checked by independent code."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta

import pytest

from lightning_qlora.tasks import DATA_DIR
from lightning_qlora.tasks.skills import CONVERSIONS, SKILLS, generate, to_jsonl

FOLDER = DATA_DIR / "skills"


def read(split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (FOLDER / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_files_are_what_the_generator_writes() -> None:
    for split, records in generate().items():
        assert (FOLDER / f"{split}.jsonl").read_text(encoding="utf-8") == to_jsonl(records), split


def test_sizes_and_no_held_out_question_in_training() -> None:
    train, validation = read("train"), read("validation")
    assert len(train) >= 300
    assert len(validation) >= 50
    train_questions = {r["instruction"] for r in train}
    assert len(train_questions) == len(train)
    assert not train_questions & {r["instruction"] for r in validation}
    assert all(set(r) == {"instruction", "input", "output"} for r in train + validation)


_WEEKDAY = {date(2024, 1, 1) + timedelta(days=i): None for i in range(7)}  # 2024-01-01 was a Monday
_DAY_INDEX = {d.strftime("%A"): d for d in _WEEKDAY}
_UNITS = {(source, target): factor for source, target, factor in CONVERSIONS}


def expected_answer(question: str) -> str:
    """Recompute the answer from the question text alone, with code unrelated to the generator."""
    if m := re.fullmatch(r"(?:What is |Add |What is the sum of )(\d+) (?:\+|and) (\d+)[?.]", question):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"What is (\d+) (?:-|minus) (\d+)\?", question):
        return str(int(m[1]) - int(m[2]))
    if m := re.fullmatch(r"Subtract (\d+) from (\d+)\.", question):
        return str(int(m[2]) - int(m[1]))
    if m := re.fullmatch(r"(?:What is |Multiply )(\d+) (?:times|x|by) (\d+)[?.]", question):
        return str(int(m[1]) * int(m[2]))
    if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.|(\d+) (\w+) is how many (\w+)\?", question):
        n, source, target = (g for g in m.groups() if g is not None)
        return f"{int(n) * _UNITS[source, target]} {target}"
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question):
        return f"{int(m[2]) * _UNITS[m[3], m[1]]} {m[1]}"
    if m := re.fullmatch(
        r"(?:What day comes (\d) days after (\w+)|If today is (\w+), what day is it in (\d) days)\?", question
    ):
        k, day = (int(m[1]), m[2]) if m[1] else (int(m[4]), m[3])
        return (_DAY_INDEX[day] + timedelta(days=k)).strftime("%A")
    if m := re.fullmatch(
        r"(?:What day was it (\d) days before (\w+)|If today is (\w+), what day was it (\d) days ago)\?",
        question,
    ):
        k, day = (int(m[1]), m[2]) if m[1] else (int(m[4]), m[3])
        return (_DAY_INDEX[day] - timedelta(days=k)).strftime("%A")
    if m := re.fullmatch(r"Which number is (larger|smaller), (\d+) or (\d+)\?", question):
        pick = max if m[1] == "larger" else min
        return str(pick(int(m[2]), int(m[3])))
    if m := re.fullmatch(r"How many words are in this list: (.+)\?", question):
        return str(len(m[1].split(", ")))
    if m := re.fullmatch(r"Sort these numbers from smallest to largest: (.+)\.", question):
        return ", ".join(str(n) for n in sorted(int(x) for x in m[1].split(", ")))
    if m := re.fullmatch(r"(?:Write '(.+)' in capital letters|Convert '(.+)' to uppercase)\.", question):
        return (m[1] or m[2]).upper()
    if m := re.fullmatch(r"What is the (first|last) word in this list: (.+)\?", question):
        words = m[2].split(", ")
        return words[0] if m[1] == "first" else words[-1]
    raise AssertionError(f"no checker for {question!r}")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_answer_is_right(split: str) -> None:
    records = read(split)
    for record in records:
        assert record["output"] == expected_answer(record["instruction"]), record
    assert len(records) >= 5 * len(SKILLS)  # the skills take turns: several items of each
