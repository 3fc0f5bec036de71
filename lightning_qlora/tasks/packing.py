"""Packed training batches: several examples per row, no padding between them, no attention across them.

The examples of a batch (the sampler still chooses them, so epochs, resumes and DDP shards are as
without packing) are placed into as few rows of at most ``row_length`` tokens as first-fit decreasing
finds. Each example's ``position_ids`` start again at 0, and the batch carries no ``attention_mask`` for
the model: transformers (>= 4.56) then reads the example boundaries off the position ids and builds a
block-diagonal causal mask (SDPA and eager attention) or variable-length kernels (flash attention), so a
token never attends to another example. The first label of each example is ignored: in a row its
previous token belongs to the example before, and unpacked that label is never predicted either, so the
per-token losses equal the unpacked ones. Rows shorter than the longest one are padded at the end; the
padding forms a segment of its own with ignored labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_qlora.losses import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``row_length`` tokens (first-fit decreasing)."""
    if row_length < 1:
        raise ValueError(f"row_length must be a positive integer, got {row_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        size = lengths[index]
        if size > row_length:
            raise ValueError(f"example {index} has {size} tokens, more than the row length {row_length}")
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([index])
            room.append(row_length - size)
        else:
            rows[row].append(index)
            room[row] -= size
    return rows


def packed_token_efficiency(lengths: Sequence[int], row_length: int) -> tuple[int, int]:
    """(real tokens, tokens of the padded packed batch) for one batch of example lengths."""
    rows = pack_rows(lengths, row_length)
    longest = max(sum(lengths[i] for i in row) for row in rows)
    return sum(lengths), len(rows) * longest


def collate_packed(features: list[dict[str, Any]], row_length: int, pad_id: int) -> dict[str, Tensor]:
    """``input_ids``, ``position_ids``, ``labels`` of packed rows, and ``attention_mask`` marking the real
    tokens (for counting; the model must be called without it)."""
    lengths = [len(f["input_ids"]) for f in features]
    rows = pack_rows(lengths, row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for index in row:
            ids, n = features[index]["input_ids"], lengths[index]
            input_ids[r, at : at + n] = torch.as_tensor(ids)
            example_labels = torch.as_tensor(features[index]["labels"])
            example_labels[0] = IGNORE_INDEX
            labels[r, at : at + n] = example_labels
            position_ids[r, at : at + n] = torch.arange(n)
            real[r, at : at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "attention_mask": real}
