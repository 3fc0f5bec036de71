"""QLoRAStrategy in real single-device fits on CPU: which optimizer, over what, clipping, logs, resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from strategies.strategy_helpers import (
    TinyModule,
    WithOwnOptimizer,
    dataloader,
    optimized_ids,
    trainable_ids,
    trainer,
)

from lightning_qlora import LoRA, OptimizerConfig, QLoRADDPStrategy, QLoRAPrecision, QLoRAStrategy
from lightning_qlora.strategies import NoTrainableParametersError, register_strategies


def _messages(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "lightning_qlora"]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("paged_adamw", bnb.optim.PagedAdamW32bit),
        ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_installs_the_optimizer_over_exactly_the_trainable_parameters(name: str, cls: type) -> None:
    seed_everything(0)
    module = TinyModule(blocks=1)
    fit = trainer(QLoRAStrategy(optimizer={"name": name, "lr": 1e-2}))
    fit.fit(module, dataloader())
    (optimizer,) = fit.optimizers
    assert type(optimizer) is cls
    assert optimized_ids(optimizer) == trainable_ids(module)
    assert len(trainable_ids(module)) == 8  # lora_A and lora_B of 4 adapted layers, nothing else
    assert fit.lr_scheduler_configs == []  # constant schedule: none needed
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith("lora_B"))  # it trained
    assert "configure_optimizers" not in module.__dict__  # the stand-in is gone after fit
    assert len(optimizer.state) == 8  # the optimizer state of every adapter tensor


def test_grad_clipping_defaults_to_max_grad_norm(qlora_log: pytest.LogCaptureFixture) -> None:
    fit = trainer(QLoRAStrategy(), max_steps=1)
    assert fit.gradient_clip_val is None
    fit.fit(TinyModule(), dataloader())
    assert fit.gradient_clip_val == 0.3
    assert fit.gradient_clip_algorithm == GradClipAlgorithmType.NORM
    assert sum("clipping gradients to norm 0.3" in m for m in _messages(qlora_log)) == 1


def test_grad_clipping_left_to_the_user() -> None:
    fit = trainer(QLoRAStrategy(), max_steps=1, gradient_clip_val=1.0)
    fit.fit(TinyModule(), dataloader())
    assert fit.gradient_clip_val == 1.0
    fit = trainer(QLoRAStrategy(max_grad_norm=None), max_steps=1)
    fit.fit(TinyModule(), dataloader())
    assert fit.gradient_clip_val is None


def test_clipping_is_applied() -> None:
    """With a huge loss, the gradient the optimizer sees has norm max_grad_norm."""
    norms: list[float] = []

    class Loud(TinyModule):
        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx) * 1e4

        def configure_gradient_clipping(
            self,
            optimizer: object,
            gradient_clip_val: float | None = None,
            gradient_clip_algorithm: str | None = None,
        ) -> None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    trainer(QLoRAStrategy(optimizer={"name": "adamw"}), max_steps=2).fit(Loud(), dataloader())
    assert norms == pytest.approx([0.3, 0.3], rel=1e-4)


def test_user_configure_optimizers_is_kept(qlora_log: pytest.LogCaptureFixture) -> None:
    module = WithOwnOptimizer()
    fit = trainer(QLoRAStrategy())
    fit.fit(module, dataloader())
    assert type(fit.optimizers[0]) is torch.optim.SGD
    assert optimized_ids(fit.optimizers[0]) == trainable_ids(module)
    kept = [m for m in _messages(qlora_log) if "using WithOwnOptimizer.configure_optimizers" in m]
    assert len(kept) == 1
    assert "force_optimizer=True" in kept[0]


def test_force_optimizer_replaces_it(qlora_log: pytest.LogCaptureFixture) -> None:
    module = WithOwnOptimizer()
    fit = trainer(QLoRAStrategy(force_optimizer=True))
    fit.fit(module, dataloader())
    assert type(fit.optimizers[0]) is bnb.optim.PagedAdamW32bit
    assert optimized_ids(fit.optimizers[0]) == trainable_ids(module)
    assert any("configure_optimizers is not called" in m for m in _messages(qlora_log))
    assert "configure_optimizers" not in module.__dict__


def test_cpu_paging_warning_becomes_one_log_line(qlora_log: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(QLoRAStrategy(), max_steps=3).fit(TinyModule(blocks=1), dataloader())
    assert not [w for w in caught if "Paged optimizers" in str(w.message)]
    lines = [m for m in _messages(qlora_log) if "does not page optimizer state" in m]
    assert len(lines) == 1
    assert "PagedAdamW32bit runs unpaged" in lines[0]


def test_the_silencing_is_scoped_to_the_strategys_optimizer() -> None:
    """A paged optimizer the strategy did not build still warns (the filter is not global), and the
    strategy's optimizer still takes a torch LR scheduler afterwards (which re-wraps `step`)."""
    module = TinyModule()
    fit = trainer(QLoRAStrategy(), max_steps=1)
    fit.fit(module, dataloader())
    optimizer = fit.optimizers[0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    module.model[0].lora_A.grad = torch.ones_like(module.model[0].lora_A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about, bitsandbytes' paging message included
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    param = torch.nn.Parameter(torch.randn(4, 4))
    param.grad = torch.ones_like(param)
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        bnb.optim.PagedAdamW32bit([param]).step()


def test_no_trainable_parameters_is_an_error() -> None:
    module = TinyModule()
    module.requires_grad_(False)
    with pytest.raises(
        NoTrainableParametersError, match=r"Add the LoRA callback .* or set requires_grad=True"
    ):
        trainer(QLoRAStrategy(), lora=False, quantize=False).fit(module, dataloader())


def test_without_lora_it_trains_what_requires_grad() -> None:
    module = TinyModule()
    module.model[0].requires_grad_(False)
    fit = trainer(QLoRAStrategy(), lora=False, quantize=False)
    fit.fit(module, dataloader())
    assert optimized_ids(fit.optimizers[0]) == trainable_ids(module)
    assert len(trainable_ids(module)) == 2  # weight and bias of the last layer


def test_manual_optimization_gets_the_optimizer_and_no_clipping() -> None:
    """Lightning clips only in automatic optimization (and refuses gradient_clip_val in manual)."""

    class Manual(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            optimizer = self.optimizers()
            assert not isinstance(optimizer, list)
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return loss

    module = Manual()
    fit = trainer(QLoRAStrategy(), max_steps=2)
    fit.fit(module, dataloader())
    assert type(fit.optimizers[0]) is bnb.optim.PagedAdamW32bit
    assert optimized_ids(fit.optimizers[0]) == trainable_ids(module)
    assert fit.gradient_clip_val is None
    assert len(module.losses) == 2


def test_validate_after_fit_leaves_the_module_clean() -> None:
    class WithValidation(TinyModule):
        def validation_step(self, batch: object, batch_idx: int) -> None:
            pass

    module = WithValidation(blocks=1)
    fit = trainer(QLoRAStrategy(activation_checkpointing="Block"), max_steps=2)
    fit.fit(module, dataloader())
    fit.validate(module, dataloader(samples=8), verbose=False)
    leftovers = [
        name for name, m in module.named_modules() if {"forward", "configure_optimizers"} & set(m.__dict__)
    ]
    assert leftovers == []


def test_schedule_runs_per_step() -> None:
    config = OptimizerConfig(lr=1.0, name="adamw", scheduler="linear", warmup_steps=2)
    fit = trainer(QLoRAStrategy(optimizer=config), max_steps=6)
    fit.fit(TinyModule(), dataloader())
    (scheduler_config,) = fit.lr_scheduler_configs
    assert scheduler_config.interval == "step"
    # total steps = estimated_stepping_batches = max_steps = 6; after 6 steps the rate has decayed to 0
    scheduler = scheduler_config.scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert scheduler.lr_lambdas[0].total_steps == 6  # type: ignore[attr-defined]
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)


def test_strategy_names_resolve() -> None:
    register_strategies()  # a second registration is a no-op
    assert {"qlora", "qlora_ddp", "qlora_ddp_find_unused_parameters_true"} <= set(StrategyRegistry)
    fit = Trainer(strategy="qlora", accelerator="cpu", devices=1, logger=False)
    assert type(fit.strategy) is QLoRAStrategy
    assert fit.strategy.root_device == torch.device("cpu")
    for name, unused in (("qlora_ddp", False), ("qlora_ddp_find_unused_parameters_true", True)):
        strategy = Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
        assert isinstance(strategy, QLoRADDPStrategy)
        assert type(strategy) is QLoRADDPStrategy
        assert strategy.parallel_devices == [torch.device("cpu")] * 2
        assert strategy._ddp_kwargs["find_unused_parameters"] is unused
        assert strategy._get_process_group_backend() == "gloo"


def test_single_device_strategy_refuses_several_devices() -> None:
    fit = Trainer(strategy=QLoRAStrategy(), accelerator="cpu", devices=2, logger=False, max_steps=1)
    with pytest.raises(ValueError, match="Use strategy='qlora_ddp'"):
        fit.fit(TinyModule(), dataloader())


# ---------------------------------------------------------------------------------------------- resume


def _run(
    tmp: Path, quantize: bool, max_steps: int, ckpt_every: int = 0, ckpt_path: str | None = None
) -> dict[int, float]:
    seed_everything(0, workers=True)
    module = TinyModule(blocks=1)
    callbacks: list[Callback] = []
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=ckpt_every, save_top_k=-1))
    config = OptimizerConfig(lr=1e-2, scheduler="cosine", warmup_steps=2)
    fit = trainer(
        QLoRAStrategy(optimizer=config),
        max_steps=max_steps,
        quantize=quantize,
        callbacks=callbacks,
        enable_checkpointing=bool(ckpt_every),
    )
    fit.fit(module, dataloader(), ckpt_path=ckpt_path)
    return module.losses


