"""Users' model folders (tiny random Llama, Qwen2, Mistral, Gemma, SmolLM3 written with save_pretrained),
packed rows whose per-token losses equal the unpacked ones, and a loss that is the token mean of the step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from tiny_models import CAUSAL_LM_ARCHITECTURES, save_tiny_causal_lm

from lightning_qlora.tasks import CausalLMInstructionModule, InstructionDataModule
from lightning_qlora.tasks.instruction import IGNORE_INDEX
from lightning_qlora.tasks.packing import collate_packed, pack_rows

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}
LOSS_CHUNK = 4
"""Rows per loss chunk in the rank tests: several chunks per micro-batch, each head call its own."""
TURNS = [
    ("What is 2 + 3?", "5"),
    ("Name a color.", "Blue."),
    ("Capital of France?", "Paris, a city on the Seine."),
    ("Sort 3, 1, 2.", "1, 2, 3"),
    ("Say hello in French.", "Bonjour."),
    ("How many legs has a spider?", "Eight legs."),
    ("What is 7 times 6?", "42"),
]


def chats() -> list[dict[str, Any]]:
    out = []
    for i, (question, answer) in enumerate(TURNS):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 2:
            messages += [
                {"role": "user", "content": "Again, please."},
                {"role": "assistant", "content": answer},
            ]
        out.append({"messages": messages})
    return out


class TrainableLM(CausalLMInstructionModule):
    """A plain Trainer needs an optimizer from the module (the package's strategy would install one)."""

    captured: dict[str, torch.Tensor]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        self.captured = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    pytest.importorskip("gguf")
    from lightning_qlora.pretrained import smollm2_instruct_path

    return smollm2_instruct_path()


@pytest.fixture(scope="module")
def chat_data(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> InstructionDataModule:
    folder = tmp_path_factory.mktemp("chat")
    text = "".join(json.dumps(r) + "\n" for r in chats())
    (folder / "train.jsonl").write_text(text)
    (folder / "validation.jsonl").write_text(text)
    dm = InstructionDataModule(data_dir=str(folder), tokenizer_path=str(smollm2_dir), max_length=96)
    dm.read_records()
    return dm


def per_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """The cross-entropy of every target token, in row order."""
    kwargs = (
        {"position_ids": batch["position_ids"]} if packed else {"attention_mask": batch["attention_mask"]}
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits.float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return losses[targets != IGNORE_INDEX]


def assert_packed_equals_unpacked(model: torch.nn.Module, dm: InstructionDataModule) -> int:
    features = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    row_length = 2 * max(len(f["input_ids"]) for f in features)
    packed = collate_packed(features, row_length, pad_id=0)
    assert packed["input_ids"].size(0) < len(features)  # several examples share a row
    rows = pack_rows([len(f["input_ids"]) for f in features], row_length)
    unpacked = torch.cat([per_token_losses(model, dm.collate([features[i]]), False) for r in rows for i in r])
    together = per_token_losses(model, packed, True)
    torch.testing.assert_close(together, unpacked, rtol=1e-5, atol=1e-5)
    return packed["input_ids"].size(0)


@pytest.mark.parametrize("architecture", CAUSAL_LM_ARCHITECTURES)
def test_any_saved_causal_lm_folder_trains_with_packed_rows(
    architecture: str, tmp_path: Path, chat_data: InstructionDataModule
) -> None:
    folder = save_tiny_causal_lm(architecture, str(tmp_path / architecture), chat_data.tokenizer)
    module = CausalLMInstructionModule(pretrained_path=folder)
    assert module.model.config.model_type == architecture
    module.eval()
    assert_packed_equals_unpacked(module.model, chat_data)
    # the module's own (chunked) loss of a packed batch is the sum of the unpacked examples' losses
    features = [chat_data.datasets["train"][i] for i in range(4)]
    packed = collate_packed(features, 256, pad_id=0)
    module.chunk_tokens = 5  # several chunks
    with torch.no_grad():
        loss_packed, n_packed = module.loss_sum(packed)
        pieces = [module.loss_sum(chat_data.collate([f])) for f in features]
    assert n_packed == sum(n for _, n in pieces)
    torch.testing.assert_close(loss_packed, sum(loss for loss, _ in pieces), rtol=1e-5, atol=1e-5)


def test_packed_fit_on_a_saved_llama(
    tmp_path: Path, smollm2_dir: Path, chat_data: InstructionDataModule
) -> None:
    folder = save_tiny_causal_lm("llama", str(tmp_path / "llama"), chat_data.tokenizer)
    dm = InstructionDataModule(
        data_dir=str(chat_data.data_dir), tokenizer_path=folder, batch_size=4, max_length=256, packing=True
    )
    batch = next(iter(dm.train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].size(0) < 4
    report = dm.data_report()
    assert report["packing"] and 0.5 < report["token_efficiency"] <= 1.0
    lengths = [len(ids) for ids in dm.datasets["train"]["input_ids"]]
    useful = sum(lengths[i] for indices in dm.train_batches()[:2] for i in indices)
    model = TrainableLM(pretrained_path=folder, num_samples_to_generate=0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.tokens_seen == int(trainer.callback_metrics["train/tokens_seen"])
    assert model.tokens_seen == useful  # the real tokens of the two packed batches, not their slots


@pytest.mark.slow
def test_packed_losses_equal_unpacked_on_smollm2(smollm2_dir: Path, chat_data: InstructionDataModule) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    assert assert_packed_equals_unpacked(model, chat_data) >= 1


def micro_batches(dm: InstructionDataModule) -> list[dict[str, torch.Tensor]]:
    """Four micro-batches of 1, 3, 2 and 2 examples of unequal lengths and target counts."""
    features = [dm.datasets["train"][i] for i in range(8)]
    return [dm.collate(features[a:b]) for a, b in ((0, 1), (1, 4), (4, 6), (6, 8))]


def test_accumulated_micro_batches_give_the_gradients_of_one_big_batch() -> None:
    dm = InstructionDataModule(batch_size=8)
    dm.setup()
    batches = micro_batches(dm)
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    assert len(set(counts)) == 4 and len({b["input_ids"].size(1) for b in batches}) > 1
    torch.manual_seed(0)
    accumulated = TrainableLM(model_config=TINY, num_samples_to_generate=0)
    torch.manual_seed(0)
    reference = TrainableLM(model_config=TINY, num_samples_to_generate=0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, accumulate_grad_batches=4, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(accumulated, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    big = dm.collate([dm.datasets["train"][i] for i in range(8)])
    loss_sum, n = reference.loss_sum(big)
    assert n == sum(counts)
    (loss_sum / n).backward()
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert accumulated.captured.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(accumulated.captured[name], grad, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(
        trainer.callback_metrics["train/loss"], (loss_sum / n).detach(), rtol=1e-6, atol=0
    )
    # what a per-micro-batch mean would have given is measurably different: the test can fail
    with torch.no_grad():
        naive = sum(reference.loss_sum(b)[0] / c for b, c in zip(batches, counts, strict=True)) / 4
    assert abs(float(naive) - float(loss_sum.detach() / n)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "qlora_fsdp", "qlora_fsdp_tied"])
def test_two_ranks_give_the_gradients_of_one_process(tmp_path: Path, strategy: str) -> None:
    """Ranks with different token counts: the all-reduced step is the token mean over both ranks, with
    DDP and with the gradients sharded by qlora_fsdp. The loss is the chunked one (the decoder, then the
    head chunk by chunk, never the causal LM's forward): under qlora_fsdp the final norm (and, tied, the
    embedding shared with the head) must still be gathered, and their gradients reduce-scattered."""
    script = Path(__file__).with_name("token_loss_ddp_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), *sys.path])}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), strategy],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    dm = InstructionDataModule(batch_size=8)
    dm.setup()
    torch.manual_seed(0)
    config = {**TINY, "tie_word_embeddings": strategy.endswith("_tied")}
    reference = TrainableLM(model_config=config, num_samples_to_generate=0, loss_chunk_tokens=LOSS_CHUNK)
    assert reference.chunk_tokens == LOSS_CHUNK
    loss_sum, n = reference.loss_sum(dm.collate([dm.datasets["train"][i] for i in range(8)]))
    (loss_sum / n).backward()
    for name, p in reference.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], p.grad, rtol=0, atol=1e-6, msg=name)
    assert ranks[0]["loss"] == pytest.approx(float(loss_sum.detach() / n), rel=1e-6)
