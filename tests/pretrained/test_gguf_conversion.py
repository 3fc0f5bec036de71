"""GGUF -> transformers folder, on a tiny Llama GGUF written by the test with the real `gguf` package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import HIDDEN, LAYERS, write_tiny_llama_gguf

from lightning_qlora.pretrained import convert_gguf
from lightning_qlora.pretrained.gguf import CONVERSION_INFO

pytest.importorskip("gguf", reason="the `hf` extra installs gguf")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture(scope="module")
def converted(
    gguf_file: tuple[Path, dict[str, np.ndarray]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return convert_gguf(gguf_file[0], tmp_path_factory.mktemp("out") / "model", info={"extra": "kept"})


def test_folder_loads_without_gguf_and_matches_the_direct_gguf_load(
    gguf_file: tuple[Path, dict[str, np.ndarray]], converted: Path
) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path, tensors = gguf_file
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config  # what made save_pretrained refuse
    assert (config["num_hidden_layers"], config["hidden_size"]) == (LAYERS, HIDDEN)
    model = AutoModelForCausalLM.from_pretrained(str(converted), local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # tensors that are stored unpermuted come back exactly
    state = model.state_dict()
    np.testing.assert_array_equal(state["model.embed_tokens.weight"].numpy(), tensors["token_embd.weight"])
    np.testing.assert_array_equal(
        state["model.layers.1.mlp.down_proj.weight"].numpy(), tensors["blk.1.ffn_down.weight"]
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    # and the whole model computes what transformers' own GGUF loader computes
    direct = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    ids = torch.tensor([[3, 70, 71, 72, 100, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_tokenizer_and_chat_template_survive(converted: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens stay whole
    assert tok.decode(ids) == prompt


def test_conversion_record(converted: Path) -> None:
    record = json.loads((converted / CONVERSION_INFO).read_text())
    assert record["source"] == "tiny-llama.F32.gguf"
    assert record["file_type"] == "ALL_F32"
    assert record["extra"] == "kept"


def test_bad_inputs_fail_before_any_work(tmp_path: Path, converted: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf.*does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(Path(__file__), converted)  # an existing file, but the target is taken
