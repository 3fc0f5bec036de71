"""OmegaConf resolvers the configs use, registered once on import of `lightning_qlora.cli`."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_qlora.optimizer_config import StrategySettings

_WANDB_HOST = "api.wandb.ai"


def wandb_logged_in() -> bool:
    """True when wandb could authenticate without asking: an API key in the env or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(_WANDB_HOST) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_offline() -> bool:
    """Log offline unless WANDB_MODE asks for online or a login exists: a run must never stop at a prompt."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online":
        return False
    return not wandb_logged_in()


def package_version() -> str:
    from lightning_qlora import __version__

    return __version__


def job_dirname(num: int, overrides: Sequence[str]) -> str:
    """A multirun job's folder name from its number and overrides (see `lightning_qlora.cli.sweep`)."""
    from lightning_qlora.cli.sweep import job_dirname as name

    return name(num, list(overrides))


def strategy_default(name: str) -> Any:
    """A QLoRA strategy argument's default (`StrategySettings`), so the trainer configs do not repeat it."""
    allowed = [f.name for f in fields(StrategySettings)]
    if name not in allowed:
        raise ValueError(f"lq.strategy_default: no setting {name!r}; allowed: {', '.join(allowed)}.")
    return getattr(StrategySettings(), name)


def register_resolvers() -> None:
    """`${lq.wandb_offline:}`, `${lq.version:}`, `${lq.job_dirname:num,overrides}`,
    `${lq.strategy_default:name}`; safe to call again."""
    for name, resolver in (
        ("lq.wandb_offline", wandb_offline),
        ("lq.strategy_default", strategy_default),
        ("lq.version", package_version),
        ("lq.job_dirname", job_dirname),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
