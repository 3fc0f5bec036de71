"""Export, PEFT load and merge: what happens to the adapters after a QLoRA run.

A small Llama (random weights, written as a checkpoint first: the stand-in for one you downloaded) is
QLoRA-trained for a few steps on a repeating token pattern. Then:

1. `LoRA(export_dir=...)` writes the adapters in PEFT's format (`adapter_config.json` +
   `adapter_model.safetensors`) when fit ends;
2. `peft.PeftModel.from_pretrained` loads them onto the same base, quantized by transformers +
   bitsandbytes to the same NF4 weights, and gives the same logits as the trained model;
3. `save_merged` writes a plain model with `B @ A * scale` folded into the dequantized weights, which
   `from_pretrained` loads with no adapter code at all; PEFT's `merge_and_unload` does the same on a
   full-precision base.

Run: python examples/export_peft_merge.py [--steps 20] [--out FOLDER]   (--smoke: 3 steps)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="keep the folders here (default: temporary)")
    parser.add_argument("--smoke", action="store_true", help="3 steps: check that it runs")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the imports below: --help answers without loading torch (seconds)

import lightning.pytorch as pl
import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy, save_merged


class CausalLM(pl.LightningModule):
    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss


def write_checkpoint(folder: Path) -> None:
    config = LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # Train mode without gradients: nothing here has dropout, and in eval mode bitsandbytes repacks its
    # CPU 4-bit weights for another (bf16) kernel, which would compare kernels rather than weights.
    with torch.no_grad():
        return model.train()(tokens).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        checkpoint, adapter, merged = out / "base", out / "adapter", out / "merged"
        write_checkpoint(checkpoint)
        pl.seed_everything(0)
        module = CausalLM(checkpoint)
        data = torch.arange(32).repeat(16, 2)  # 16 rows of 0..31, 0..31: a pattern to learn
        trainer = pl.Trainer(
            accelerator="cpu",
            plugins=[QLoRAPrecision(compute_dtype=torch.float32)],
            callbacks=[LoRA(r=8, alpha=16, dropout=0.0, export_dir=adapter)],  # exported when fit ends
            strategy=QLoRAStrategy(optimizer={"lr": 1e-2}),
            max_steps=3 if args.smoke else args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(module, DataLoader(data, batch_size=4))
        print("adapter folder:", sorted(p.name for p in adapter.iterdir()))

        tokens = data[:1]
        trained = logits(module.model, tokens)
        quantized = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        base = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=quantized, device_map="cpu")
        peft_model = PeftModel.from_pretrained(base, adapter)
        error = relative(logits(peft_model, tokens), trained)
        print(f"PEFT on the same 4-bit base vs the trained model: relative difference {error:.1e}")
        assert error < 1e-4, "PEFT should reproduce the trained model"

        save_merged(module.model, merged)
        plain = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32)
        error = relative(logits(plain, tokens), trained)
        print(f"merged model vs the trained model: relative difference {error:.1e}")
        assert error < 1e-4, "the merged model should reproduce the trained model"

        fp_base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        peft_merged = PeftModel.from_pretrained(fp_base, adapter).merge_and_unload()
        error = relative(logits(peft_merged, tokens), trained)
        print(f"PEFT merge on the fp32 base vs the trained model: {error:.1e} (the trained base was 4-bit)")


if __name__ == "__main__":
    main(ARGS)
