"""Chat-template prompts, batched greedy answers and exact match; SmolLM2 end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_qlora.tasks import CausalLMInstructionModule, InstructionDataModule
from lightning_qlora.tasks.instruction import (
    IGNORE_INDEX,
    encode_instruction,
    format_chat_prompt,
    normalize_answer,
    split_prompts,
)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}


def test_normalize_answer() -> None:
    assert normalize_answer("  3000   meters.\n") == "3000 meters"
    assert normalize_answer("PLANET") != normalize_answer("planet")  # case matters (uppercase task)
    assert normalize_answer("The answer is 68.") != normalize_answer("68")


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"dataset='nope'.*\['alpaca', .*'skills'"):
        InstructionDataModule(dataset="nope")
    with pytest.raises(ValueError, match="eval_batch_size"):
        InstructionDataModule(eval_batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        CausalLMInstructionModule(model_config=TINY, max_new_tokens=0)


def test_chat_template_needs_a_tokenizer_that_has_one() -> None:
    dm = InstructionDataModule(dataset="skills", chat_template=True)  # MiniLM: no chat template
    with pytest.raises(ValueError, match="chat_template=true needs a tokenizer with a chat template"):
        dm.setup()


def test_batched_answers_equal_one_at_a_time_and_exact_match_is_measured() -> None:
    torch.manual_seed(0)
    model = CausalLMInstructionModule(model_config=TINY, max_new_tokens=5, exact_match=True).eval()
    dm = InstructionDataModule(dataset="skills", eval_batch_size=6)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].size(0) == 6
    prompts, references = split_prompts(batch)
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    together = model.generate_answers(prompts)
    alone = [model.generate_answers([p])[0] for p in prompts]
    assert together == alone
    for prompt, reference, ids, labels in zip(
        prompts, references, batch["input_ids"], batch["labels"], strict=True
    ):
        n = len(prompt) + len(reference)
        assert torch.equal(ids[:n], torch.cat([prompt, reference]))
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()


def test_validate_logs_exact_match_and_keeps_samples_by_step() -> None:
    import lightning.pytorch as pl

    torch.manual_seed(0)
    model = CausalLMInstructionModule(
        model_config=TINY, max_new_tokens=3, exact_match=True, num_samples_to_generate=3
    )
    dm = InstructionDataModule(dataset="skills", eval_batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert metrics["val/exact_match"] == 0.0  # a random tiny model does not answer "68"
    assert set(model.sample_history) == {0}
    rows = model.sample_history[0]
    assert len(rows) == 3
    assert set(rows[0]) == {"prompt", "response", "reference"}
    assert rows[0]["reference"] == dm.read_records()["validation"][0]["output"]


# ---- the real SmolLM2-135M-Instruct (converted once from the packaged GGUF; a minute the first time) ----


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    pytest.importorskip("gguf")
    from lightning_qlora.pretrained import smollm2_instruct_path

    return smollm2_instruct_path()


@pytest.mark.slow
def test_smollm2_chat_encoding_masks_the_prompt(smollm2_dir: Path) -> None:
    dm = InstructionDataModule(dataset="skills", chat_template=True, tokenizer_path="smollm2-135m-instruct")
    assert dm.tokenizer_path == smollm2_dir
    tok = dm.tokenizer
    record = {"instruction": "What is 12 + 30?", "input": "", "output": "42"}
    prompt = format_chat_prompt(record, tok)
    assert prompt.endswith("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n")
    ex = encode_instruction(record, tok, max_length=96, chat_template=True)
    response = [i for i, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.decode(response) == "42<|im_end|>"
    assert tok.decode(ex["input_ids"][: len(ex["input_ids"]) - len(response)]) == prompt


@pytest.mark.slow
@pytest.mark.timeout(1800)  # took over 10 minutes on a 2-core CPU shared with other jobs
def test_smollm2_experiment_trains_a_few_steps(smollm2_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    args = [
        "experiment=smollm2_instruct",
        "trainer.max_steps=2",
        "data.batch_size=2",
        "data.eval_batch_size=4",
        "trainer.limit_val_batches=1",
        "model.max_new_tokens=4",
        "model.num_samples_to_generate=2",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.cli.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"]["name"] == "val/exact_match"
    assert isinstance(summary["metric"]["untuned"], float)
    assert isinstance(summary["metric"]["tuned"], float)
    assert summary["train"]["steps"] == 2
    for when in ("untuned", "tuned"):
        assert isinstance(summary["validation"][when]["val/loss"], float)
        rows = summary["samples"][when]
        assert len(rows) == 2
        assert "assistant" in rows[0]["prompt"]
        assert rows[0]["reference"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
