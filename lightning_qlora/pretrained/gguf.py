"""Convert a GGUF checkpoint (llama.cpp's format) into a plain Hugging Face folder, once.

transformers reads a GGUF directly (``from_pretrained(folder, gguf_file=...)``) but dequantizes every
tensor with numpy on each load, which takes tens of seconds, and the model it returns refuses
``save_pretrained`` ("quantized with gguf"). Here the loaded weights are moved into a fresh model of the
same config without the ``quantization_config``, which saves normally: config, tokenizer and safetensors
that then load in about a second. The weights are whatever the GGUF stored, dequantized to float32 (for a
Q4_1 file: 4-bit values, not the original bf16 ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CONVERSION_INFO = "gguf_conversion.json"
"""Written last into a converted folder: where the weights came from (and proof the folder is complete)."""


def _gguf_file_type(path: Path) -> str | None:
    """The GGUF's ``general.file_type`` as llama.cpp names it (e.g. ``MOSTLY_Q4_1``), if recorded."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).get_field("general.file_type")
    if field is None:
        return None
    value = int(field.contents())
    try:
        return LlamaFileType(value).name
    except ValueError:
        return str(value)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir`` (which must not exist or be empty) as a float32 transformers folder.

    ``info`` is merged into ``gguf_conversion.json``, which is written last. Needs the ``gguf`` package.
    """
    source = Path(gguf_file)
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {str(source)!r} does not exist.")
    try:
        import gguf  # noqa: F401  (transformers needs it; fail here with the fix)
    except ImportError as err:
        raise ImportError(
            "Converting a GGUF checkpoint needs the `gguf` package: pip install gguf "
            "(or pip install 'lightning-qlora[hf]')."
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(out_dir)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{str(target)!r} is not empty; convert into a new folder.")
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse
    config.name_or_path = source.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    record = {
        "source": source.name,
        "source_bytes": source.stat().st_size,
        "file_type": _gguf_file_type(source),
        "dtype": "float32",
        "note": "weights dequantized from the GGUF's quantized tensors",
        **(info or {}),
    }
    (target / CONVERSION_INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return target
