"""The conf folder lookup, the wandb offline rule, the throughput callback and the summary helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_qlora.cli import paths, wandb_offline
from lightning_qlora.cli.summary import compare, format_summary, peak_memory, write_summary
from lightning_qlora.cli.throughput import TokenThroughput

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def test_conf_dir_in_a_checkout_is_the_top_level_folder() -> None:
    assert paths.conf_dir() == REPO / "conf"


def test_conf_dir_in_a_wheel_is_inside_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "lightning_qlora"
    (package / "conf").mkdir(parents=True)
    (package / "conf" / "train.yaml").write_text("defaults: []\n")
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    assert paths.conf_dir() == package / "conf"


def test_conf_dir_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path / "lightning_qlora")
    with pytest.raises(FileNotFoundError, match=r"conf/train\.yaml"):
        paths.conf_dir()


def test_the_wheel_ships_conf_where_conf_dir_looks() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    force_include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force_include["conf"] == f"{paths.PACKAGE_DIR.name}/conf"
    assert pyproject["project"]["scripts"]["lightning-qlora-train"] == "lightning_qlora.cli.train:main"


@pytest.mark.parametrize(
    ("env", "netrc_host", "offline"),
    [
        ({}, None, True),
        ({"WANDB_API_KEY": "x" * 40}, None, False),
        ({}, "api.wandb.ai", False),
        ({}, "example.com", True),
        ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, None, True),
        ({"WANDB_MODE": "online"}, None, False),
        ({"WANDB_MODE": "disabled"}, "api.wandb.ai", True),
    ],
)
def test_wandb_is_offline_unless_logged_in(
    env: dict[str, str],
    netrc_host: str | None,
    offline: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    netrc = tmp_path / "netrc"
    if netrc_host is not None:
        netrc.write_text(f"machine {netrc_host}\n  login user\n  password secret\n")
        netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline() is offline


class _CountingModule(pl.LightningModule):
    """Counts 5 tokens per sample, like the examples' `tokens_seen`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.tokens_seen = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.tokens_seen += 5 * batch[0].size(0)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_token_throughput_counts_tokens_and_shows_a_rate(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    callback = TokenThroughput(window=2)
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = _CountingModule()
    module.tokens_seen = 100  # a resumed counter: only this run's tokens count
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert callback.steps == 6
    assert callback.tokens == 6 * 4 * 5
    assert callback.tokens_per_sec is not None
    assert callback.tokens_per_sec > 0
    assert callback.global_tokens_per_sec == callback.tokens_per_sec
    assert "tok/s" in trainer.progress_bar_metrics


def test_token_throughput_without_a_counter_measures_steps_only() -> None:
    callback = TokenThroughput()
    assert callback.tokens_per_sec is None
    assert callback.steps_per_sec is None
    with pytest.raises(ValueError, match="window"):
        TokenThroughput(window=0)


def test_compare_knows_which_direction_is_better() -> None:
    assert compare("val/acc", "max", {"val/acc": 0.5}, {"val/acc": 0.9})["improved"] is True
    assert compare("val/loss", "min", {"val/loss": 2.0}, {"val/loss": 2.5})["improved"] is False
    assert "improved" not in compare("val/acc", "max", {}, {"val/acc": 0.9})


def test_summary_is_written_and_printable(tmp_path: Path) -> None:
    summary = {
        "task_name": "t",
        "metric": compare("val/acc", "max", {"val/acc": 0.5}, {"val/acc": 0.75}),
        "validation": {"untuned": {"val/acc": 0.5, "val/f1": 0.4}, "tuned": {"val/acc": 0.75, "val/f1": 0.7}},
        "train": {
            "final_metrics": {"train/loss": 0.1},
            "steps": 3,
            "time_s": 1.5,
            "tokens": 300,
            "tokens_per_sec": 200.0,
        },
        "memory": peak_memory(),
        "compute_dtype": "bfloat16",
        "adapter_dir": str(tmp_path / "adapter"),
        "log_dir": None,
        "wall_time_s": 4.0,
        "summary_path": str(tmp_path / "summary.json"),
    }
    path = write_summary(summary, tmp_path)
    assert path.is_file()
    text = format_summary(summary)
    assert "val/acc: untuned 0.5000 -> tuned 0.7500 (+0.2500)" in text
    assert "200 tokens/s" in text
    assert "MiB RSS" in text
    assert summary["memory"]["peak_rss_mib"] > 10
