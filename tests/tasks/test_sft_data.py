"""Users' data folders: conversational, prompt/completion and alpaca records, in JSON Lines, Parquet,
Arrow or a `save_to_disk` folder, with the SmolLM2 tokenizer (and chat template) the package converts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from lightning_qlora.cli import conf_dir
from lightning_qlora.cli.job import SetupError, build
from lightning_qlora.tasks import InstructionDataModule
from lightning_qlora.tasks.data_files import DataError
from lightning_qlora.tasks.instruction import IGNORE_INDEX, format_data_report

CHATS: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And times 4?"},
            {"role": "assistant", "content": "20"},
        ]
    },
    {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
    {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    },
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    pytest.importorskip("gguf")
    from lightning_qlora.pretrained import smollm2_instruct_path

    return smollm2_instruct_path()


def write_jsonl(folder: Path, train: list[dict[str, Any]], validation: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("validation", validation)):
        text = "".join(json.dumps(r) + "\n" for r in records)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return folder


def datamodule(folder: Path, tokenizer: Path, **kwargs: Any) -> InstructionDataModule:
    return InstructionDataModule(data_dir=str(folder), tokenizer_path=str(tokenizer), **kwargs)


def test_messages_train_on_the_assistant_turns_only(tmp_path: Path, smollm2_dir: Path) -> None:
    dm = datamodule(write_jsonl(tmp_path / "d", CHATS, CHATS[:1]), smollm2_dir, max_length=256)
    dm.read_records()
    assert dm.resolved_format == "messages"
    tok = dm.tokenizer
    ex = dm.datasets["train"][0]
    ids, labels = ex["input_ids"], ex["labels"]
    assert tok.decode(ids) == tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert spans == ["5<|im_end|>\n", "20<|im_end|>\n"]  # both assistant turns, nothing of the others
    assert dm.stats["train"]["examples"] == 3
    assert dm.stats["train"]["target_tokens"] == sum(
        sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in dm.datasets["train"]
    )


def _write_parquet(folder: Path, records: list[dict[str, Any]], name: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), folder / f"{name}.parquet")


def _write_arrow(folder: Path, records: list[dict[str, Any]], name: str) -> None:
    from datasets import Dataset

    Dataset.from_list(records).save_to_disk(str(folder / "tmp" / name))
    arrow = next((folder / "tmp" / name).glob("*.arrow"))
    arrow.rename(folder / f"{name}.arrow")


@pytest.mark.parametrize("layout", ["jsonl", "parquet", "arrow", "save_to_disk", "hub_shards"])
def test_every_file_layout_gives_the_same_examples(tmp_path: Path, smollm2_dir: Path, layout: str) -> None:
    reference = datamodule(write_jsonl(tmp_path / "ref", CHATS, CHATS[1:]), smollm2_dir)
    folder = tmp_path / layout
    folder.mkdir()
    splits = {"train": CHATS, "validation": CHATS[1:]}
    if layout == "jsonl":
        write_jsonl(folder, CHATS, CHATS[1:])
    elif layout == "parquet":
        for name, records in splits.items():
            _write_parquet(folder, records, name)
    elif layout == "arrow":
        for name, records in splits.items():
            _write_arrow(folder, records, name)
    elif layout == "hub_shards":  # the Hub's data/<split>-00000-of-00001.parquet
        (folder / "data").mkdir()
        _write_parquet(folder / "data", CHATS, "train-00000-of-00001")
        _write_parquet(folder / "data", CHATS[1:], "test-00000-of-00001")
    else:
        from datasets import Dataset, DatasetDict

        DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    dm = datamodule(folder, smollm2_dir)
    dm.read_records()
    reference.read_records()
    for split in ("train", "validation"):
        assert dm.datasets[split]["input_ids"] == reference.datasets[split]["input_ids"]
        assert dm.datasets[split]["labels"] == reference.datasets[split]["labels"]


def test_prompt_completion_and_mapped_sharegpt_columns(tmp_path: Path, smollm2_dir: Path) -> None:
    pairs = [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "Sky color:", "completion": " blue"}]
    dm = datamodule(write_jsonl(tmp_path / "pc", pairs, pairs), smollm2_dir)
    dm.read_records()
    assert dm.resolved_format == "prompt_completion"
    ex = dm.datasets["train"][0]
    answer = [t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE_INDEX]
    assert dm.tokenizer.decode(answer) == " 4" + dm.tokenizer.eos_token
    sharegpt = [
        {"conversations": [{"from": m["role"].replace("user", "human").replace("assistant", "gpt"),
                            "value": m["content"]} for m in c["messages"]]}
        for c in CHATS
    ]  # fmt: skip
    mapped = datamodule(
        write_jsonl(tmp_path / "sg", sharegpt, sharegpt),
        smollm2_dir,
        columns={"messages": "conversations", "role": "from", "content": "value"},
        roles={"human": "user", "gpt": "assistant"},
    )
    plain = datamodule(write_jsonl(tmp_path / "plain", CHATS, CHATS), smollm2_dir)
    mapped.read_records()
    plain.read_records()
    assert mapped.datasets["train"]["labels"] == plain.datasets["train"]["labels"]


BAD = {
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "turn 0: unknown role 'bot'"),
    "empty conversation": ({"messages": []}, "empty conversation"),
    "content not a string": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
        "turn 1: field 'content' is an integer",
    ),
    "no assistant": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    "missing role": ({"messages": [{"content": "q"}]}, "missing field 'role'"),
    "too long": (
        {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]},
        "more than data.max_length=64 with data.truncation=false",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_are_refused_with_file_and_line(tmp_path: Path, smollm2_dir: Path, case: str) -> None:
    record, cause = BAD[case]
    folder = write_jsonl(tmp_path / "d", [*CHATS, record], CHATS)
    dm = datamodule(folder, smollm2_dir, max_length=64, truncation=False)
    with pytest.raises(DataError) as info:
        dm.read_records()
    assert str(info.value).startswith(f"{folder / 'train.jsonl'}:4")
    assert cause in str(info.value)


def test_bad_parquet_row_is_named_by_file_and_row(tmp_path: Path, smollm2_dir: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    bad = {"messages": [{"role": "narrator", "content": "x"}]}
    _write_parquet(folder, [*CHATS, bad], "train")
    _write_parquet(folder, CHATS, "validation")
    with pytest.raises(DataError, match=r"train\.parquet: row 3: turn 0: unknown role 'narrator'"):
        datamodule(folder, smollm2_dir).read_records()


def test_truncation_on_cuts_and_counts(tmp_path: Path, smollm2_dir: Path) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    dm = datamodule(write_jsonl(tmp_path / "d", [*CHATS, long], CHATS), smollm2_dir, max_length=64)
    report = dm.data_report()
    assert report["splits"]["train"]["truncated"] == 1
    assert max(map(len, dm.datasets["train"]["input_ids"])) == 64
    assert "1 truncated" in format_data_report(report)


def test_plain_text_trains_on_every_token_and_mapped_text_columns(tmp_path: Path, smollm2_dir: Path) -> None:
    texts = [{"body": "The sky is blue."}, {"body": "Two and two make four."}, {"body": "Bye."}]
    dm = datamodule(write_jsonl(tmp_path / "t", texts, texts), smollm2_dir, columns={"text": "body"})
    dm.read_records()
    assert dm.resolved_format == "text"
    tok = dm.tokenizer
    for record, ex in zip(texts, dm.datasets["train"], strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]).endswith(record["body"])
        assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]  # every token that can be predicted
    longer = sum(len(ids) > 4 for ids in dm.datasets["train"]["input_ids"])
    short = datamodule(tmp_path / "t", smollm2_dir, columns={"text": "body"}, max_length=4)
    assert short.data_report()["splits"]["train"]["truncated"] == longer >= 2
    plain = [{"text": t["body"]} for t in texts]
    bad = write_jsonl(tmp_path / "bad", [*plain, {"text": "  "}], plain)
    with pytest.raises(DataError, match=r"train\.jsonl:4: empty 'text', so nothing to learn"):
        datamodule(bad, smollm2_dir).read_records()


def test_unrecognised_keys_and_bad_settings(tmp_path: Path, smollm2_dir: Path) -> None:
    qa = [{"question": "q", "answer": "a"}]
    folder = write_jsonl(tmp_path / "d", qa, qa)
    with pytest.raises(DataError, match=r"train\.jsonl:1: cannot tell the data format from the keys"):
        datamodule(folder, smollm2_dir).read_records()
    with pytest.raises(ValueError, match=r"data.format='chatml' is not a format"):
        datamodule(folder, smollm2_dir, format="chatml")
    with pytest.raises(ValueError, match=r"data.columns has 'question'"):
        datamodule(folder, smollm2_dir, columns={"question": "q"})
    with pytest.raises(ValueError, match=r"data.roles.human='person' is not a role"):
        datamodule(folder, smollm2_dir, roles={"human": "person"})
    mapped = datamodule(folder, smollm2_dir, columns={"prompt": "question", "completion": "answer"})
    mapped.read_records()
    assert mapped.resolved_format == "prompt_completion"


def test_the_command_refuses_bad_chat_data_before_the_model(tmp_path: Path, smollm2_dir: Path) -> None:
    folder = write_jsonl(tmp_path / "d", [*CHATS, {"messages": [{"role": "user", "content": 1}]}], CHATS)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.output_dir={tmp_path}", "experiment=smoke_tiny_llama", "logger=none",
            f"model.pretrained_path={tmp_path / 'no_model_yet'}", f"data.data_dir={folder}",
            f"data.tokenizer_path={smollm2_dir}",
        ])  # fmt: skip
    cause = r"^data: DataError: .*train\.jsonl:4: turn 0: field 'content' is an integer"
    with pytest.raises(SetupError, match=cause):
        build(cfg)  # the model folder does not even exist: the data is checked first


def test_conversations_need_a_tokenizer_with_a_chat_template(tmp_path: Path) -> None:
    folder = write_jsonl(tmp_path / "d", CHATS, CHATS)
    dm = InstructionDataModule(data_dir=str(folder))  # MiniLM's tokenizer: no chat template
    with pytest.raises(
        ValueError, match=r"holds conversations \(messages\), which need a tokenizer with a chat"
    ):
        dm.read_records()
    alpaca = write_jsonl(tmp_path / "a", [{"instruction": "x"}], [{"instruction": "x"}])
    with pytest.raises(DataError, match=r"jsonl:1: missing field 'output'; alpaca records need instruction"):
        InstructionDataModule(data_dir=str(alpaca)).read_records()
