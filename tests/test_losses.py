"""Chunked LM head + cross-entropy: the plain loss and gradients, without ever holding the full logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_qlora.losses import (
    IGNORE_INDEX,
    causal_lm_loss_sum,
    chunk_tokens_for,
    chunked_cross_entropy_sum,
)

VOCAB, HIDDEN = 1000, 24


def _inputs(seed: int = 0) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 40, HIDDEN, generator=g, requires_grad=True)
    head = nn.Linear(HIDDEN, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) * 0.3)
        head.bias.copy_(torch.randn(VOCAB, generator=g) * 0.1)
    labels = torch.randint(0, VOCAB, (3, 40), generator=g)
    labels[0, :25] = IGNORE_INDEX  # a prompt
    labels[1, 30:] = IGNORE_INDEX  # padding
    return hidden, head, labels


def _grads(
    chunk_tokens: int | None, softcap: float | None = None
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    hidden, head, labels = _inputs()
    loss, n = causal_lm_loss_sum(hidden, head, labels, chunk_tokens, softcap)
    loss.backward()
    assert hidden.grad is not None and head.weight.grad is not None
    return loss.detach(), n, hidden.grad, head.weight.grad


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_tokens", [7, 16, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_path(chunk_tokens: int, softcap: float | None) -> None:
    plain_loss, plain_n, plain_hidden, plain_weight = _grads(None, softcap)
    loss, n, grad_hidden, grad_weight = _grads(chunk_tokens, softcap)
    assert n == plain_n == int((_inputs()[2][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden, plain_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, plain_weight, rtol=1e-5, atol=1e-6)


def test_no_saved_tensor_holds_the_full_logits() -> None:
    """Autograd keeps only chunk-sized tensors (checkpointing recomputes each chunk's logits in backward)."""
    hidden, head, labels = _inputs()
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = causal_lm_loss_sum(hidden, head, labels, chunk_tokens=8)
    loss.backward()
    assert max(sizes) < 8 * VOCAB + 1  # one chunk's logits at most, never n_targets x vocab
    sizes.clear()
    hidden, head, labels = _inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss_sum(hidden, head, labels, chunk_tokens=None)
    assert max(sizes) >= n_targets * VOCAB  # the plain path does keep them: the check can fail


def test_no_target_gives_a_zero_loss_that_backpropagates() -> None:
    hidden, head, labels = _inputs()
    labels[:] = IGNORE_INDEX
    loss, n = causal_lm_loss_sum(hidden, head, labels, chunk_tokens=8)
    loss.backward()
    assert n == 0 and float(loss.detach()) == 0.0
    assert hidden.grad is not None and not hidden.grad.any()


def test_chunk_size_follows_the_memory_budget_and_bad_sizes_are_refused() -> None:
    assert chunk_tokens_for(49_152) == 128 * 2**20 // (4 * 49_152)  # SmolLM2: 682 rows of fp32 logits
    assert chunk_tokens_for(10**9) == 16
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        chunk_tokens_for(0)
    hidden, head, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer, got 0"):
        chunked_cross_entropy_sum(hidden[0], head, labels[0], 0)
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss_sum(hidden, head, labels[:, :-1], 8)


@pytest.mark.parametrize("labels_kept", [None, 0])
def test_min_chunks_pads_with_empty_head_calls_and_leaves_the_result_unchanged(
    labels_kept: int | None,
) -> None:
    """A sharded head must run as often on every process: padded chunks call it on no rows, add nothing."""
    hidden, head, labels = _inputs()
    if labels_kept == 0:
        labels[:] = IGNORE_INDEX  # a rank without targets still calls the head min_chunks times
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    calls: list[int] = []
    head.register_forward_pre_hook(lambda _m, args: calls.append(args[0].size(0)))
    expected, _ = causal_lm_loss_sum(hidden, head, labels, chunk_tokens=8)
    expected.backward()
    expected_grad = hidden.grad.clone() if hidden.grad is not None else None
    hidden.grad = None
    calls.clear()
    loss, _ = causal_lm_loss_sum(hidden, head, labels, chunk_tokens=8, min_chunks=12)
    assert len(calls) == 12 and sum(calls) == n_targets  # forward: 12 calls, the extra ones empty
    loss.backward()
    assert len(calls) == 24  # each chunk recomputed once in backward
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=0, atol=0)
    if expected_grad is not None:
        torch.testing.assert_close(hidden.grad, expected_grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="min_chunks must be >= 0, got -1"):
        chunked_cross_entropy_sum(hidden[0], head, labels[0], 8, min_chunks=-1)
