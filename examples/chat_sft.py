"""Chat fine-tuning (SFT) of SmolLM2-135M-Instruct on a conversational JSONL, with packed rows.

The data are `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}` records
(examples/data/chat: multi-turn conversations about small computed questions). What a user switching from
TRL's SFTTrainer expects, in Lightning:

- the loss is on the assistant turns only, located through the tokenizer's chat template;
- `packing=True` puts the examples of a batch into shared rows (own position ids, no attention across
  examples);
- the loss of a step is the mean over all its answer tokens, across `accumulate_grad_batches`;
- the LM head and cross-entropy run over chunks of tokens (never the full fp32 logits);
- QLoRA: the base in NF4 + double quantization, LoRA adapters, paged AdamW.

Any local transformers causal-LM folder works in place of SmolLM2 (`--model /path/to/model`), and any
folder of JSON Lines / Parquet / Arrow records or `save_to_disk` output in place of the data (`--data`).

Run: python examples/chat_sft.py [--steps 60] [--model smollm2-135m-instruct] [--data FOLDER]   (--smoke)
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "chat"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, read before torch and transformers are imported (so --help answers at once)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model folder or packaged name")
    parser.add_argument("--data", default=str(DATA), help="data folder (train + validation records)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--export-dir", default=None, help="write the adapters here (PEFT format)")
    parser.add_argument("--smoke", action="store_true", help="3 steps of 4 examples: check that it runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lightning.pytorch as pl

    from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy
    from lightning_qlora.tasks import CausalLMInstructionModule, InstructionDataModule
    from lightning_qlora.tasks.instruction import format_data_report

    pl.seed_everything(0)
    data = InstructionDataModule(
        data_dir=args.data,
        tokenizer_path=args.model,
        batch_size=4 if args.smoke else args.batch_size,
        max_length=256 if args.smoke else args.max_length,
        packing=True,
    )
    model = CausalLMInstructionModule(
        pretrained_path=args.model, num_samples_to_generate=2, max_new_tokens=12
    )
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        plugins=[QLoRAPrecision()],  # NF4 + double quantization of every linear layer but the head
        callbacks=[LoRA(r=8, alpha=16, dropout=0.05, export_dir=args.export_dir)],
        strategy=QLoRAStrategy(optimizer={"lr": args.lr, "scheduler": "cosine", "warmup_ratio": 0.1}),
        max_steps=3 if args.smoke else args.steps,
        accumulate_grad_batches=args.accumulate,
        limit_val_batches=1 if args.smoke else None,
        val_check_interval=None,
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,  # metric states made by validate() must stay updatable by fit's validation
    )
    print(format_data_report(data.data_report()))  # every bad record is reported here, before training
    trainer.validate(model, datamodule=data, verbose=False)
    before = float(trainer.callback_metrics["val/loss"])
    trainer.fit(model, datamodule=data)
    trainer.validate(model, datamodule=data, verbose=False)
    after = float(trainer.callback_metrics["val/loss"])
    print(f"{trainer.global_step} steps: validation loss on the answers {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
