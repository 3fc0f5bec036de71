"""DoRA (and QDoRA over a 4-bit base): start, gradients, PEFT round trips, merges, checkpoints and resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyClassifier, toy_loader
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.lora import (
    AdapterMismatchError,
    LoRAConfig,
    adapter_modules,
    inject_adapters,
    load_peft_adapter,
    save_peft_adapter,
    set_trainable_params,
)
from lightning_qlora.lora.dora import MAGNITUDE, DoRALinear
from lightning_qlora.lora.merge import merge_adapters, merge_in_place, unmerge_in_place
from lightning_qlora.lora.peft_checks import InvalidAdapterError
from lightning_qlora.quantization import QuantizationConfig, dequantize_weight, replace_linear_layers

DORA = LoRAConfig(r=4, alpha=8, dropout=0.0, use_dora=True)


def _adapted(base: nn.Module, four_bit: bool, config: LoRAConfig = DORA) -> nn.Module:
    """DoRA injected, then the base quantized (Lightning's order), then A, B and m moved off their start."""
    model = copy.deepcopy(base)
    inject_adapters(model, config)
    set_trainable_params(model)
    if four_bit:
        replace_linear_layers(model, QuantizationConfig(), compute_dtype=torch.float32)
    _perturb(model)
    return model.eval()


def _perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            assert isinstance(layer, DoRALinear)
            layer.materialize()
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
            magnitude = layer.lora_magnitude_vector
            magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=g))


def _dequantized_copy(base: nn.Module, adapted: nn.Module) -> nn.Module:
    """`base` with every weight that is 4-bit in `adapted` replaced by its dequantized values (float32)."""
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in adapter_modules(adapted):
            plain.get_submodule(name).weight.copy_(dequantize_weight(layer.base_layer, torch.float32))
    return plain


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_dora_starts_as_its_base(base: nn.Module, input_ids: torch.Tensor, four_bit: bool) -> None:
    """m starts as the row norms of the weight the layer computes with (the 4-bit one for QDoRA), so the
    scale m / ||W|| is exactly 1 and the first output is the base's, bit for bit."""
    model = copy.deepcopy(base)
    inject_adapters(model, DORA)
    reference = copy.deepcopy(base)
    if four_bit:
        replace_linear_layers(model, QuantizationConfig(), compute_dtype=torch.float32)
        replace_linear_layers(reference, QuantizationConfig(), compute_dtype=torch.float32)
    assert torch.equal(_logits(model.eval(), input_ids), _logits(reference.eval(), input_ids))


def test_magnitude_trains_and_the_norm_is_a_constant(base: nn.Module, input_ids: torch.Tensor) -> None:
    model = _adapted(base, four_bit=True).train()
    names = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", MAGNITUDE}
    model(input_ids).logits.square().mean().backward()
    layer = next(layer for _, layer in adapter_modules(model))
    assert isinstance(layer, DoRALinear)
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_magnitude_vector.grad.abs().sum() > 0
    # With the norm detached, d out / d m = W' x / n: the magnitude's gradient is that of a plain
    # per-row scale. Check it against autograd through an explicit formula with a detached norm.
    x = torch.randn(3, layer.in_features)
    layer.zero_grad()
    layer(x).sum().backward()
    weight = dequantize_weight(layer.base_layer, torch.float32) + layer.lora_delta()
    norm = torch.linalg.vector_norm(weight, dim=1)
    expected = (x @ weight.T / norm).sum(0)
    assert torch.allclose(layer.lora_magnitude_vector.grad, expected, atol=1e-5)


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_export_loads_in_peft_with_use_dora_and_gives_the_same_outputs(
    tmp_path: Path, base: nn.Module, input_ids: torch.Tensor, four_bit: bool
) -> None:
    """Our export -> `PeftModel.from_pretrained`. For the 4-bit base PEFT wraps a float32 model holding
    the dequantized weights: the weights our 4-bit layers compute with in float32, so PEFT computes the
    same function. Measured max abs difference of the logits: 0.0 for both (the bound leaves room for
    another BLAS)."""
    from peft import PeftModel

    model = _adapted(base, four_bit)
    expected = _logits(model, input_ids)
    save_peft_adapter(model, tmp_path / "adapter", DORA)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(key.endswith(f".{MAGNITUDE}") for key in keys) == len(list(adapter_modules(model))) == 14

    plain = _dequantized_copy(base, model) if four_bit else copy.deepcopy(base)
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    got = _logits(peft_model, input_ids)
    assert (got - expected).abs().max().item() <= 1e-5
    changed = (expected - _logits(base.eval(), input_ids)).abs().max()
    assert changed > 0.05  # the adapters do change the output


