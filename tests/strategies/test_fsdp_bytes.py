"""qlora_fsdp shards packed 4-bit weights byte-exact: FSDP2 over gloo, 2 processes (fsdp_bytes_script.py)."""

from __future__ import annotations

import json
from pathlib import Path

from strategies.fsdp_launch import failure, start_ranks


def test_every_byte_value_in_every_position_survives_a_gather(tmp_path: Path) -> None:
    results = start_ranks("fsdp_bytes_script.py", str(tmp_path), world=2)
    for result in results:
        assert result.returncode == 0, failure(result)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # 256 shifted patterns and all 65536 16-bit patterns (bf16 NaNs included), at even and odd offsets,
        # through a mixed-dtype unit (uint8 weight + fp32 bias: gathered as raw bytes) and a uint8-only one;
        # plus a forward of each gathered layer against the layer before sharding
        assert seen["mismatches"] == []
        assert seen["dtype"] == ["torch.uint8"]  # gathered as stored, never cast
        # each rank keeps half of each 131072-byte weight
        assert seen["local_bytes"] == [65536, 65536]
        # bitsandbytes re-wraps the gathered plain tensor from the module's quant state, without a copy
        # (fix_4bit_weight_quant_state_from_module, which asserts a (n, 1) shape): the internal the
        # backend relies on
        assert seen["rewrapped"] == {
            "class": "Params4bit",
            "same_quant_state": True,
            "shape": [131072, 1],
            "shares_storage": True,
        }
