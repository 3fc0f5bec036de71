"""The LoRA callback in a real Trainer: injection, freezing, both build paths, checkpoints and resume."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyClassifier, TinyNet, toy_loader
from torch import nn

from lightning_qlora import LoRA, QLoRAPrecision
from lightning_qlora.lora import LoRALinear, adapter_modules
from lightning_qlora.lora.inject import PatternMatchError
from lightning_qlora.quantization import NoLinearLayersError, is_linear4bit, is_quantized


class LateClassifier(TinyClassifier):
    """Builds its model in `configure_model`, which runs after Callback.setup."""

    def __init__(self, lr: float = 1e-2) -> None:
        pl.LightningModule.__init__(self)
        self.model: nn.Module | None = None  # type: ignore[assignment]
        self.lr = lr
        self.losses = []

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = TinyNet()


def make_trainer(tmp_path: Path, steps: int, plugins: list | None = None, **kwargs: object) -> pl.Trainer:
    callbacks = kwargs.pop("callbacks", [])
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=plugins or [],
        callbacks=callbacks,  # type: ignore[arg-type]
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("module_cls", [TinyClassifier, LateClassifier], ids=["init", "configure_model"])
@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "lora"])
def test_adapters_everywhere_but_the_head_and_only_they_train(
    tmp_path: Path, module_cls: type[TinyClassifier], quantized: bool
) -> None:
    torch.manual_seed(0)
    module = module_cls(lr=2e-2)
    plugins = [QLoRAPrecision(compute_dtype="float32")] if quantized else []
    trainer = make_trainer(
        tmp_path, 15, plugins, callbacks=[LoRA(r=4, dropout=0.0)], enable_checkpointing=False
    )
    trainer.fit(module, toy_loader())

    adapted = dict(adapter_modules(module))
    assert set(adapted) == {"model.net.0", "model.net.2"}
    for layer in adapted.values():
        assert is_quantized(layer.base_layer) == quantized
        assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    assert type(module.model.lm_head) is nn.Linear
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in adapted for m in "AB"}
    assert module.losses[-1] < module.losses[0]


def test_output_right_after_injection_is_the_base_output() -> None:
    torch.manual_seed(0)
    module = TinyClassifier().eval()
    x = torch.randn(8, 32)
    before = module(x)
    LoRA(r=8, dropout=0.1).inject(module)
    module.eval()
    torch.testing.assert_close(module(x), before, rtol=0, atol=0)
    for _, layer in adapter_modules(module):
        assert torch.count_nonzero(layer.lora_B) == 0
        assert layer.lora_A.abs().sum() > 0
        bound = 1 / layer.in_features**0.5  # kaiming_uniform(a=sqrt(5)), as nn.Linear and the LoRA paper
        assert layer.lora_A.abs().max() <= bound


def test_adapters_are_never_quantized_whichever_runs_first() -> None:
    callback_first = TinyClassifier()
    LoRA(r=4).inject(callback_first)
    QLoRAPrecision().convert_module(callback_first)
    plugin_first = TinyClassifier()
    QLoRAPrecision().convert_module(plugin_first)
    LoRA(r=4).inject(plugin_first)
    for module in (callback_first, plugin_first):
        module.to("cpu")
        for _, layer in adapter_modules(module):
            assert is_linear4bit(layer.base_layer)
            assert isinstance(layer.lora_A, nn.Parameter) and layer.lora_A.dtype == torch.float32
        assert not any(is_linear4bit(m) for _, a in adapter_modules(module) for m in (a.lora_dropout,))


def test_adapter_dtype_option() -> None:
    module = TinyClassifier()
    LoRA(r=4, adapter_dtype="bfloat16").inject(module)
    assert all(layer.lora_A.dtype == torch.bfloat16 for _, layer in adapter_modules(module))
    out = module(torch.randn(2, 32))
    assert out.dtype == torch.float32


def test_modules_to_save_stay_full_precision_and_trainable(tmp_path: Path) -> None:
    module = TinyClassifier()
    trainer = make_trainer(
        tmp_path,
        2,
        [QLoRAPrecision(exclude=(), compute_dtype="float32")],
        callbacks=[LoRA(r=4, modules_to_save=["lm_head"])],
        enable_checkpointing=False,
    )
    trainer.fit(module, toy_loader())
    head = module.model.lm_head
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    assert head.weight.requires_grad and head.bias.requires_grad
    assert not isinstance(head, LoRALinear)


def test_include_exclude_and_per_pattern_overrides() -> None:
    module = TinyClassifier()
    LoRA(r=8, alpha=16, rank_pattern={"net.2": 2}, alpha_pattern={"net.2": 4}).inject(module)
    layers = dict(adapter_modules(module))
    assert layers["model.net.0"].r == 8 and layers["model.net.0"].scaling == pytest.approx(2.0)
    assert layers["model.net.2"].r == 2 and layers["model.net.2"].scaling == pytest.approx(2.0)

    only = TinyClassifier()
    LoRA(target_modules=["net.0"]).inject(only)
    assert set(dict(adapter_modules(only))) == {"model.net.0"}

    everything = TinyClassifier()
    LoRA(exclude=[], r=4).inject(everything)
    assert "model.lm_head" in dict(adapter_modules(everything))


def test_rslora_scaling() -> None:
    module = TinyClassifier()
    LoRA(r=16, alpha=8, use_rslora=True).inject(module)
    assert all(layer.scaling == pytest.approx(8 / 4) for _, layer in adapter_modules(module))


def test_summary_table_logged_at_setup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_qlora"):
        logging.getLogger("lightning_qlora").addHandler(caplog.handler)
        try:
            make_trainer(tmp_path, 1, callbacks=[LoRA(r=4)], enable_checkpointing=False).fit(
                TinyClassifier(), toy_loader()
            )
        finally:
            logging.getLogger("lightning_qlora").removeHandler(caplog.handler)
    messages = {id(r): r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA:")}
    assert len(messages) == 1
    text = next(iter(messages.values()))
    assert "2 adapted layers" in text and "trainable params" in text and "%" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "LoRA r must be a positive integer, got 0"),
        ({"r": 2.5}, "LoRA r must be a positive integer"),
        ({"alpha": 0}, "LoRA alpha must be a positive number, got 0"),
        ({"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"LoRA dropout must be in \[0, 1\)"),
        ({"rank_pattern": {"q": -1}}, r"rank_pattern\['q'\] must be a positive integer"),
        ({"adapter_dtype": "int8"}, "Unknown adapter_dtype 'int8'"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRA(**kwargs)  # type: ignore[arg-type]


def test_pattern_matching_nothing_lists_existing_names(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, 1, callbacks=[LoRA(target_modules=["q_proj"])], enable_checkpointing=False
    )
    with pytest.raises(
        PatternMatchError,
        match=r"target_modules pattern\(s\) \['q_proj'\] match no module.*"
        r"'model.net.0'",
    ):
        trainer.fit(TinyClassifier(), toy_loader())


def test_model_without_linear_layer_is_rejected(tmp_path: Path) -> None:
    class NoLinear(TinyClassifier):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.conv = nn.Conv1d(1, 1, 1)

    trainer = make_trainer(tmp_path, 1, callbacks=[LoRA()], enable_checkpointing=False)
    with pytest.raises(NoLinearLayersError, match=r"NoLinear has no torch\.nn\.Linear"):
        trainer.fit(NoLinear(), toy_loader())


def test_checkpoint_holds_adapters_not_the_base(tmp_path: Path) -> None:
    class Wide(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyNet(width=512)

    module = Wide()
    trainer = make_trainer(tmp_path, 2, callbacks=[LoRA(r=4)], enable_checkpointing=False)
    trainer.fit(module, toy_loader())
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    full = make_trainer(tmp_path, 2, enable_checkpointing=False)
    full.fit(Wide(), toy_loader())
    full.save_checkpoint(tmp_path / "full.ckpt")

    state = torch.load(tmp_path / "lora.ckpt", weights_only=False)["state_dict"]
    assert set(state) == {f"model.net.{i}.lora_{m}" for i in (0, 2) for m in "AB"}
    ratio = (tmp_path / "lora.ckpt").stat().st_size / (tmp_path / "full.ckpt").stat().st_size
    # the full checkpoint holds weights plus two Adam moments of ~280k params; ours ~5k adapter params
    assert ratio < 0.05, ratio


def _run(
    tmp_path: Path, steps: int, quantized: bool, ckpt: Path | None = None, every: int | None = None
) -> TinyClassifier:
    pl.seed_everything(7, workers=True)
    module = TinyClassifier(lr=2e-2)
    callbacks: list[pl.Callback] = [LoRA(r=4, dropout=0.1)]
    if every:
        # saved on the last batch of an epoch: a checkpoint written in on_train_epoch_end makes Lightning
        # 2.6 replay one batch when it resumes, and a mid-epoch one needs a resumable dataloader
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1))
    plugins = [QLoRAPrecision(compute_dtype="float32")] if quantized else []
    trainer = make_trainer(
        tmp_path, steps, plugins, callbacks=callbacks, enable_checkpointing=bool(every), deterministic=True
    )
    trainer.fit(module, toy_loader(n=64, shuffle=True), ckpt_path=ckpt)  # 4 steps an epoch
    return module


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "lora"])
def test_resume_continues_exactly(tmp_path: Path, quantized: bool) -> None:
    """Dropout is on and batches are shuffled, so this also checks that the RNG state travels with the
    checkpoint: Lightning alone would resume with fresh random masks."""
    uninterrupted = _run(tmp_path / "a", 12, quantized)
    _run(tmp_path / "b", 8, quantized, every=4)
    checkpoint = next((tmp_path / "b").glob("epoch=0-step=4.ckpt"))
    resumed = _run(tmp_path / "c", 12, quantized, ckpt=checkpoint)
    assert len(resumed.losses) == 8
    assert resumed.losses == pytest.approx(uninterrupted.losses[4:], rel=0, abs=1e-6)


def test_resume_with_a_different_rank_is_refused(tmp_path: Path) -> None:
    _run(tmp_path / "b", 4, False, every=4)
    checkpoint = next((tmp_path / "b").glob("*.ckpt"))
    module = TinyClassifier()
    trainer = make_trainer(tmp_path / "c", 4, callbacks=[LoRA(r=8)], enable_checkpointing=False)
    with pytest.raises((ValueError, RuntimeError), match=r"(size mismatch|different LoRA configuration)"):
        trainer.fit(module, toy_loader(), ckpt_path=checkpoint)


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [({"use_dora": True}, {"variant": "dora"}), ({"variant": "dora"}, {"use_dora": True})],
    ids=["use_dora-then-variant", "variant-then-use_dora"],
)
def test_resume_across_the_two_spellings_of_dora(
    tmp_path: Path, saved: dict[str, object], resumed: dict[str, object]
) -> None:
    """`use_dora=True` and `variant="dora"` are one configuration: a checkpoint of one resumes under the
    other, while plain LoRA is still refused, naming the variant."""

    def base() -> TinyClassifier:  # the same base weights each time, as a resume needs
        pl.seed_everything(7, workers=True)
        return TinyClassifier()

    callbacks = [LoRA(r=4, **saved), ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=4)]
    make_trainer(tmp_path / "b", 4, callbacks=callbacks).fit(base(), toy_loader(n=64))
    checkpoint = next((tmp_path / "b").glob("*.ckpt"))
    trainer = make_trainer(tmp_path / "c", 8, callbacks=[LoRA(r=4, **resumed)], enable_checkpointing=False)
    trainer.fit(base(), toy_loader(n=64), ckpt_path=checkpoint)
    assert trainer.global_step == 8
    trainer = make_trainer(tmp_path / "d", 8, callbacks=[LoRA(r=4)], enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"variant: checkpoint 'dora' vs now 'lora'"):
        trainer.fit(base(), toy_loader(n=64), ckpt_path=checkpoint)


def test_export_includes_a_head_outside_model_when_asked(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    class WithHead(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.model(x))

    default = LoRA(r=4, modules_to_save=["head"], export_dir=tmp_path / "a")
    make_trainer(tmp_path, 1, callbacks=[default], enable_checkpointing=False).fit(WithHead(), toy_loader())
    assert not any("head" in k for k in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    whole = LoRA(r=4, modules_to_save=["head"], export_dir=tmp_path / "b", export_module=".")
    make_trainer(tmp_path, 1, callbacks=[whole], enable_checkpointing=False).fit(WithHead(), toy_loader())
    keys = set(load_file(tmp_path / "b" / "adapter_model.safetensors"))
    assert {"base_model.model.head.weight", "base_model.model.model.net.0.lora_A.weight"} <= keys
