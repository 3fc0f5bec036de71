"""The typed schema rejects wrong types and unknown keys while composing, naming the key."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from lightning_qlora import LoRA, LoRAConfig, QLoRAPrecision, QuantizationConfig
from lightning_qlora.cli import BASE_CONFIG_NAME, LoRAConf, OptimizerConf, PrecisionConf, TrainConfig
from lightning_qlora.strategies import OptimizerConfig

Compose = Callable[..., DictConfig]


def _error(compose_train: Compose, override: str) -> str:
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(override)
    cause = info.value.__cause__
    return f"{info.value} {cause if cause is not None else ''}"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.r=abc", "lora.r"),
        ("lora.dropout=high", "lora.dropout"),
        ("precision.blocksize=big", "precision.blocksize"),
        ("precision.double_quant=maybe", "precision.double_quant"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("trainer.max_steps=ten", "trainer.max_steps"),
        ("seed=x", "seed"),
    ],
)
def test_wrong_type_is_rejected_naming_the_key(compose_train: Compose, override: str, named: str) -> None:
    message = _error(compose_train, override)
    assert named in message
    assert "could not be converted" in message or "Value" in message


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.rr=8", "lora.rr"),
        ("trainer.max_stepz=3", "trainer.max_stepz"),
        ("precision.quant=nf4", "precision.quant"),
        ("optimizer.learning_rate=1", "optimizer.learning_rate"),
        ("model.pretrained=/x", "model.pretrained"),
    ],
)
def test_unknown_key_is_rejected_naming_the_key(compose_train: Compose, override: str, named: str) -> None:
    message = _error(compose_train, override)
    assert named in message
    assert f"+{named}" in message  # Hydra says how to add a key on purpose


def test_unknown_option_is_rejected_listing_the_options(compose_train: Compose) -> None:
    message = _error(compose_train, "precision=nf3")
    assert "nf3" in message
    assert "nf4_dq" in message


def test_keys_can_be_added_on_purpose(compose_train: Compose) -> None:
    cfg = compose_train("+trainer.detect_anomaly=true", "+model.extra=1")
    assert cfg.trainer.detect_anomaly is True
    assert cfg.model.extra == 1


def test_precision_none_means_plain_lora(compose_train: Compose) -> None:
    cfg = compose_train("precision=none")
    assert cfg.precision is None
    assert compose_train("precision=nf4").precision.double_quant is False


def test_values_are_typed_after_composition(compose_train: Compose) -> None:
    cfg = compose_train("lora.r=16", "lora.alpha=32", "trainer.limit_val_batches=0.5")
    assert cfg.lora.r == 16
    assert isinstance(cfg.lora.r, int)
    assert cfg.lora.alpha == 32.0
    assert isinstance(cfg.lora.alpha, float)
    assert OmegaConf.get_type(cfg.lora) is LoRAConf


def test_the_schema_is_registered() -> None:
    assert f"{BASE_CONFIG_NAME}.yaml" in ConfigStore.instance().list("")
    assert OmegaConf.structured(TrainConfig).lora.r == 64


@pytest.mark.parametrize(
    ("schema", "target"),
    [(LoRAConf, LoRA), (PrecisionConf, QLoRAPrecision), (OptimizerConf, OptimizerConfig)],
)
def test_the_schema_mirrors_the_constructor(schema: type, target: type) -> None:
    """Every constructor argument is settable from the command line, and nothing else is.

    (`config`, the settings object itself, is what the other keys build.)
    """
    keys = {k for k in OmegaConf.structured(schema) if not str(k).startswith("_")}
    assert keys == set(inspect.signature(target).parameters) - {"config"}


@pytest.mark.parametrize(
    ("schema", "settings"),
    [(LoRAConf, LoRAConfig), (PrecisionConf, QuantizationConfig), (OptimizerConf, OptimizerConfig)],
)
def test_the_schema_takes_its_defaults_from_the_settings_dataclass(schema: type, settings: type) -> None:
    """One source of defaults: the schema's are the dataclass's (tuples written as lists)."""
    node = OmegaConf.to_container(OmegaConf.structured(schema))
    assert isinstance(node, dict)
    for f in dataclasses.fields(settings):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        expected = list(default) if isinstance(default, tuple) else default
        assert node[f.name] == expected, f.name


def test_yaml_variants_restate_nothing(compose_train: Compose) -> None:
    """A variant starts from its group's default option and sets only the keys that differ."""
    small = compose_train("lora=small", "~experiment").lora
    default = compose_train("lora=default", "~experiment").lora
    assert {k for k in default if default[k] != small[k]} == {"r"}
    from lightning_qlora.cli import conf_dir

    variants = {
        "lora/small.yaml": {"r"},
        "precision/nf4.yaml": {"double_quant"},
        "precision/fp4.yaml": {"quant_type"},
    }
    variants |= {"optimizer/adamw.yaml": {"name"}, "optimizer/paged_adamw_8bit.yaml": {"name"}}
    for path, keys in variants.items():
        node = OmegaConf.load(conf_dir() / path)
        assert set(node) - {"defaults"} == keys, path
        assert "_self_" in node.defaults, path
    for default in ("lora/default.yaml", "precision/nf4_dq.yaml", "optimizer/paged_adamw.yaml"):
        assert not OmegaConf.load(conf_dir() / default), default  # comments only: the schema holds it all
