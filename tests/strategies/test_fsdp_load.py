"""Rank-aware loading under qlora_fsdp: `load_quantized(shard=self.device_mesh)` in `configure_model`.

One 2-process run (two single-process "nodes", gloo) of fsdp_load_script.py loads a tiny Llama from
safetensors, each rank keeping only its rows, trains 3 steps, writes a full-state checkpoint and a PEFT
export; the single-process reference (the whole model loaded, "qlora", the same global batches) runs in
this process. Every test reads that one run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from strategies.fsdp_launch import failure, start_ranks
from strategies.fsdp_load_script import STEPS
from strategies.fsdp_load_script import main as run_in_process
from tiny_models import tiny_llama

QUANT_STATE_KEYS = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)  # safetensors, fp32
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("single")
    run_in_process([str(out), str(model_dir), "--strategy", "qlora", "--devices", "1", "--num-nodes", "1"])
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    for result in start_ranks("fsdp_load_script.py", str(out), str(model_dir), world=2, nodes=True):
        assert result.returncode == 0, failure(result)
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _four_bit_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.dtype == torch.uint8]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_each_rank_loads_half_the_4bit_bytes_identical_to_the_whole_load(sharded: Path, single: Path) -> None:
    ranks = [_load(sharded / f"rank{r}.pt") for r in (0, 1)]
    whole = _load(single / "rank0.pt")
    packed_keys = _four_bit_keys(whole["state"])
    assert len(packed_keys) == 14  # 7 linear layers in each of 2 decoder layers
    layer_bytes = [whole["state"][k].numel() for k in packed_keys]
    assert whole["load_peak_4bit_bytes"] == sum(layer_bytes)  # the existing path holds the whole 4-bit model
    for rank in ranks:
        assert rank["world_size"] == 2
        assert "the mesh is on 'cpu' but device='meta'" in rank["refusal"]  # before any tensor was read
        # at no tensor the loader read did a rank hold more than its rows (ceil(n/2) of each layer's bytes)
        assert rank["load_peak_4bit_bytes"] <= sum(-(-n // 2) for n in layer_bytes)
        assert rank["load_stats_bytes"] == whole["load_stats_bytes"]  # the statistics are replicated
    # gathered after training: every packed byte and every quant-state tensor of the whole load, unchanged
    state = ranks[0]["state"]
    assert sorted(state) == sorted(whole["state"])
    for key in packed_keys:
        for stat in ("", *(f".{s}" for s in QUANT_STATE_KEYS)):
            assert torch.equal(state[key + stat], whole["state"][key + stat]), key + stat


def test_training_after_a_rank_aware_load_equals_single_process(sharded: Path, single: Path) -> None:
    rank0, rank1 = (_load(sharded / f"rank{r}.pt") for r in (0, 1))
    whole = _load(single / "rank0.pt")
    assert len(whole["losses"]) == STEPS
    # each rank trained on its half of every global batch; the mean of their losses is the whole's
    for step, loss in whole["losses"].items():
        assert (rank0["losses"][step] + rank1["losses"][step]) / 2 == pytest.approx(loss, abs=1e-6)
    assert _max_diff(rank0["adapters"], whole["adapters"]) <= 1e-6
    assert whole["adapters"]["model.model.layers.0.self_attn.q_proj.lora_B"].abs().max() > 0  # it trained


def test_full_state_checkpoint_has_every_quant_state_tensor(sharded: Path, single: Path) -> None:
    """LoRA(adapter_only_checkpoints=False): the sharded run's checkpoint is the single-process one."""
    (mine,) = (sharded / "ckpt").glob(f"*step={STEPS}.ckpt")
    (theirs,) = (single / "ckpt").glob(f"*step={STEPS}.ckpt")
    ours, reference = _load(mine)["state_dict"], _load(theirs)["state_dict"]
    assert sorted(ours) == sorted(reference)
    for key in _four_bit_keys(reference):
        for stat in QUANT_STATE_KEYS:
            assert torch.equal(ours[f"{key}.{stat}"], reference[f"{key}.{stat}"]), f"{key}.{stat}"
        assert torch.equal(ours[key], reference[key]), key
    assert _max_diff(ours, reference) <= 1e-6  # the adapters, the norms and the full-precision head too


def test_peft_export_of_the_sharded_run_loads_in_peft(sharded: Path, single: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    ours = load_file(sharded / "peft" / "adapter_model.safetensors")
    assert _max_diff(ours, load_file(single / "peft" / "adapter_model.safetensors")) <= 1e-6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama(), str(sharded / "peft"))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(ours)  # every tensor we wrote, nothing missing, nothing unexpected
    for key, value in ours.items():
        assert torch.equal(loaded[key], value), key
