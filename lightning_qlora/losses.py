"""Causal-LM cross-entropy without the logits wall: the LM head and the loss over chunks of tokens.

A plain causal-LM loss materialises ``[tokens x vocab]`` logits in fp32, and autograd keeps them (and
their gradient) until backward: at long context they outgrow the whole 4-bit model. Here the hidden
states of the positions that have a target are gathered (prompt and padding positions never reach the
head), then the head and the summed cross-entropy run over chunks of ``chunk_tokens`` rows. When more
than one chunk is needed each chunk is wrapped in non-reentrant activation checkpointing, so its logits
are freed at once and recomputed, one chunk at a time, in backward. The head is called as a module, so a
quantized or LoRA-wrapped head works unchanged. Nothing here knows about LoRA.

The loss is returned as a *sum* with the number of target tokens, so callers can normalise over whatever
set of tokens they mean (an optimizer step across micro-batches and ranks: see
:mod:`lightning_qlora.tasks.token_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 128 * 2**20
"""fp32 logits budget of one chunk: the chunk's logits and their gradient stay near 2 x this."""


def chunk_tokens_for(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits fit in ``budget_bytes`` (at least 16 rows)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return max(16, budget_bytes // (4 * vocab_size))


def shifted_targets(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states that predict a token and those tokens: position t predicts label t + 1.

    Returns ``(hidden[n, H], targets[n])`` for the ``n`` positions whose next label is not ignored.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    states, targets = hidden[:, :-1], labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return states[keep], targets[keep]


def _head_cross_entropy_sum(
    head: Callable[[Tensor], Tensor], states: Tensor, targets: Tensor, softcap: float | None
) -> Tensor:
    logits = head(states).float()
    if softcap is not None:  # Gemma 2/3: logits = cap * tanh(logits / cap)
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunk_count(rows: int, chunk_tokens: int) -> int:
    """The number of chunks of at most ``chunk_tokens`` rows that hold ``rows`` rows."""
    return -(-rows // chunk_tokens)


def chunked_cross_entropy_sum(
    states: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk_tokens: int,
    softcap: float | None = None,
    min_chunks: int = 0,
) -> Tensor:
    """Sum of ``cross_entropy(head(states), targets)`` over rows, at most ``chunk_tokens`` rows at a time.

    One chunk runs directly (no recomputation: nothing to save); several are checkpointed so that only
    one chunk's logits exist at any time, in forward and in backward. ``min_chunks`` pads with empty
    chunks: the head then runs the same number of times on every process of a sharded model, whose head
    gathers its weights at each call (a collective that every process must join).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
    if min_chunks < 0:
        raise ValueError(f"min_chunks must be >= 0, got {min_chunks}")
    chunks = max(chunk_count(states.size(0), chunk_tokens), min_chunks)
    if chunks == 0:
        # no target at all: a zero that still depends on the graph, so backward works and adds nothing
        return states.sum() * 0.0
    if chunks == 1:
        return _head_cross_entropy_sum(head, states, targets, softcap)
    total: Tensor | None = None
    for index in range(chunks):
        start = index * chunk_tokens
        part = checkpoint(
            _head_cross_entropy_sum,
            head,
            states[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            softcap,
            use_reentrant=False,
        )
        total = part if total is None else total + part
    assert total is not None
    return total


def causal_lm_loss_sum(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    chunk_tokens: int | None,
    softcap: float | None = None,
    min_chunks: int = 0,
) -> tuple[Tensor, int]:
    """(summed next-token cross-entropy, number of target tokens) from the decoder's last hidden states.

    ``chunk_tokens=None`` is the plain path: every position's logits at once (what transformers does).
    ``min_chunks``: see :func:`chunked_cross_entropy_sum`.
    """
    states, targets = shifted_targets(hidden, labels)
    n = int(targets.numel())
    if chunk_tokens is None:
        logits = head(hidden).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), reduction="sum"
        )
        return loss, n
    return chunked_cross_entropy_sum(states, head, targets, chunk_tokens, softcap, min_chunks), n
