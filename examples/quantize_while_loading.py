"""Quantize while loading: a checkpoint goes into 4 bits one tensor at a time, never in full precision.

`load_quantized` fills a model built without memory (under `torch.device("meta")`) from safetensors files,
quantizing each linear weight to NF4 + double quantization as it is read: the peak is the 4-bit model plus
one layer. Buffers that no checkpoint holds (a Llama's rotary `inv_freq`, computed at construction) are
recomputed from the model's config, so the loaded model gives the same logits as one built for real.

This script writes a small random Llama checkpoint first (stand-in for one you downloaded), then loads it.

Run: python examples/quantize_while_loading.py [--layers 4] [--checkpoint FOLDER]   (--smoke: 2 layers)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a Llama folder (default: write one)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model: check that it runs")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the imports below: --help answers without loading torch (seconds)

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_qlora import QuantizationConfig, load_quantized, quantization_report


def write_random_checkpoint(folder: Path, layers: int) -> None:
    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint
        if folder is None:
            folder = Path(tmp) / "checkpoint"
            write_random_checkpoint(folder, 2 if args.smoke else args.layers)
        config = LlamaConfig.from_pretrained(folder)
        with torch.device("meta"):  # no memory for the weights: load_quantized fills them
            model = AutoModelForCausalLM.from_config(config)
        layers = load_quantized(model, folder, QuantizationConfig(), device="cpu", dtype=torch.float32)
        model.tie_weights()

        report = quantization_report(model)
        print(f"quantized {len(layers)} linear layers: {report.bits_per_quantized_param:.3f} bits/param")
        print(f"model now {report.total_bytes / 2**20:.1f} MiB (was {report.total_bytes_before / 2**20:.1f})")

        reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokens = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours, theirs = model.eval()(tokens).logits, reference(tokens).logits
        error = float((ours - theirs).norm() / theirs.norm())
        print(f"logits vs the full-precision model: relative error {error:.3f} (4-bit weights)")
        assert error < 0.5, "the 4-bit model should be close to the full-precision one"


if __name__ == "__main__":
    main(ARGS)
