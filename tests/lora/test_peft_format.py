"""PEFT-format adapters: ours load in PEFT with the same outputs, and PEFT's load here."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from reference_dequant import reference_weight
from safetensors.torch import load_file, save_file
from tiny_models import logits, tiny_llama
from torch import nn
from transformers import LlamaForSequenceClassification

from lightning_qlora import _atomic, load_peft_adapter, save_peft_adapter
from lightning_qlora.lora import (
    EXPORT_MARKER,
    AdapterMismatchError,
    ExportDirError,
    LoRAConfig,
    adapter_modules,
    inject_adapters,
    peft_format,
    set_trainable_params,
)
from lightning_qlora.quantization import (
    QuantizationConfig,
    is_linear4bit,
    replace_linear_layers,
)
from lightning_qlora.quantization.layers import quantized_weight_state

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_b(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """B starts at zero (the adapter is a no-op); give it values so the adapted outputs differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def adapted(base: nn.Module, config: LoRAConfig, quantize: bool = False) -> nn.Module:
    model = copy.deepcopy(base)
    if quantize:
        replace_linear_layers(model, QuantizationConfig(compute_dtype=torch.float32), torch.float32)
    inject_adapters(model, config)
    randomize_b(model)
    return model.eval()  # injected layers start in training mode; eval turns adapter dropout off


