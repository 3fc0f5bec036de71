"""The adapters' dropout: nn.Dropout's distribution and scaling from a cheaper mask."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_qlora.lora.dropout import AdapterDropout
from lightning_qlora.lora.layer import LoRALinear


def test_each_value_is_kept_with_probability_1_minus_p_and_scaled() -> None:
    torch.manual_seed(0)
    drop = AdapterDropout(0.1)
    x = torch.ones(1000, 1000)
    out = drop(x)
    kept = out != 0
    # 1e6 independent draws: the kept fraction's standard deviation is 3e-4, so 2e-3 is over 6 sigma.
    assert abs(kept.float().mean().item() - 0.9) < 2e-3
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.9))
    assert abs(out.mean().item() - 1.0) < 3e-3  # the expectation is the input's


def test_gradient_is_the_same_scaled_mask_and_eval_passes_through() -> None:
    torch.manual_seed(1)
    drop = AdapterDropout(0.25)
    x = torch.randn(64, 32, requires_grad=True)
    out = drop(x)
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.where(out != 0, 1 / 0.75, 0.0))
    drop.eval()
    assert drop(x) is x
    assert AdapterDropout(0.0).train()(x) is x
    assert torch.equal(AdapterDropout(1.0).train()(x), torch.zeros_like(x))


def test_it_is_nn_dropout_to_the_outside_and_replays_under_checkpointing() -> None:
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.1)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(2)
    direct = layer(x_ref)
    direct.sum().backward()
    torch.manual_seed(2)
    recomputed = checkpoint(layer, x, use_reentrant=False)  # the same mask when forward runs again
    recomputed.sum().backward()
    assert torch.equal(direct, recomputed)
    assert x.grad is not None and torch.equal(x.grad, x_ref.grad)
