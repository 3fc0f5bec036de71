"""Instruction tuning of a causal language model: alpaca prompts, or the model's own chat template.

The loss is on the response only: prompt tokens and padding get the label ``-100``, so the model is not
trained to reproduce the (repetitive) prompt template. A chat model (SmolLM2-Instruct) is prompted through
its tokenizer's chat template, as it was trained; its answers can be scored by exact match. As in
:mod:`.classification`, LoRA, quantization and the optimizer are applied from outside by the Trainer,
so there is no ``configure_optimizers``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler
from torchmetrics import MeanMetric

from lightning_qlora.losses import causal_lm_loss_sum, chunk_count, chunk_tokens_for
from lightning_qlora.pretrained import resolve_model_path
from lightning_qlora.resumable import EpochRandomSampler
from lightning_qlora.strategies.support import SHARDS_4BIT_ATTR

from .classification import (
    DATA_DIR,
    JsonlDataModule,
    TokenCountingModule,
    check_pretrained_dir,
    default_pretrained_path,
    load_tokenizer,
    pad_sequences,
)
from .data_files import DataError, RecordSchema
from .packing import collate_packed, packed_token_efficiency
from .record_files import read_folder
from .sft_formats import ROLES, check_format_settings, detect_format, encode_messages, normalize_record
from .token_loss import StepTokenMean

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("lightning_qlora.tasks")

IGNORE_INDEX = -100
PROMPT_TEMPLATE: dict[str, str] = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
TINY_LLAMA_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)
"""Defaults for a from-scratch model: small enough to train a few steps on a CPU in tests."""
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling")
"""Config fields of models whose forward rescales the logits (Cohere, Granite): they keep the plain loss."""


def _identity(x: Tensor) -> Tensor:
    return x


def format_prompt(record: Mapping[str, Any]) -> str:
    """The alpaca prompt for a record; the ``input`` section is left out when the input is empty."""
    if str(record.get("input") or "").strip():
        return PROMPT_TEMPLATE["prompt_input"].format(
            instruction=record["instruction"], input=record["input"]
        )
    return PROMPT_TEMPLATE["prompt_no_input"].format(instruction=record["instruction"])


def chat_user_message(record: Mapping[str, Any]) -> str:
    """The user turn of a chat prompt: the instruction, then the input (if any) after a blank line."""
    extra = str(record.get("input") or "").strip()
    return f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])


def format_chat_prompt(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt as the model's chat template writes it, up to where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template=true needs a tokenizer with a chat template; {tokenizer.name_or_path!r} has "
            "none. Use chat_template=false (the alpaca prompt) or a chat model's folder."
        )
    messages = [{"role": "user", "content": chat_user_message(record)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids, falling back to [CLS]/[SEP] for WordPiece tokenizers that have no BOS/EOS."""

    def first(*ids: Any) -> int | None:
        return next((int(i) for i in ids if i is not None), None)

    bos = first(tokenizer.bos_token_id, tokenizer.cls_token_id)
    eos = first(tokenizer.eos_token_id, tokenizer.sep_token_id)
    if eos is None:
        raise ValueError("The tokenizer has neither an EOS nor a SEP token to end responses with.")
    pad = first(tokenizer.pad_token_id, eos)
    assert pad is not None
    return bos, eos, pad


