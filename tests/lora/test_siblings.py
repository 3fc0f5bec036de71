"""`share_sibling_input`: q/k/v (and gate/up) adapters share one dropout mask and one stacked A matmul."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_qlora.lora.config import LoRAConfig
from lightning_qlora.lora.inject import inject_adapters
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.lora.siblings import group_siblings
from tests.tiny_models import tiny_llama


def adapted(model: nn.Module, share: bool, dropout: float) -> nn.Module:
    inject_adapters(model, LoRAConfig(r=4, alpha=8.0, dropout=dropout, share_sibling_input=share))
    torch.manual_seed(1)
    for module in model.modules():  # B = 0 would hide any difference in the update
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B, std=0.1)
    return model


def pair(dropout: float) -> tuple[nn.Module, nn.Module]:
    """The same model and adapter values, default and shared."""
    plain = adapted(tiny_llama(), share=False, dropout=dropout)
    shared = copy.deepcopy(plain)
    group_siblings({n: m for n, m in shared.named_modules() if isinstance(m, LoRALinear)})
    return plain, shared


def test_siblings_are_grouped_by_parent_and_name() -> None:
    model = adapted(tiny_llama(), share=True, dropout=0.1)
    layer = model.model.layers[0]
    q, k, v = layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
    assert q.siblings is not None and q.siblings is k.siblings is v.siblings
    assert q.siblings.members == [q, k, v]
    gate, up = layer.mlp.gate_proj, layer.mlp.up_proj
    assert gate.siblings is not None and gate.siblings is up.siblings and gate.siblings is not q.siblings
    assert layer.self_attn.o_proj.siblings is None and layer.mlp.down_proj.siblings is None
    assert model.model.layers[1].self_attn.q_proj.siblings is not q.siblings  # one group per parent
    assert adapted(tiny_llama(), share=False, dropout=0.1).model.layers[0].self_attn.q_proj.siblings is None


def test_without_a_mask_outputs_and_gradients_equal_the_default() -> None:
    plain, shared = pair(dropout=0.0)
    ids = torch.randint(1, 128, (2, 9))
    outs = []
    for model in (plain, shared):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outs.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = outs
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_siblings_see_one_mask_where_the_default_draws_one_each() -> None:
    def q_and_k_outputs(share: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = adapted(tiny_llama(), share=share, dropout=0.5).train()
        attn = model.model.layers[0].self_attn
        with torch.no_grad():  # k's adapter made a copy of q's, on a copy of q's base
            attn.k_proj = copy.deepcopy(attn.q_proj)
        if share:
            group_siblings({"a.q_proj": attn.q_proj, "a.k_proj": attn.k_proj})
        x = torch.randn(2, 5, 64)
        return attn.q_proj(x), attn.k_proj(x)

    q, k = q_and_k_outputs(share=True)
    torch.testing.assert_close(q, k, rtol=0, atol=0)
    q, k = q_and_k_outputs(share=False)
    assert not torch.allclose(q, k)


def test_another_input_is_computed_for_itself() -> None:
    plain, shared = pair(dropout=0.0)
    a, b = torch.randn(3, 64), torch.randn(3, 64)
    plain_attn, shared_attn = plain.model.layers[0].self_attn, shared.model.layers[0].self_attn
    with torch.no_grad():
        for name, x in (("q_proj", a), ("k_proj", b), ("v_proj", a), ("q_proj", a), ("k_proj", a)):
            expected = getattr(plain_attn, name)(x)
            torch.testing.assert_close(getattr(shared_attn, name)(x), expected, rtol=1e-6, atol=1e-6)


def test_it_replays_under_activation_checkpointing() -> None:
    ids = torch.randint(1, 128, (2, 9))
    grads = []
    for checkpointing in (False, True):
        model = adapted(tiny_llama(), share=True, dropout=0.3).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"share_sibling_input": "yes"}, TypeError, "LoRA share_sibling_input must be True or False"),
        ({"share_sibling_input": True, "use_dora": True}, ValueError, "applies to plain LoRA only"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LoRAConfig(**kwargs)  # type: ignore[arg-type]
