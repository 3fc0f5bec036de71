"""Example LightningModules and data for QLoRA fine-tuning, kept in the package so they run offline.

They are plain Lightning code: LoRA, 4-bit quantization and the paged optimizer are added from outside by
the Trainer (callback, precision plugin, strategy), so the same modules also train without them.
"""

from __future__ import annotations

from .classification import DATA_DIR, SentimentDataModule, TextClassifier, default_pretrained_path
from .instruction import (
    PROMPT_TEMPLATE,
    CausalLMInstructionModule,
    InstructionDataModule,
    LengthGroupedBatchSampler,
    encode_instruction,
    format_prompt,
)

__all__ = [
    "DATA_DIR",
    "PROMPT_TEMPLATE",
    "CausalLMInstructionModule",
    "InstructionDataModule",
    "LengthGroupedBatchSampler",
    "SentimentDataModule",
    "TextClassifier",
    "default_pretrained_path",
    "encode_instruction",
    "format_prompt",
]