def encode_instruction(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    chat_template: bool = False,
) -> dict[str, list[int]]:
    """Tokenize prompt and response separately so the labels can mask the prompt exactly.

    If the pair is too long, the response keeps at least a quarter of ``max_length`` (so every example has
    some loss) and the prompt is cut from the left, which keeps ``### Response:`` next to the answer.
    With ``chat_template`` the prompt is the tokenizer's chat template (which writes its own start
    tokens, so no BOS is added) and the response ends with the template's end-of-turn token (EOS).
    """
    bos, eos, _ = special_token_ids(tokenizer)
    if chat_template:
        prompt = list(tokenizer(format_chat_prompt(record, tokenizer), add_special_tokens=False)["input_ids"])
    else:
        prompt = ([bos] if bos is not None else []) + list(
            tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
        )
    response = [*tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"], eos]
    return join_pair(*truncate_pair(prompt, response, max_length))


def encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Plain text with labels on every token: BOS (if the tokenizer has one), the text, EOS.

    The first token is never predicted (nothing comes before it), so it is the "prompt": validation
    samples continue from it, and truncation keeps it and cuts the end.
    """
    bos, eos, _ = special_token_ids(tokenizer)
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    if bos is not None:
        return join_pair([bos], ids)
    return join_pair(ids[:1], ids[1:])


def truncate_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a (prompt, response) pair to ``max_length``: the response keeps at least a quarter of it and
    the prompt loses its start (see :func:`encode_instruction`)."""
    if len(prompt) + len(response) > max_length:
        keep_response = min(len(response), max(max_length - len(prompt), max_length // 4))
        response = response[:keep_response]
        prompt = prompt[len(prompt) - (max_length - keep_response) :]
    return prompt, response


def join_pair(prompt: list[int], response: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def prompt_ids(text: str, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[int]:
    """A prompt's ids: through the chat template as a user turn, or as plain text after the BOS."""
    if chat_template:
        messages = [{"role": "user", "content": text}]
        rendered = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    bos = special_token_ids(tokenizer)[0]
    return ([bos] if bos is not None else []) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar-length examples, in random order: far less padding than random batches.

    Each epoch: take ``sampler``'s shuffled indices, cut them into mega-batches of ``batch_size *
    mega_batch_mult``, sort each mega-batch by length and split it into batches, then shuffle the batch
    order, putting the batch with the longest example first so an out-of-memory error shows up at the first
    step. The mega-batches keep batch composition random; the sort makes the padding small.

    It is a ``BatchSampler`` whose ``sampler`` decides which indices it sees and in what order, so under DDP
    Lightning injects a ``DistributedSampler`` in its place and every rank groups its own disjoint shard
    (the same number of batches on every rank). The order is a function of the sampler's ``seed + epoch``
    alone, so a resumed run sees the batches an uninterrupted one would; Lightning calls ``set_epoch`` on
    the sampler at each epoch start, and outside Lightning the epoch also advances on every ``__iter__``.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: Sequence[int],
        mega_batch_mult: int = 8,
    ) -> None:
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be a positive integer, got {mega_batch_mult}.")
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = list(lengths)
        self.mega_batch_mult = mega_batch_mult

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        order = list(self.sampler)  # this epoch's shuffle (this rank's shard under DDP)
        self.set_epoch(epoch + 1)
        # The batch order is drawn from a generator of its own, seeded like the sampler: the same epoch
        # gives the same batches, on every rank and after a resume.
        generator = torch.Generator().manual_seed(int(getattr(self.sampler, "seed", 0)) + epoch + 1_000_003)
        mega = self.batch_size * self.mega_batch_mult
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches.insert(0, batches.pop(longest))
        yield from batches


class InstructionDataModule(JsonlDataModule):
    """Instruction or chat records, with labels on the responses only, padded or packed batches.

    Use the tokenizer of the model being trained: the MiniLM default matches
    :class:`CausalLMInstructionModule` built from a config; for a pretrained model pass its folder (or a
    name of :mod:`lightning_qlora.pretrained`). ``dataset`` names a packaged folder (``alpaca``: open-ended
    answers; ``skills``: computed answers, for exact match) and is ignored when ``data_dir`` is given.
    ``data_dir`` is any folder :func:`.record_files.read_folder` reads (JSON Lines, Parquet, Arrow, a
    ``save_to_disk`` folder) in one of the formats of :mod:`.sft_formats`, recognised from the keys of the
    first record or named by ``format``; ``columns`` and ``roles`` map the user's names onto the format's.
    ``chat_template`` prompts through the tokenizer's chat template instead of the alpaca template (the
    ``messages`` format always uses it). ``truncation=False`` refuses, before training, an example longer
    than ``max_length`` instead of cutting it. ``packing`` puts the examples of each training batch into
    as few rows of ``max_length`` tokens as fit (:mod:`.packing`). ``eval_batch_size`` (default:
    ``batch_size``) sizes validation batches, which generation makes slow.
    """

    default_data = "alpaca"

    def __init__(
        self,
        data_dir: str | None = None,
        tokenizer_path: str | None = None,
        batch_size: int = 8,
        max_length: int = 128,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 42,
        validation_split: float | None = None,
        dataset: str = "alpaca",
        chat_template: bool = False,
        eval_batch_size: int | None = None,
        format: str | None = None,
        columns: dict[str, str] | None = None,
        roles: dict[str, str] | None = None,
        truncation: bool = True,
        packing: bool = False,
    ) -> None:
        packaged = sorted(p.name for p in DATA_DIR.iterdir() if (p / "train.jsonl").is_file())
        if data_dir is None and dataset not in packaged:
            raise ValueError(f"dataset={dataset!r} is not a packaged dataset; choose one of {packaged}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive integer or null, got {eval_batch_size}.")
        check_format_settings(format, columns)
        for key, value in (roles or {}).items():
            if value not in ROLES:
                raise ValueError(f"data.roles.{key}={value!r} is not a role; map onto one of {list(ROLES)}")
        if tokenizer_path is not None:  # a model name (e.g. smollm2-135m-instruct) becomes its folder
            tokenizer_path = str(resolve_model_path(tokenizer_path))
        super().__init__(
            data_dir, tokenizer_path, batch_size, max_length, num_workers, seed, validation_split
        )
        if data_dir is None:
            self.data_dir = DATA_DIR / dataset
        self.group_by_length = group_by_length
        self.chat_template = chat_template
        self.eval_batch_size = eval_batch_size
        self.format = format
        self.columns = dict(columns or {})
        self.roles = dict(roles or {})
        self.truncation = truncation
        self.packing = packing
        self.resolved_format: str | None = format
        self.sources: dict[str, list[str]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        # tokenizer_path is left out: with a logger, Lightning merges these hparams with the module's and
        # refuses differing values, yet the module may hold None (its pretrained folder) for the same path.
        # The module checks that the tokenizers agree instead (on_fit_start).
        self.save_hyperparameters(ignore=["tokenizer_path"])

    def schema(self) -> RecordSchema:
        return RecordSchema(
            required={"instruction": (str,), "output": (str,)}, optional={"input": (str, type(None))}
        )

    def read_records(self) -> dict[str, Dataset]:
        """Read, check and tokenize both splits (once), before any model loads: a bad record, a tokenizer
        without the chat template the data needs, or (``truncation=False``) a too long example is an
        error naming the file and line or row."""
        if self.raw:
            return self.raw
        splits = read_folder(self.data_dir, self.validation_split, self.seed)
        fmt = self.format or detect_format(splits["train"][0], self.columns)
        if fmt == "messages" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"{self.data_dir} holds conversations (messages), which need a tokenizer with a chat "
                f"template; {self.tokenizer.name_or_path!r} has none. Use a chat model's folder "
                "(model.pretrained_path, or data.tokenizer_path)."
            )
        if self.chat_template:
            format_chat_prompt({"instruction": ""}, self.tokenizer)  # no chat template: say so now
        self.resolved_format = fmt
        raw: dict[str, Dataset] = {}
        for split, records in splits.items():
            normalized = [normalize_record(r, fmt, self.columns, self.roles) for r in records]
            if normalized and not any(_response_text(r, fmt).strip() for r in normalized):
                raise DataError(
                    f"{self.data_dir}: every {split} record's {_RESPONSE_FIELD[fmt]} is empty, so there is "
                    "nothing to learn (the loss is on the response alone). Fill in the responses, or remove "
                    "those records."
                )
            self.sources[split] = [r.where for r in records]
            raw[split] = Dataset.from_list(normalized)
            self.datasets[split] = self._encode_split(normalized, self.sources[split], split)
        self.raw = raw
        return raw

    def _encode_record(self, record: Mapping[str, Any], where: str) -> dict[str, list[int]]:
        tokenizer, chat = self.tokenizer, self.chat_template
        if self.resolved_format == "messages":
            return encode_messages(record["messages"], tokenizer, where)
        if self.resolved_format == "text":
            return encode_text(record["text"], tokenizer)
        if self.resolved_format == "prompt_completion":
            prompt, response_text = prompt_ids(record["prompt"], tokenizer, chat), record["completion"]
        else:
            prompt = (
                prompt_ids(chat_user_message(record), tokenizer, True)
                if chat
                else prompt_ids(format_prompt(record), tokenizer, False)
            )
            response_text = record["output"]
        eos = special_token_ids(tokenizer)[1]
        return join_pair(prompt, [*tokenizer(str(response_text), add_special_tokens=False)["input_ids"], eos])

    def _encode_split(self, records: list[dict[str, Any]], sources: list[str], split: str) -> Dataset:
        max_length = self.max_length
        columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        truncated = 0
        for record, where in zip(records, sources, strict=True):
            example = self._encode_record(record, where)
            length = len(example["input_ids"])
            if length > max_length:
                if not self.truncation:
                    raise DataError(
                        f"{where}: {length} tokens, more than data.max_length={max_length} with "
                        "data.truncation=false; raise max_length, shorten the record or set truncation=true"
                    )
                truncated += 1
                if self.resolved_format == "messages":
                    example = {k: v[:max_length] for k, v in example.items()}
                else:
                    prompt_len = example["labels"].count(IGNORE_INDEX)
                    ids = example["input_ids"]
                    example = join_pair(*truncate_pair(ids[:prompt_len], ids[prompt_len:], max_length))
            columns["input_ids"].append(example["input_ids"])
            columns["labels"].append(example["labels"])
        self.stats[split] = {
            "examples": len(records),
            "tokens": sum(map(len, columns["input_ids"])),
            "target_tokens": sum(sum(t != IGNORE_INDEX for t in labels[1:]) for labels in columns["labels"]),
            "truncated": truncated,
        }
        return Dataset.from_dict(columns)

    def encode(self, split: Dataset) -> Dataset:
        raise NotImplementedError("InstructionDataModule encodes while reading (read_records)")

    def setup(self, stage: str | None = None) -> None:
        self.read_records()

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.pad_inputs(features, special_token_ids(self.tokenizer)[2])
        batch["labels"] = pad_sequences([f["labels"] for f in features], IGNORE_INDEX)
        return batch

    def collate_packed(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        return collate_packed(features, self.max_length, special_token_ids(self.tokenizer)[2])

    def train_batches(self) -> list[list[int]]:
        """The first epoch's training batches (indices), as the training loader draws them."""
        sampler = self.train_dataloader().batch_sampler  # a new sampler: drawing it moves no other
        assert sampler is not None
        return list(sampler)

    def data_report(self) -> dict[str, Any]:
        """What training will see: examples, tokens, truncated examples, and the share of real tokens in
        the first epoch's batches (packed or padded)."""
        self.read_records()
        lengths = [len(ids) for ids in self.datasets["train"]["input_ids"]]
        real = slots = 0
        for batch in self.train_batches():
            sizes = [lengths[i] for i in batch]
            if self.packing:
                used, total = packed_token_efficiency(sizes, self.max_length)
            else:
                used, total = sum(sizes), len(sizes) * max(sizes)
            real, slots = real + used, slots + total
        return {
            "format": self.resolved_format,
            "data_dir": str(self.data_dir),
            "max_length": self.max_length,
            "packing": self.packing,
            "splits": dict(self.stats),
            "token_efficiency": real / slots if slots else None,
        }

    def train_dataloader(self) -> DataLoader:
        self.setup()
        collate = self.collate_packed if self.packing else self.collate
        if not self.group_by_length:
            sampler: Any = EpochRandomSampler(self.datasets["train"], self.seed)
            return self.loader("train", sampler=sampler, collate_fn=collate)
        lengths = [len(ids) for ids in self.datasets["train"]["input_ids"]]
        # Built inside the hook, so under DDP Lightning re-creates it around a DistributedSampler.
        batches = LengthGroupedBatchSampler(
            EpochRandomSampler(range(len(lengths)), self.seed), self.batch_size, lengths=lengths
        )
        return self.loader("train", batch_sampler=batches, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        if self.eval_batch_size is None:
            return super().val_dataloader()
        self.setup()
        batches = BatchSampler(SequentialSampler(self.datasets["validation"]), self.eval_batch_size, False)
        return self.loader("validation", batch_sampler=batches)


def format_data_report(report: Mapping[str, Any]) -> str:
    """The data report as a few lines for the console."""
    lines = [
        f"Data: {report['data_dir']} ({report['format']}), max_length {report['max_length']}, "
        f"packing {'on' if report['packing'] else 'off'}"
    ]
    for split, s in report["splits"].items():
        lines.append(
            f"  {split:<10} {s['examples']:>7} examples {s['tokens']:>9} tokens "
            f"{s['target_tokens']:>9} trained tokens {s['truncated']:>5} truncated"
        )
    if report.get("token_efficiency") is not None:
        what = "packed" if report["packing"] else "padded"
        lines.append(f"  real tokens in {what} training batches: {100 * report['token_efficiency']:.1f}%")
    return "\n".join(lines)


class CausalLMInstructionModule(TokenCountingModule):
    """A causal LM (pretrained, or a tiny Llama built from a config) trained on response tokens.

    Logs ``train/loss``, ``val/loss``, ``val/ppl`` and the token counters; after each validation epoch it
    greedily answers the first ``num_samples_to_generate`` validation prompts and logs the text. With
    ``exact_match`` it answers every validation prompt (greedy, batched) and logs ``val/exact_match``: the
    share of answers equal to the reference once whitespace and a final period are ignored.
    ``pretrained_path`` is a model folder or a name from :mod:`lightning_qlora.pretrained`
    (``smollm2-135m-instruct``). The samples of each validation, by step, are kept in ``sample_history``.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer_path: str | None = None,
        num_samples_to_generate: int = 2,
        max_new_tokens: int = 16,
        exact_match: bool = False,
        chunked_loss: bool = True,
        loss_chunk_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if loss_chunk_tokens is not None and (isinstance(loss_chunk_tokens, bool) or loss_chunk_tokens < 1):
            raise ValueError(
                f"loss_chunk_tokens must be a positive integer or null, got {loss_chunk_tokens!r}"
            )
        if pretrained_path is not None and model_config is not None:
            raise ValueError("Pass either pretrained_path or model_config, not both.")
        if max_new_tokens < 1 or num_samples_to_generate < 0:
            raise ValueError(
                f"max_new_tokens must be >= 1 and num_samples_to_generate >= 0, got {max_new_tokens} "
                f"and {num_samples_to_generate}."
            )
        path = (
            check_pretrained_dir(resolve_model_path(pretrained_path)) if pretrained_path is not None else None
        )
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM, LlamaConfig

        tokenizer_source = (resolve_model_path(tokenizer_path) if tokenizer_path else None) or path
        tokenizer_source = tokenizer_source or default_pretrained_path()
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(tokenizer_source)
        bos, eos, pad = special_token_ids(self.tokenizer)
        self.model: PreTrainedModel
        if path is not None:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True
            )
        else:
            ids = dict(vocab_size=len(self.tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
            config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **ids, **(model_config or {})})
            self.model = AutoModelForCausalLM.from_config(config)
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodule modes
        self.num_samples_to_generate = num_samples_to_generate
        self.max_new_tokens = max_new_tokens
        self.exact_match = exact_match
        self.chunk_tokens = self._loss_chunk_tokens(chunked_loss, loss_chunk_tokens)
        self.step_loss = StepTokenMean()
        self.last_step_loss: float | None = None
        """The token-mean loss of the last optimizer step (the curves read it)."""
        self.val_loss = MeanMetric()
        self.val_exact_match = MeanMetric()
        self._sample_prompts: list[Tensor] = []
        self._samples: list[dict[str, str]] = []
        self.sample_history: dict[int, list[dict[str, str]]] = {}
        """Greedy samples of each validation run by global step: {step: [{prompt, response, reference}]}."""

    def on_fit_start(self) -> None:
        """Different tokenizers in data and model train on garbage ids without any error: refuse early."""
        data_tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if data_tokenizer is not None and data_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                "The datamodule's tokenizer differs from the model's: pass the model folder as the "
                "datamodule's tokenizer_path."
            )

    def _loss_chunk_tokens(self, chunked: bool, chunk_tokens: int | None) -> int | None:
        """Rows per loss chunk, or None for the plain path (off, or a model whose logits are transformed
        in ways the chunked path does not repeat)."""
        config = self.model.config
        transformed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
        if not chunked or transformed or getattr(config, "output_router_logits", False):
            return None
        return chunk_tokens or chunk_tokens_for(int(self.model.get_output_embeddings().out_features))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Any:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids
        )

    def loss_sum(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        """(summed cross-entropy over the batch's target tokens, their number).

        A packed batch (it has ``position_ids``) goes to the model without its attention mask, so the
        model separates the examples by their position ids (see :mod:`.packing`).
        """
        position_ids = batch.get("position_ids")
        mask = None if position_ids is not None else batch["attention_mask"]
        inputs = dict(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids, use_cache=False
        )
        if self.chunk_tokens is None:
            logits = self.model(**inputs).logits
            return causal_lm_loss_sum(logits, _identity, batch["labels"], None)
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        chunks = self._chunks_on_every_rank(batch["labels"], self.chunk_tokens)
        return causal_lm_loss_sum(hidden, head, batch["labels"], self.chunk_tokens, softcap, chunks)

    def _chunks_on_every_rank(self, labels: Tensor, chunk_tokens: int) -> int:
        """Under a strategy that shards the model, the most loss chunks of any rank (0 otherwise).

        There the LM head is an FSDP unit that gathers its weights at each call (and each recomputation
        in backward): every rank must call it as often as the others, or their collectives mismatch. One
        scalar all-reduce per micro-batch.
        """
        trainer = self._trainer
        if trainer is None or not getattr(trainer.strategy, SHARDS_4BIT_ATTR, False):
            return 0
        rows = int((labels[:, 1:] != IGNORE_INDEX).sum())
        count = torch.tensor(chunk_count(rows, chunk_tokens), device=labels.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, tokens = self.loss_sum(batch)
        self.step_loss.add(loss_sum, tokens)
        self.count_tokens(batch["attention_mask"])
        # the sum: the gradients become the step's token mean in on_before_optimizer_step
        return loss_sum

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Scale the gradients to the token mean of the whole step (micro-batches and ranks)."""
        loss, tokens = self.step_loss.finish_step(self)
        self.last_step_loss = loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self.log("train/target_tokens", float(tokens), on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_epoch_start(self) -> None:
        self._sample_prompts = []
        self._samples = []

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, tokens = self.loss_sum(batch)
        loss = loss_sum / max(tokens, 1)
        if tokens:
            self.val_loss.update(loss, weight=tokens)  # the token mean over the whole validation set
        size = batch["input_ids"].size(0)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        prompts, references = split_prompts(batch)
        if self.exact_match:
            responses = self.generate_answers(prompts)
            hits = [
                normalize_answer(r) == normalize_answer(self._decode(ref))
                for r, ref in zip(responses, references, strict=True)
            ]
            self.val_exact_match.update(torch.tensor(hits, dtype=torch.float32))
            self.log(
                "val/exact_match",
                self.val_exact_match,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=size,
            )
            for prompt, response, reference in zip(prompts, responses, references, strict=True):
                if len(self._samples) < self.num_samples_to_generate:
                    self._samples.append(
                        {
                            "prompt": self._decode(prompt),
                            "response": response,
                            "reference": self._decode(reference),
                        }
                    )
        else:
            room = self.num_samples_to_generate - len(self._sample_prompts)
            self._sample_prompts.extend(p.detach() for p in prompts[: max(room, 0)])
        return loss

    def _decode(self, ids: Tensor) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @torch.no_grad()
    def generate_answers(self, prompts: Sequence[Tensor]) -> list[str]:
        """Greedy answers to unpadded prompts, as one left-padded batch (a decoder continues on the right).

        Generation stops at EOS or after ``max_new_tokens``; the answers are decoded without special tokens.
        """
        if not prompts:
            return []
        _, eos, pad = special_token_ids(self.tokenizer)
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = prompt.to(self.device)
            mask[row, longest - len(prompt) :] = 1
        out = self.model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        return [self._decode(row[longest:]) for row in out]

    def generate_samples(self, prompts: Sequence[Tensor]) -> list[tuple[str, str]]:
        """(prompt, greedy answer) pairs for unpadded prompt ids."""
        return [(self._decode(p), r) for p, r in zip(prompts, self.generate_answers(prompts), strict=True)]

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_called:
            self.log("val/ppl", torch.exp(self.val_loss.compute()), on_step=False, on_epoch=True)
        if self.trainer.sanity_checking:
            return
        if not self.exact_match and self._sample_prompts:
            self._samples = [
                {"prompt": p, "response": r} for p, r in self.generate_samples(self._sample_prompts)
            ]
        rows, self._samples, self._sample_prompts = self._samples, [], []
        if not rows:
            return
        self.sample_history[self.global_step] = rows
        if not self.trainer.is_global_zero:
            return
        columns = list(rows[0])
        text_loggers = [lg for lg in self.loggers if callable(getattr(lg, "log_text", None))]
        for lg in text_loggers:
            lg.log_text(  # type: ignore[attr-defined]
                key="val/samples",
                columns=columns,
                data=[[row[c] for c in columns] for row in rows],
                step=self.global_step,
            )
        if not text_loggers:
            for row in rows:
                text = "\n".join(f"{c}: {row[c]}" for c in columns)
                log.info("step %d sample\n%s", self.global_step, text)


def split_prompts(batch: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Each row's prompt ids (before its first label) and reference ids (the labels, without padding)."""
    prompts, references = [], []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        response = (labels != IGNORE_INDEX).nonzero()
        prompt_len = int(response[0]) if len(response) else int(mask.sum())
        prompts.append(ids[:prompt_len])
        references.append(labels[labels != IGNORE_INDEX])
    return prompts, references


def normalize_answer(text: str) -> str:
    """What exact match compares: words joined by single spaces, without a final period."""
    return " ".join(text.split()).removesuffix(".").strip()


_RESPONSE_FIELD = {
    "messages": "assistant turn", "prompt_completion": '"completion"', "alpaca": '"output"', "text": '"text"',
}  # fmt: skip
_RESPONSE_KEY = {"prompt_completion": "completion", "alpaca": "output", "text": "text"}


def _response_text(record: Mapping[str, Any], fmt: str) -> str:
    """What the loss is computed on in a normalized record of format `fmt`."""
    if fmt == "messages":
        return "".join(m["content"] for m in record["messages"] if m["role"] == "assistant")
    return str(record[_RESPONSE_KEY[fmt]])
