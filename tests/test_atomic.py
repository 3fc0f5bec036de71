"""Exported folders: ordinary permissions, written through a symlink, never missing after a kill mid-swap."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import TinyNet

from lightning_qlora import _atomic, load_peft_adapter, save_peft_adapter
from lightning_qlora.lora import EXPORT_MARKER, LoRAConfig, inject_adapters


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def adapted_tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    inject_adapters(model, LoRAConfig(r=4, dropout=0.0))
    return model


@pytest.mark.parametrize(("mask", "folder", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exports_get_ordinary_permissions(
    umask: None, tmp_path: Path, mask: int, folder: int, file: int
) -> None:
    os.umask(mask)
    out = save_peft_adapter(adapted_tiny(), tmp_path / "adapter")
    assert mode(out) == folder
    assert {p.name: mode(p) for p in out.iterdir()} == {
        EXPORT_MARKER: file,
        "adapter_config.json": file,
        "adapter_model.safetensors": file,
    }
    single = _atomic.atomic_write_bytes(tmp_path / "one.bin", b"x")
    assert mode(single) == file
    tensors = _atomic.atomic_save_file({"x": torch.ones(2)}, tmp_path / "t.safetensors")
    assert mode(tensors) == file


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-folder", "dangling"])
def test_a_symlinked_export_dir_is_written_through(tmp_path: Path, dangling: bool) -> None:
    real = tmp_path / "disk" / "adapter"
    real.parent.mkdir()
    link = tmp_path / "adapter"
    link.symlink_to(real, target_is_directory=True)
    if not dangling:
        save_peft_adapter(adapted_tiny(seed=0), link)
    save_peft_adapter(adapted_tiny(seed=1), link)
    assert link.is_symlink() and link.resolve() == real  # the link stays, pointing where it did
    assert real.is_dir() and not real.is_symlink()
    assert sorted(p.name for p in real.iterdir()) == [
        EXPORT_MARKER,
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "disk"]  # no leftover beside the link
    assert sorted(p.name for p in real.parent.iterdir()) == ["adapter"]  # nor beside the folder
    fresh = TinyNet()
    load_peft_adapter(fresh, link)


KILL_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from tiny_models import TinyNet
    from lightning_qlora import _atomic, save_peft_adapter
    from lightning_qlora.lora import EXPORT_MARKER, LoRAConfig, inject_adapters

    torch.manual_seed(1)
    model = TinyNet()
    inject_adapters(model, LoRAConfig(r=4, dropout=0.0))
    target = os.path.realpath(sys.argv[1])
    _atomic._exchange = lambda a, b: False  # as on a kernel or filesystem without RENAME_EXCHANGE
    rename = os.rename

    def rename_then_die(src, dst):
        rename(src, dst)
        if os.fspath(src) == target:  # the old folder is now aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
    save_peft_adapter(model, sys.argv[1])
    """
)


@pytest.mark.slow
def test_a_kill_between_the_two_renames_never_loses_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    save_peft_adapter(adapted_tiny(seed=0), target)
    good = {p.name: p.read_bytes() for p in target.iterdir()}
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, str(target), tests_dir], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not target.exists()  # the window the fallback has: the old copy is aside
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".adapter.old", ".adapter.tmp"]
    load_peft_adapter(TinyNet(), target)  # the next open puts the old copy back first
    assert {p.name: p.read_bytes() for p in target.iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
