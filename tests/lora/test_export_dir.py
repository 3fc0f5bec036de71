"""Exports never delete what they did not write: a folder is replaced only if an earlier export wrote it.

Each refusal is checked on real files: every file that was there before is byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyClassifier, TinyNet, toy_loader

from lightning_qlora import LoRA, save_merged, save_peft_adapter
from lightning_qlora.lora import EXPORT_MARKER, ExportDirError, LoRAConfig, inject_adapters, save_loftq_base

Export = Callable[[torch.nn.Module, "str | Path"], Path]
EXPORTS: dict[str, Export] = {"save_peft_adapter": save_peft_adapter, "save_merged": save_merged}


def adapted_tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    inject_adapters(model, LoRAConfig(r=4, dropout=0.0))
    return model


def project(root: Path) -> Path:
    """A folder as a user has it: sources, a subfolder, a hidden file."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_text("print('mine')\n")
    (root / "README.md").write_text("# my project\n")
    (root / ".env").write_bytes(b"TOKEN=secret\n")
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: file contents, None for folders."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("name", sorted(EXPORTS))
@pytest.mark.parametrize("path", ["", ".", "<cwd>", "..", "<link-to-cwd>"])
def test_the_working_directory_is_never_an_export(
    name: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = project(tmp_path / "work")
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub" if path == ".." else work)
    (tmp_path / "link").symlink_to(work, target_is_directory=True)
    given = {"<cwd>": str(work), "<link-to-cwd>": str(tmp_path / "link")}.get(path, path)
    before = snapshot(tmp_path)
    reason = "contains the working directory" if path == ".." else "working directory"
    with pytest.raises(ExportDirError, match=rf"{name} directory=.*{reason}.*Pass a new folder"):
        EXPORTS[name](adapted_tiny(), given)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_a_folder_with_other_files_is_refused_naming_them(name: str, tmp_path: Path) -> None:
    folder = project(tmp_path / "mine")
    before = snapshot(tmp_path)
    with pytest.raises(
        ExportDirError, match=r"holds files no export of lightning-qlora wrote \(.env, README.md, src\)"
    ):
        EXPORTS[name](adapted_tiny(), folder)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_a_new_an_empty_or_an_earlier_export_folder_is_written(name: str, tmp_path: Path) -> None:
    export = EXPORTS[name]
    new = export(adapted_tiny(), tmp_path / "new" / "deeper")
    marker = json.loads((new / EXPORT_MARKER).read_text())
    assert marker["written_by"] == "lightning-qlora"
    assert sorted(marker["files"]) == sorted(p.name for p in new.iterdir() if p.name != EXPORT_MARKER)
    (tmp_path / "empty").mkdir()
    export(adapted_tiny(), tmp_path / "empty")
    assert (tmp_path / "empty" / EXPORT_MARKER).is_file()
    first = snapshot(new)
    model = adapted_tiny()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    export(model, new)  # an earlier export alone: replaced
    assert snapshot(new).keys() == first.keys() and snapshot(new) != first


def test_an_export_a_user_added_to_is_refused(tmp_path: Path) -> None:
    folder = save_peft_adapter(adapted_tiny(), tmp_path / "adapter")
    (folder / "notes.txt").write_text("what I found")
    before = snapshot(tmp_path)
    with pytest.raises(ExportDirError, match=r"\(notes.txt\)"):
        save_peft_adapter(adapted_tiny(), folder)
    assert snapshot(tmp_path) == before
    (folder / EXPORT_MARKER).write_text("not json")  # a marker that lists nothing owns nothing
    (folder / "notes.txt").unlink()
    with pytest.raises(
        ExportDirError, match=r"\(.lightning-qlora-export, adapter_config.json, adapter_model.safetensors\)"
    ):
        save_peft_adapter(adapted_tiny(), folder)


def test_an_export_with_its_loftq_base_inside_is_replaced_unless_changed(
    tmp_path: Path,
) -> None:
    model = adapted_tiny()
    folder = save_peft_adapter(model, tmp_path / "adapter")
    save_loftq_base(model, folder)  # the nested export `loftq_base/`, with its own marker
    save_peft_adapter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        EXPORT_MARKER,
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    save_loftq_base(model, folder)
    (folder / "loftq_base" / "mine.txt").write_text("x")
    with pytest.raises(ExportDirError, match=r"\(loftq_base\)"):
        save_peft_adapter(model, folder)
    assert (folder / "loftq_base" / "mine.txt").read_text() == "x"


def fit(module: pl.LightningModule, root: Path, lora: LoRA) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[lora],
    )  # fmt: skip
    trainer.fit(module, toy_loader())


def test_lora_refuses_the_working_directory_and_other_files_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = project(tmp_path / "work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for bad in ("", ".", str(work), str(tmp_path)):
        with pytest.raises(ExportDirError, match=r"LoRA export_dir=.*working directory"):
            LoRA(r=4, export_dir=bad)
    with pytest.raises(
        ExportDirError, match=r"LoRA export_dir='src' is a folder that holds files.*\(train.py\)"
    ):
        LoRA(r=4, export_dir="src")
    assert snapshot(tmp_path) == before


def test_lora_refuses_the_run_folder_and_a_folder_changed_since_before_training(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "one"
    early = LoRA(r=4, export_dir=tmp_path / "runs")  # nothing there yet: fine at construction
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"a checkpoint")
    module = TinyClassifier()
    with pytest.raises(ExportDirError, match=r"LoRA export_dir=.*runs' contains the run folder.*one/adapter"):
        fit(module, run, early)
    assert module.losses == [] and (run / "last.ckpt").read_bytes() == b"a checkpoint"
    changed = LoRA(r=4, export_dir=tmp_path / "adapter")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("mine")
    with pytest.raises(ExportDirError, match=r"\(keep.txt\)"):
        fit(module, run, changed)
    assert module.losses == [] and (tmp_path / "adapter" / "keep.txt").read_text() == "mine"
    fine = LoRA(r=4, export_dir=run / "adapter")
    fit(module, run, fine)
    assert len(module.losses) == 2 and fine.exported == run / "adapter"
    assert (run / "adapter" / EXPORT_MARKER).is_file() and (run / "last.ckpt").read_bytes() == b"a checkpoint"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_place_is_refused_before_training(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ExportDirError, match=r"cannot be written: .*locked' is not writable"):
            LoRA(r=4, export_dir=locked / "adapter")
    finally:
        locked.chmod(0o755)


def test_lora_refuses_the_checkpoint_folder_while_it_is_still_empty(tmp_path: Path) -> None:
    """Empty before training, full of checkpoints by the end, when the export would replace it."""
    module = TinyClassifier()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path / "run", logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LoRA(r=4, export_dir=tmp_path / "ckpts"), saver],
    )  # fmt: skip
    with pytest.raises(
        ExportDirError, match=r"is the checkpoint folder of ModelCheckpoint, which the run writes"
    ):
        trainer.fit(module, toy_loader())
    assert module.losses == []
