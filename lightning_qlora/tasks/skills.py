"""Short questions whose answers are computed, so a tuned model's exact match can be measured.

Arithmetic, unit conversions, weekdays, comparisons, counting, sorting and string tasks, each in a few
phrasings, answered with the bare result ("68", "3000 meters", "Thursday"). The packaged files in
``data/skills/`` are exactly what :func:`write_splits` writes (a test regenerates and compares them), and
no validation question appears in training. Released under CC0 like the other packaged data.

    python -m lightning_qlora.tasks.skills      # rewrite data/skills/{train,validation}.jsonl
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

Record = dict[str, str]

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = (
    "apple", "river", "candle", "garden", "pencil", "window", "tiger", "cloud", "orange", "bridge",
    "silver", "planet", "rocket", "forest", "button", "castle", "yellow", "spoon", "island", "mirror",
    "basket", "winter", "lemon", "guitar", "market", "dragon", "pillow", "ticket", "harbor", "jacket",
)  # fmt: skip
CONVERSIONS = (  # (from unit, to unit, factor)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)


def _addition(rng: random.Random) -> Record:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    q = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?"))
    return {"instruction": q.format(a=a, b=b), "output": str(a + b)}


def _subtraction(rng: random.Random) -> Record:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    q = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?"))
    return {"instruction": q.format(a=a, b=b), "output": str(a - b)}


def _multiplication(rng: random.Random) -> Record:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = rng.choice(("What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} x {b}?"))
    return {"instruction": q.format(a=a, b=b), "output": str(a * b)}


def _conversion(rng: random.Random) -> Record:
    source, target, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 15)
    q = rng.choice(("Convert {n} {s} to {t}.", "How many {t} are in {n} {s}?", "{n} {s} is how many {t}?"))
    return {"instruction": q.format(n=n, s=source, t=target), "output": f"{n * factor} {target}"}


def _weekday(rng: random.Random) -> Record:
    day, k = rng.randrange(7), rng.randint(1, 6)
    if rng.random() < 0.5:
        q = rng.choice(("What day comes {k} days after {d}?", "If today is {d}, what day is it in {k} days?"))
        answer = WEEKDAYS[(day + k) % 7]
    else:
        q = rng.choice(
            ("What day was it {k} days before {d}?", "If today is {d}, what day was it {k} days ago?")
        )
        answer = WEEKDAYS[(day - k) % 7]
    return {"instruction": q.format(k=k, d=WEEKDAYS[day]), "output": answer}


def _comparison(rng: random.Random) -> Record:
    a, b = rng.sample(range(1, 200), 2)
    if rng.random() < 0.5:
        q, answer = "Which number is larger, {a} or {b}?", max(a, b)
    else:
        q, answer = "Which number is smaller, {a} or {b}?", min(a, b)
    return {"instruction": q.format(a=a, b=b), "output": str(answer)}


def _counting(rng: random.Random) -> Record:
    words = rng.sample(WORDS, rng.randint(2, 7))
    return {"instruction": f"How many words are in this list: {', '.join(words)}?", "output": str(len(words))}


def _sorting(rng: random.Random) -> Record:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return {
        "instruction": f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _uppercase(rng: random.Random) -> Record:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    q = rng.choice(("Write '{t}' in capital letters.", "Convert '{t}' to uppercase."))
    return {"instruction": q.format(t=text), "output": text.upper()}


def _last_word(rng: random.Random) -> Record:
    words = rng.sample(WORDS, rng.randint(3, 5))
    which, answer = rng.choice((("first", words[0]), ("last", words[-1])))
    return {"instruction": f"What is the {which} word in this list: {', '.join(words)}?", "output": answer}


SKILLS: dict[str, Callable[[random.Random], Record]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "conversion": _conversion,
    "weekday": _weekday,
    "comparison": _comparison,
    "counting": _counting,
    "sorting": _sorting,
    "uppercase": _uppercase,
    "word_in_list": _last_word,
}
TRAIN_SIZE, VALIDATION_SIZE, SEED = 600, 60, 2024
DATA_NAME = "skills"


def generate(
    n_train: int = TRAIN_SIZE, n_validation: int = VALIDATION_SIZE, seed: int = SEED
) -> dict[str, list[Record]]:
    """Balanced over the skills, validation first; no question is repeated within or across splits."""
    rng = random.Random(seed)
    names = list(SKILLS)
    seen: set[str] = set()
    splits: dict[str, list[Record]] = {}
    for split, size in (("validation", n_validation), ("train", n_train)):
        records: list[Record] = []
        for _ in range(100 * size):
            if len(records) == size:
                break
            record = SKILLS[names[len(records) % len(names)]](rng)
            if record["instruction"] in seen:
                continue
            seen.add(record["instruction"])
            records.append({"instruction": record["instruction"], "input": "", "output": record["output"]})
        if len(records) < size:
            raise ValueError(f"only {len(records)} distinct {split} questions; ask for fewer")
        rng.shuffle(records)
        splits[split] = records
    return splits


def to_jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_splits(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in generate().items():
        (folder / f"{split}.jsonl").write_text(to_jsonl(records), encoding="utf-8")


if __name__ == "__main__":
    write_splits(Path(__file__).resolve().parent / "data" / DATA_NAME)
