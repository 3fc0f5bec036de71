"""Quantize-while-loading and state-dict round trips of quantized models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TinyNet
from torch import nn

from lightning_qlora import load_quantized
from lightning_qlora.quantization import QuantizationConfig, is_quantized, replace_linear_layers

CONFIG = QuantizationConfig(compute_dtype="float32")


def quantized_tiny(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    replace_linear_layers(model, CONFIG, compute_dtype=torch.float32)
    return model.eval()


def test_state_dict_round_trip_through_safetensors(tmp_path: Path) -> None:
    source = quantized_tiny(seed=0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "q.safetensors")
    target = quantized_tiny(seed=1)  # different weights until loaded
    x = torch.randn(5, 32)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(load_file(tmp_path / "q.safetensors"))
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_state_dict_round_trip_through_torch_save(tmp_path: Path) -> None:
    source = quantized_tiny(seed=0)
    torch.save(source.state_dict(), tmp_path / "q.pt")
    target = quantized_tiny(seed=1)
    target.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    x = torch.randn(5, 32)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_full_precision_state_dict_is_quantized_on_load() -> None:
    torch.manual_seed(0)
    reference = TinyNet().eval()
    direct = quantized_tiny(seed=3)
    direct.load_state_dict(TinyNet().state_dict() | reference.state_dict())
    expected = TinyNet().eval()
    expected.load_state_dict(reference.state_dict())
    replace_linear_layers(expected, CONFIG, compute_dtype=torch.float32)
    x = torch.randn(5, 32)
    torch.testing.assert_close(direct(x), expected(x), rtol=0, atol=0)


def test_meta_model_loaded_from_safetensors_matches_load_then_convert(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = TinyNet().eval()
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = TinyNet().eval()
    names = load_quantized(model, tmp_path / "model.safetensors", CONFIG, compute_dtype=torch.float32)
    assert sorted(names) == ["net.0", "net.2"]
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert is_quantized(model.net[0]) and type(model.lm_head) is nn.Linear
    replace_linear_layers(reference, CONFIG, compute_dtype=torch.float32)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_tied_weights_stay_tied_after_loading() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    torch.manual_seed(0)
    source = Tied()
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = Tied()
    load_quantized(model, state, CONFIG)
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model.embed.weight, source.embed.weight)


def test_loading_errors_name_the_problem(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = TinyNet().state_dict()
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(KeyError, match=r"missing 'lm_head.bias'.*unexpected 'extra.weight'"):
        load_quantized(
            model,
            {**{k: v for k, v in state.items() if k != "lm_head.bias"}, "extra.weight": torch.zeros(1)},
            CONFIG,
        )
    with pytest.raises(FileNotFoundError, match="No such weights file or folder"):
        load_quantized(TinyNet(), tmp_path / "absent.safetensors", CONFIG)
    (tmp_path / "weights.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only safetensors are read"):
        load_quantized(TinyNet(), tmp_path / "weights.bin", CONFIG)
    with torch.device("meta"):
        meta_model = TinyNet()
    with pytest.raises(TypeError, match=r"shard= takes a torch DeviceMesh .*self.device_mesh.*got int"):
        load_quantized(meta_model, state, CONFIG, shard=2)  # type: ignore[arg-type]
    assert type(meta_model.lm_head) is nn.Linear and meta_model.lm_head.weight.is_meta  # untouched
    with pytest.raises(ValueError, match="meta device"):
        replace_linear_layers(meta_model, CONFIG)


PEAK_SCRIPT = """
import json, sys, torch
from torch import nn
from lightning_qlora import load_quantized
from lightning_qlora.quantization import QuantizationConfig, replace_linear_layers

def build():
    return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(LAYERS)])

path, mode, LAYERS = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = QuantizationConfig(compute_dtype="float32")
replace_linear_layers(nn.Sequential(nn.Linear(256, 256)), config)  # one-time library set-up, not load cost


def status_kib(field):
    # VmHWM is this process's own peak (ru_maxrss would carry the forking parent's RSS over exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
base = status_kib("VmRSS")
if mode == "meta":
    with torch.device("meta"):
        model = build()
    load_quantized(model, path, config)
else:
    from safetensors.torch import load_file
    model = build()
    model.load_state_dict(load_file(path))
    replace_linear_layers(model, config)
peak = status_kib("VmHWM")
print(json.dumps({"peak_growth_kib": peak - base}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's per-process peak RSS")
def test_meta_load_keeps_peak_memory_near_the_quantized_size(tmp_path: Path) -> None:
    """24 layers of 2048x2048 fp32 (384 MiB): loading then converting holds the full model (twice, with the
    loaded state dict); `load_quantized` holds the 4-bit model (50 MiB) plus one layer in flight: its 16 MiB
    and bitsandbytes' CPU quantization temporaries (about 60 MiB for a 4M-weight layer)."""
    layers = 24
    weights = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_file({f"{i}.weight": torch.randn(2048, 2048) for i in range(layers)}, weights)
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    growth = {}
    for mode in ("meta", "full"):
        out = subprocess.run(
            [sys.executable, str(script), str(weights), mode, str(layers)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        growth[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_kib"] / 1024
    full_size_mib = layers * 2048 * 2048 * 4 / 2**20
    assert growth["full"] > 0.9 * full_size_mib
    assert growth["meta"] < 0.5 * full_size_mib, growth  # measured: 136 MiB against 769 MiB
    assert growth["meta"] < 0.25 * growth["full"], growth
