"""One rank of the byte-exactness check of test_fsdp_bytes.py: FSDP2 gathers packed 4-bit weights unchanged.

Started twice by the test (RANK 0 and 1, gloo). Two 4-bit layers of 131072 packed bytes each are sharded
with `fully_shard`: one with an fp32 bias (a unit of mixed dtypes, which FSDP2 gathers as raw bytes) and one
without (a uint8-only unit). Each rank writes its rows of a known byte pattern into its shard, the unit is
gathered, and the whole weight is compared with the pattern:
- 256 patterns `(i + k) % 256`: every byte value in every position;
- all 65536 16-bit patterns at even and at odd byte offsets, the bf16 NaN patterns among them.
Then the re-wrap that bitsandbytes does from the module's quant state is checked (an internal the backend
relies on), and a forward of the gathered layer against the same layer unsharded. Writes OUT/rank<r>.json.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fsdp_bytes_script.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_qlora.quantization.backends.bitsandbytes import _params
from lightning_qlora.quantization.config import QuantizationConfig
from lightning_qlora.quantization.convert import replace_linear_layers
from lightning_qlora.quantization.layers import is_linear4bit, quantize_layer

IN = OUT_FEATURES = 512  # 512 * 512 / 2 = 131072 packed bytes: room for all 65536 uint16 patterns


def patterns(n: int) -> list[tuple[str, torch.Tensor]]:
    """(name, uint8 pattern of n bytes)."""
    index = torch.arange(n, dtype=torch.int64)
    found = [(f"shift{k}", ((index + k) % 256).to(torch.uint8)) for k in range(256)]
    all16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)  # 131072 bytes
    found.append(("uint16_even", all16[:n].clone()))
    found.append(("uint16_odd", torch.cat([torch.tensor([0x5A], dtype=torch.uint8), all16])[:n].clone()))
    return found


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT_FEATURES, bias=True), nn.Linear(IN, OUT_FEATURES, bias=False))
    replace_linear_layers(
        model,
        QuantizationConfig(compute_dtype="float32", exclude=()),
        compute_dtype=torch.float32,
        device=None,
        quantize_now=False,
    )
    layers = [m for m in model if is_linear4bit(m)]
    for layer in layers:
        quantize_layer(layer)
    x = torch.randn(3, IN)
    with torch.no_grad():
        expected_out = [layer(x) for layer in layers]  # before sharding
    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    result: dict[str, object] = {"rank": rank, "mismatches": [], "local_bytes": [], "dtype": []}
    mismatches: list[str] = result["mismatches"]  # type: ignore[assignment]
    for number, layer in enumerate(layers):
        sharded = layer.weight
        local = sharded.to_local()
        result["local_bytes"].append(local.numel() * local.element_size())  # type: ignore[union-attr]
        whole = sharded.shape[0]
        rows = -(-whole // world)
        first, last = min(rank * rows, whole), min((rank + 1) * rows, whole)
        # forward of the gathered layer equals the unsharded one
        with torch.no_grad():
            got = layer(x)
        if not torch.equal(got, expected_out[number]):
            mismatches.append(f"layer{number}: forward differs by {(got - expected_out[number]).abs().max()}")
        layer.reshard()  # FSDP2 keeps a root unit gathered after its forward
        for name, pattern in patterns(whole):
            with torch.no_grad():
                local.view(-1).copy_(pattern[first:last])
            layer.unshard()
            gathered = layer.weight
            if number == 0 and name == "shift0":
                result["dtype"].append(str(gathered.dtype))  # type: ignore[union-attr]
                params = _params(layer)  # bitsandbytes re-wraps the gathered bytes around the module's state
                result["rewrapped"] = {
                    "class": type(params).__name__,
                    "same_quant_state": params.quant_state is layer.quant_state,
                    "shape": list(params.shape),
                    "shares_storage": params.data_ptr() == gathered.data_ptr(),
                }
            flat = layer.weight.detach().reshape(-1).view(torch.uint8)
            if not torch.equal(flat, pattern):
                wrong = (flat != pattern).nonzero().flatten()
                mismatches.append(f"layer{number} {name}: {wrong.numel()} bytes differ, first at {wrong[:4]}")
            layer.reshard()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
