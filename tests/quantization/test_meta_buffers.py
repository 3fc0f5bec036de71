"""Quantize-while-loading into a model built under torch.device("meta"): the README's recipe.

A Llama's rotary `inv_freq` and a BERT's `position_ids` / `token_type_ids` are non-persistent buffers:
`save_pretrained` does not write them, so loading alone can never fill them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, LlamaConfig

from lightning_qlora import QuantizationConfig, load_quantized
from lightning_qlora.quantization import replace_linear_layers
from lightning_qlora.quantization.meta_buffers import MetaBufferError, parameters_on_meta


def load_as_the_readme_does(checkpoint: str, config: object) -> nn.Module:
    """The README's recipe (its block runs as pasted in test_readme.py): build on meta, fill in 4 bits."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    load_quantized(model, checkpoint, QuantizationConfig(), device="cpu")
    model.tie_weights()
    return model


CONFIGS = {
    "llama": LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "bert": BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        is_decoder=True,  # AutoModelForCausalLM builds a BertLMHeadModel, its decoder tied to the embedding
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_readme_recipe_fills_every_buffer_and_equals_load_then_convert(tmp_path: Path, arch: str) -> None:
    config = CONFIGS[arch]
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(tmp_path / "checkpoint_folder")
    model = load_as_the_readme_does(str(tmp_path / "checkpoint_folder"), config)

    expected = dict(reference.named_buffers())
    assert expected, "the architecture has non-persistent buffers"
    for name, buffer in model.named_buffers():
        assert buffer.device.type == "cpu", name
        torch.testing.assert_close(buffer, expected[name], rtol=0, atol=0)
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]

    tied_head = ("cls.predictions.decoder",) if arch == "bert" else ()
    if tied_head:  # shares the word embedding: kept in full precision and tied, so tie_weights() is safe
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # load-then-convert gives the same model
    replace_linear_layers(reference, QuantizationConfig(exclude=("lm_head", *tied_head)))
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model.eval()(input_ids=input_ids).logits, reference(input_ids=input_ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class Rotary(nn.Module):
    """A plain module with a non-persistent buffer and no `config` to rebuild it from."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)


def test_a_meta_buffer_that_cannot_be_recomputed_is_one_clear_error(tmp_path: Path) -> None:
    state = {k: v for k, v in Rotary().state_dict().items()}
    with torch.device("meta"):
        model = Rotary()
    with pytest.raises(MetaBufferError, match=r"'inv_freq'.*parameters_on_meta"):
        load_quantized(model, state, QuantizationConfig(exclude=()))
    with parameters_on_meta():  # the fix the message names
        model = Rotary()
    assert model.proj.weight.device.type == "meta" and model.inv_freq.device.type == "cpu"
    load_quantized(model, state, QuantizationConfig(exclude=()))
    torch.testing.assert_close(model.inv_freq, torch.arange(4.0))