def peft_load(base: nn.Module, folder: Path) -> nn.Module:
    """PeftModel.from_pretrained, failing on PEFT's missing-keys warning, and checking keys both ways."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    written = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(written)  # PEFT has exactly our tensors: nothing missing, nothing unexpected
    for key, value in written.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    result = model.load_adapter(str(folder), adapter_name="again")
    assert not result.missing_keys
    assert not result.unexpected_keys
    return model


CASES = {
    "plain": LoRAConfig(r=4, alpha=8.0, dropout=0.1),
    "rank_pattern": LoRAConfig(
        r=4,
        alpha=8.0,
        rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32.0},
    ),
    "rslora": LoRAConfig(r=8, alpha=4.0, use_rslora=True, rank_pattern={"o_proj": 2}),
    "subset": LoRAConfig(r=4, alpha=8.0, target_modules=("model.layers.0.*",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_peft_with_the_same_logits(
    case: str, base: nn.Module, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    config = CASES[case]
    ours = adapted(base, config)
    expected = logits(ours, input_ids)
    assert not torch.allclose(expected, logits(base, input_ids), atol=1e-3)  # the adapters do something

    folder = save_peft_adapter(ours, tmp_path / "adapter", config)
    theirs = peft_load(base, folder)
    torch.testing.assert_close(logits(theirs, input_ids), expected, rtol=1e-5, atol=1e-5)

    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    assert written["use_rslora"] is config.use_rslora
    if case == "rank_pattern":
        # Full paths, so PEFT's regex suffix match hits exactly these layers and nothing else.
        assert written["rank_pattern"] == {
            "model.layers.0.self_attn.q_proj": 8,
            "model.layers.1.self_attn.q_proj": 8,
            "model.layers.1.mlp.down_proj": 2,
        }
        assert set(written["alpha_pattern"]) == {f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)}
        assert theirs.base_model.model.model.layers[1].mlp.down_proj.r["default"] == 2
    if case == "subset":
        # Layer 1 has namesakes of the adapted layers: PEFT is told to leave them alone.
        assert written["target_modules"] == sorted(LAYERS)
        assert written["exclude_modules"] == sorted(f"model.layers.1.{p}.{n}" for p, n in _layer_paths())
    else:
        assert written["target_modules"] == sorted(LAYERS)
        assert written["exclude_modules"] is None


def _layer_paths() -> list[tuple[str, str]]:
    return [("self_attn", n) for n in LAYERS[:4]] + [("mlp", n) for n in LAYERS[4:]]


def test_modules_to_save_head_is_exported_whole(input_ids: torch.Tensor, tmp_path: Path) -> None:
    classifier = tiny_llama(LlamaForSequenceClassification)
    config = LoRAConfig(r=4, alpha=8.0, modules_to_save=("score",))
    ours = adapted(classifier, config)
    set_trainable_params(ours)
    assert ours.score.weight.requires_grad
    with torch.no_grad():  # what training the head would do
        ours.score.weight.add_(torch.randn_like(ours.score.weight) * 0.5)
    expected = logits(ours, input_ids)

    folder = save_peft_adapter(ours, tmp_path / "adapter", config)
    written = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in written  # as PEFT's get_peft_model_state_dict writes it
    assert not any("score.lora_" in key for key in written)
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["score"]

    theirs = peft_load(classifier, folder)
    torch.testing.assert_close(logits(theirs, input_ids), expected, rtol=1e-5, atol=1e-5)

    # And back: a fresh classifier gets the head and the adapters.
    fresh = copy.deepcopy(classifier)
    loaded = load_peft_adapter(fresh, folder)
    assert "score" in loaded
    torch.testing.assert_close(logits(fresh, input_ids), expected, rtol=1e-5, atol=1e-5)


# Rows that start blocks of 64, and rows that end inside one (80 and 688 inputs: what bitsandbytes' AVX-512
# CPU decode gets wrong, docs/interop.md).
SIZES = {"aligned": {}, "rows-inside-blocks": {"hidden_size": 80, "intermediate_size": 688}}


@pytest.mark.parametrize("sizes", list(SIZES))
def test_qlora_export_loads_on_the_full_precision_base(
    sizes: str, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    base = tiny_llama(**SIZES[sizes])
    config = LoRAConfig(r=4, alpha=8.0)
    ours = adapted(base, config, quantize=True)
    assert any(is_linear4bit(layer.base_layer) for _, layer in adapter_modules(ours))
    expected = logits(ours, input_ids)
    folder = save_peft_adapter(ours, tmp_path / "adapter", config)

    # Exact check of the adapters: PEFT on a base holding the NF4 weights as the format defines them
    # (decoded by the test's own reference, not by this package or bitsandbytes) computes what we do.
    dequantized = copy.deepcopy(base)
    for name, layer in adapter_modules(ours):
        weight = reference_weight(quantized_weight_state(layer.base_layer))
        with torch.no_grad():
            dequantized.get_submodule(name).weight.copy_(weight)
    exact = logits(peft_load(dequantized, folder), input_ids)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)

    # On the original full-precision base the only difference left is NF4's rounding of the base weights,
    # so the gap is bounded by (twice) the gap between the 4-bit and full-precision bases without adapters.
    theirs = logits(peft_load(base, folder), input_ids)
    without_adapters = copy.deepcopy(ours)
    for _, layer in adapter_modules(without_adapters):
        layer.lora_B.data.zero_()
    nf4_error = (logits(without_adapters, input_ids) - logits(base, input_ids)).abs().max()
    adapter_effect = (expected - logits(without_adapters, input_ids)).abs().max()
    gap = (theirs - expected).abs().max()
    assert gap <= 2 * nf4_error
    assert gap < adapter_effect / 4  # the adapters were applied: they move logits far more than NF4 does


def peft_adapter(base: nn.Module, folder: Path, **lora_kwargs: object) -> nn.Module:
    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear", **lora_kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"r": 4, "lora_alpha": 8},
        {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "rank_pattern": {"layers.0.self_attn.q_proj": 8, "down_proj": 2},
            "alpha_pattern": {r"layers\.1\..*_proj": 16},
        },
    ],
    ids=["plain", "patterns-rslora"],
)
def test_peft_created_adapter_loads_with_identical_outputs(
    lora_kwargs: dict[str, object], base: nn.Module, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    theirs = peft_adapter(base, tmp_path / "peft", **lora_kwargs)
    ours = copy.deepcopy(base)
    loaded = load_peft_adapter(ours, tmp_path / "peft")
    assert len(loaded) == 2 * len(LAYERS)  # all-linear: every linear layer but the LM head
    assert not isinstance(ours.lm_head, type(ours.model.layers[0].self_attn.q_proj))
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), rtol=1e-5, atol=1e-5)
    if "rank_pattern" in lora_kwargs:
        assert ours.model.layers[0].self_attn.q_proj.r == 8
        assert ours.model.layers[1].self_attn.q_proj.r == 4
        assert ours.model.layers[0].mlp.down_proj.r == 2


def test_our_export_loads_back_fresh_and_into_existing_adapters(
    base: nn.Module, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    config = CASES["rank_pattern"]
    ours = adapted(base, config)
    expected = logits(ours, input_ids)
    folder = save_peft_adapter(ours, tmp_path / "adapter", config)

    fresh = copy.deepcopy(base)
    load_peft_adapter(fresh, folder)
    torch.testing.assert_close(logits(fresh, input_ids), expected, rtol=0, atol=0)

    already_adapted = copy.deepcopy(base)
    inject_adapters(already_adapted, config)
    load_peft_adapter(already_adapted, folder)
    torch.testing.assert_close(logits(already_adapted.eval(), input_ids), expected, rtol=0, atol=0)


def test_qlora_export_loads_back_into_a_4bit_model(
    base: nn.Module, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    config = LoRAConfig(r=4, alpha=8.0)
    ours = adapted(base, config, quantize=True)
    folder = save_peft_adapter(ours, tmp_path / "adapter", config)
    other = copy.deepcopy(base)
    replace_linear_layers(other, QuantizationConfig(compute_dtype=torch.float32), compute_dtype=torch.float32)
    load_peft_adapter(other, folder)
    torch.testing.assert_close(logits(other, input_ids), logits(ours, input_ids), rtol=0, atol=0)


def test_export_without_config_infers_it(base: nn.Module, input_ids: torch.Tensor, tmp_path: Path) -> None:
    ours = adapted(base, CASES["rslora"])
    folder = save_peft_adapter(ours, tmp_path / "adapter")
    written = json.loads((folder / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (8, 4, True)
    assert written["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 2 for i in (0, 1)}
    theirs = peft_load(base, folder)
    torch.testing.assert_close(logits(theirs, input_ids), logits(ours, input_ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def exported(base: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_peft_adapter(adapted(base, LoRAConfig(r=4)), tmp_path_factory.mktemp("exp") / "adapter")


def test_wrong_shapes_name_the_key_and_both_shapes(exported: Path) -> None:
    wider = tiny_llama(intermediate_size=96)
    with pytest.raises(AdapterMismatchError, match="Shape mismatch") as err:
        load_peft_adapter(wider, exported)
    message = str(err.value)
    assert "mlp.down_proj" in message
    assert "(4, 128)" in message  # the file's lora_A
    assert "(4, 96)" in message  # what the layer needs
    assert not list(adapter_modules(wider))  # checked before anything was injected


def test_shape_mismatch_with_existing_adapters(base: nn.Module, exported: Path) -> None:
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=8))
    with pytest.raises(AdapterMismatchError, match=r"lora_A\.weight has shape \(4, 64\).*\(8, 64\)"):
        load_peft_adapter(model, exported)


def test_rank_mismatch_names_config_rank_and_tensor_rank(
    base: nn.Module, exported: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "edited"
    folder.mkdir()
    config = json.loads((exported / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.1.self_attn.k_proj": 16}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((exported / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterMismatchError, match="Rank mismatch") as err:
        load_peft_adapter(copy.deepcopy(base), folder)
    assert "model.layers.1.self_attn.k_proj" in str(err.value)
    assert "config r=16" in str(err.value)
    assert "rank 4" in str(err.value)


def test_keys_for_missing_modules_are_named(base: nn.Module, exported: Path) -> None:
    shallow = tiny_llama(num_hidden_layers=1)
    with pytest.raises(AdapterMismatchError, match="does not have") as err:
        load_peft_adapter(shallow, exported)
    assert "has weights for 7 module(s)" in str(err.value)
    assert "model.layers.1.mlp.down_proj" in str(err.value)
    assert "model.layers.0.self_attn.q_proj" in str(err.value)  # one that does exist is listed

    loaded = load_peft_adapter(tiny_llama(num_hidden_layers=1), exported, strict=False)
    assert len(loaded) == len(LAYERS)
    assert all(name.startswith("model.layers.0.") for name in loaded)


def test_wrapper_module_gets_a_hint(base: nn.Module, exported: Path) -> None:
    wrapper = nn.Module()
    wrapper.llm = copy.deepcopy(base)
    with pytest.raises(AdapterMismatchError, match=r"pass `model\.llm`"):
        load_peft_adapter(wrapper, exported)


def test_pickle_only_folder_is_refused(base: nn.Module, exported: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((exported / "adapter_config.json").read_text())
    (folder / "adapter_model.bin").write_bytes(b"not unpickled, never opened")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin.*pickle"):
        load_peft_adapter(copy.deepcopy(base), folder)


def test_missing_folder_and_files_are_named(base: nn.Module, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_peft_adapter(copy.deepcopy(base), no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((exported / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no_weights/adapter_model\.safetensors"):
        load_peft_adapter(copy.deepcopy(base), no_weights)


def test_missing_adapter_weights_are_reported(base: nn.Module, exported: Path, tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((exported / "adapter_config.json").read_text())
    tensors = load_file(str(exported / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    save_file(kept, str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=4))
    with pytest.raises(AdapterMismatchError, match=r"lacks weights for 7 adapted layer\(s\)"):
        load_peft_adapter(model, folder)
    assert len(load_peft_adapter(model, folder, strict=False)) == len(LAYERS)


# ------------------------------------------------------------------------------------------ atomicity


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_crash_mid_write_keeps_the_good_folder(
    exchange: bool, base: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    config = LoRAConfig(r=4)
    model = adapted(base, config)
    folder = save_peft_adapter(model, tmp_path / "adapter", config)
    good = _snapshot(folder)

    randomize_b(model, seed=5)  # what more training would do

    def crash(path: Path, adapter_config: object) -> None:
        raise RuntimeError("disk full")  # after the weights file is written, before the config

    monkeypatch.setattr(peft_format, "_write_config", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_peft_adapter(model, folder, config)
    assert _snapshot(folder) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)

    (folder / "notes.txt").write_text("the user's own")  # a file no export wrote: never replaced
    with pytest.raises(ExportDirError, match=r"holds files no export of lightning-qlora wrote \(notes.txt\)"):
        save_peft_adapter(model, folder, config)
    assert _snapshot(folder) == {**good, "notes.txt": b"the user's own"}
    (folder / "notes.txt").unlink()
    save_peft_adapter(model, folder, config)  # an earlier export alone: replaced
    assert _snapshot(folder) != good
    assert sorted(_snapshot(folder)) == [EXPORT_MARKER, "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_leftovers_of_a_killed_writer_are_recovered(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "adapter"
    # A writer killed between its two renames: the old copy is aside, its new one half-written.
    old = tmp_path / f".adapter.old-{dead.pid}-abcd1234"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    (tmp_path / f".adapter.tmp-{dead.pid}-half").mkdir()
    with pytest.raises(RuntimeError), _atomic.atomic_directory(target):
        raise RuntimeError("this writer fails too")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (target / "adapter_config.json").read_text() == "{}"
    assert os.getpid() != dead.pid


def test_atomic_file_helpers(tmp_path: Path) -> None:
    path = _atomic.atomic_write_bytes(tmp_path / "a.bin", b"one")
    assert path.read_bytes() == b"one"

    def write_half_then_fail() -> None:
        with _atomic.atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_half_then_fail()
    assert path.read_bytes() == b"one"
    _atomic.atomic_save_file({"x": torch.ones(2)}, tmp_path / "t.safetensors")
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "t.safetensors"]