@pytest.mark.parametrize("quantize", [True, False], ids=["qlora", "lora"])
def test_resume_continues_exactly(tmp_path: Path, quantize: bool) -> None:
    """12 steps straight vs 6 steps, checkpoint, resume for 6 more: the same losses, step for step.

    The checkpoint is taken at an epoch boundary (6 batches per epoch): Lightning restarts a plain
    DataLoader from its start when resuming mid-epoch.
    """
    full = _run(tmp_path / "full", quantize, max_steps=12, ckpt_every=6)
    ckpt = tmp_path / "full" / "epoch=0-step=6.ckpt"
    assert ckpt.exists()
    resumed = _run(tmp_path / "resumed", quantize, max_steps=12, ckpt_path=str(ckpt))
    assert sorted(resumed) == list(range(6, 12))
    assert [resumed[s] for s in range(6, 12)] == pytest.approx(
        [full[s] for s in range(6, 12)], abs=1e-6, rel=0
    )
    assert len(set(full.values())) == 12  # the loss moved: the comparison means something

    checkpoint = torch.load(ckpt, weights_only=True)
    # the LoRA callback keeps only the trainable weights: 4 adapted layers x (A, B)
    assert sorted(checkpoint["state_dict"]) == sorted(
        f"model.{i}.{part}lora_{ab}"
        for i, part in ((0, ""), (2, "up."), (2, "down."), (3, ""))
        for ab in "AB"
    )
    (state,) = checkpoint["optimizer_states"]
    assert len(state["state"]) == 8
    assert state["param_groups"][0]["lr"] > 0
    first = state["state"][0]
    tensors = first.get("__bnb_optimizer_quant_state__", first)  # bitsandbytes nests its state tensors
    assert {"state1", "state2"} <= set(tensors)  # Adam's two moments, 32-bit
    assert checkpoint["lr_schedulers"][0]["lr_lambdas"] == [
        {"kind": "cosine", "warmup_steps": 2, "total_steps": 12}
    ]
    # adapters + Adam moments + loop, scheduler and callback state (the LoRA callback also saves RNG states)
    assert ckpt.stat().st_size < 64_000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paged_state_on_cuda(qlora_log: pytest.LogCaptureFixture) -> None:
    """On CUDA the adapters' optimizer state is paged (unified memory) for tensors of 1e5 elements or more."""
    module = TinyModule()
    module.model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 4))
    fit = Trainer(
        accelerator="cuda",
        devices=1,
        strategy=QLoRAStrategy(),
        max_steps=2,
        plugins=[QLoRAPrecision()],
        callbacks=[LoRA(r=256, alpha=16, dropout=0.0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    fit.fit(module, dataloader())
    assert fit.strategy.root_device == torch.device("cuda", 0)  # device=None: the accelerator's device
    (optimizer,) = fit.optimizers
    assert type(optimizer) is bnb.optim.PagedAdamW32bit
    lora_a = module.model[0].lora_A  # 256 x 512 = 131,072 elements
    assert lora_a.device.type == "cuda"
    assert getattr(optimizer.state[lora_a]["state1"], "is_paged", False)
    assert not any("does not page" in m for m in _messages(qlora_log))