def _peft_dora_folder(base: nn.Module, folder: Path) -> nn.Module:
    """A DoRA adapter trained (here: perturbed) in PEFT and saved with its own `save_pretrained`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_peft_dora_folder_loads_here_and_gives_the_same_outputs(
    tmp_path: Path, base: nn.Module, input_ids: torch.Tensor, four_bit: bool
) -> None:
    """PEFT's `save_pretrained` with use_dora -> `load_peft_adapter`: DoRA layers are injected, and the
    file's magnitudes are kept (not recomputed from the base). Measured max abs difference: 0.0."""
    peft_model = _peft_dora_folder(base, tmp_path / "peft")
    model = copy.deepcopy(base)
    if four_bit:
        replace_linear_layers(model, QuantizationConfig(), compute_dtype=torch.float32)
    loaded = load_peft_adapter(model, tmp_path / "peft")
    assert len(loaded) == 14 and all(isinstance(layer, DoRALinear) for _, layer in adapter_modules(model))
    got = _logits(model.eval(), input_ids)
    if four_bit:  # PEFT over the weights our 4-bit layers compute with
        from peft import PeftModel

        reference = PeftModel.from_pretrained(_dequantized_copy(base, model), str(tmp_path / "peft"))
        expected = _logits(reference.eval(), input_ids)
    else:
        expected = _logits(peft_model, input_ids)
    assert (got - expected).abs().max().item() <= 1e-5


def test_dora_files_that_do_not_fit_are_refused(tmp_path: Path, base: nn.Module) -> None:
    from safetensors.torch import load_file, save_file

    _peft_dora_folder(base, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(InvalidAdapterError, match=r"DoRA magnitude tensors .* does not set use_dora"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")

    config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    weights_path = tmp_path / "peft" / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    dropped = next(k for k in weights if k.endswith(MAGNITUDE))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(weights_path))
    model = copy.deepcopy(base)
    with pytest.raises(InvalidAdapterError, match="sets use_dora, but without a magnitude"):
        load_peft_adapter(model, tmp_path / "peft")
    assert not list(adapter_modules(model))  # refused before anything changed

    save_file(weights, str(weights_path))
    plain = copy.deepcopy(base)
    inject_adapters(plain, LoRAConfig(r=4, alpha=8))
    with pytest.raises(AdapterMismatchError, match="holds DoRA adapters, but the model's adapters"):
        load_peft_adapter(plain, tmp_path / "peft")


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_merge_gives_the_adapted_model(base: nn.Module, input_ids: torch.Tensor, four_bit: bool) -> None:
    """A merged plain model computes m (W + s B A) / ||W + s B A|| x: the adapted model's output."""
    model = _adapted(base, four_bit)
    expected = _logits(model, input_ids)
    merged = merge_adapters(copy.deepcopy(model))
    assert not list(adapter_modules(merged))
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    assert (_logits(merged, input_ids) - expected).abs().max().item() < 1e-5


def test_merge_in_place_and_back(base: nn.Module, input_ids: torch.Tensor) -> None:
    model = _adapted(base, four_bit=False)
    expected = _logits(model, input_ids)
    before = {n: p.clone() for n, p in model.named_parameters()}
    merge_in_place(model)
    assert (_logits(model, input_ids) - expected).abs().max().item() < 1e-5
    unmerge_in_place(model)
    assert (_logits(model, input_ids) - expected).abs().max().item() < 1e-5
    for name, param in model.named_parameters():
        assert torch.allclose(param, before[name], atol=1e-6), name


# -------------------------------------------------------------------------- in a Trainer: checkpoints


def _run(
    tmp_path: Path, steps: int, ckpt: Path | None = None, every: int | None = None
) -> tuple[TinyClassifier, pl.Trainer]:
    pl.seed_everything(7, workers=True)
    module = TinyClassifier(lr=2e-2)
    callbacks: list[pl.Callback] = [LoRA(r=4, dropout=0.1, use_dora=True)]
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
    return module, trainer


def test_qdora_checkpoint_holds_the_magnitude_and_resumes_exactly(tmp_path: Path) -> None:
    """Dropout on, batches shuffled, 4-bit base: the magnitude is in the adapter-only checkpoint and is
    not recomputed from the base on resume (it would silently undo its training)."""
    uninterrupted, _ = _run(tmp_path / "a", 12)
    _run(tmp_path / "b", 8, every=4)
    checkpoint = next((tmp_path / "b").glob("epoch=0-step=4.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert set(state) == {f"model.net.{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B", MAGNITUDE)}
    resumed, _ = _run(tmp_path / "c", 12, ckpt=checkpoint)
    assert len(resumed.losses) == 8
    assert resumed.losses == pytest.approx(uninterrupted.losses[4:], rel=0, abs=1e-6)
    layer = resumed.model.net[0]
    assert isinstance(layer, DoRALinear)
    trained = layer.lora_magnitude_vector.detach()
    assert not torch.allclose(trained, layer.weight_norm(), atol=1e-4)  # m moved away from ||W + s B A||
    assert torch.equal(trained, uninterrupted.model.net[0].lora_magnitude_vector.detach())
