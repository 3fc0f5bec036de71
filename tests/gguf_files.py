"""A tiny Llama written as a real GGUF file with the `gguf` package: the converter's test input."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 4, 2, 32
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def byte_vocabulary() -> list[str]:
    """GPT-2's byte alphabet (one printable character per byte), then a few merges' results."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [*SPECIAL, *bytes_to_unicode().values(), "th", "the", "Ġt", "Ġth", "Ġthe"]


MERGES = ("t h", "th e", "Ġ t", "Ġt h", "Ġth e")


def llama_tensors(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under llama.cpp's tensor names, in (out, in) order as numpy arrays."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = HIDDEN // HEADS
    tensors = {"token_embd.weight": w(vocab, HIDDEN), "output_norm.weight": 1 + w(HIDDEN)}
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + w(HIDDEN),
            f"blk.{i}.attn_q.weight": w(HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": w(KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": w(KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": w(HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": 1 + w(HIDDEN),
            f"blk.{i}.ffn_gate.weight": w(FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": w(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": w(HIDDEN, FFN),
        }
    return tensors


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama (tied embeddings, byte-level BPE, chat template); returns its tensors."""
    import gguf

    tokens = byte_vocabulary()
    tensors = llama_tensors(len(tokens), seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(SPECIAL.index("<|im_start|>"))
    writer.add_eos_token_id(SPECIAL.index("<|im_end|>"))
    writer.add_pad_token_id(SPECIAL.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
