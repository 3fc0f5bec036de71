"""Tiny models shared by the quantization tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn


class TinyNet(nn.Module):
    """Two hidden linear layers and an LM-style head: enough to exercise selection and exclusion."""

    def __init__(self, width: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width)
        )
        self.lm_head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.net(x))


class TinyClassifier(pl.LightningModule):
    """A LightningModule whose base is quantized; it trains the excluded head (and adapters, if any)."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = TinyNet()
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def toy_loader(
    n: int = 64, batch_size: int = 16, seed: int = 0, shuffle: bool = False
) -> torch.utils.data.DataLoader:
    """A learnable task: the class is the argmax of four fixed projections of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(dim=1)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle
    )


def tiny_llama(cls: type | None = None, seed: int = 0, **overrides: int) -> nn.Module:
    """A two-layer Llama from a config (random, seeded weights): the stand-in for a transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, **overrides}
    config = LlamaConfig(
        vocab_size=128, num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0, **sizes
    )
    return (cls or LlamaForCausalLM)(config).eval()


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


TINY_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
CAUSAL_LM_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "smollm3")
ARCHITECTURE_OVERRIDES: dict[str, dict[str, object]] = {
    "smollm3": {"no_rope_layers": [1, 0]},  # its shape: some layers without rotary positions (NoPE)
}


def save_tiny_causal_lm(architecture: str, folder: str, tokenizer: object, seed: int = 0) -> str:
    """A random two-layer causal LM of one architecture written with `save_pretrained`, with `tokenizer`
    beside it: a stand-in for a user's model folder (each family's own config and modelling code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    ids = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
        "bos_token_id": tokenizer.bos_token_id,  # type: ignore[attr-defined]
        "eos_token_id": tokenizer.eos_token_id,  # type: ignore[attr-defined]
    }
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    extra = ARCHITECTURE_OVERRIDES.get(architecture, {})
    config = AutoConfig.for_model(
        architecture, **TINY_SIZES, **heads, **ids, **extra, tie_word_embeddings=False
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder
