"""`--help` without Hydra's group scan: the same page (header, groups, config, footer) in about a second.

Hydra's own `--help` lists the option groups by rebuilding its config repository once per group (and
once more for its own groups), several seconds for this tree. The groups here are folders of `conf/`, so
they are read from the folder; the config is composed once with Hydra's compose API, overrides included.
`--hydra-help` still goes to Hydra.
"""

from __future__ import annotations

import string
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from lightning_qlora.cli import conf_dir

_HELP_FLAGS = ("--help", "-h")


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in _HELP_FLAGS for a in argv) and "--hydra-help" not in argv


def config_groups(root: Path) -> dict[str, list[str]]:
    """`group` -> its options (yaml files), for every folder under the config root."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[folder.relative_to(root).as_posix()] = options
    return groups


def help_text(overrides: Sequence[str]) -> str:
    """The help page for the primary config with these overrides (as `--help` would show it)."""
    root = conf_dir()
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    help_cfg = cfg.hydra.help
    header, footer = str(help_cfg.header), str(help_cfg.footer)
    with open_dict(cfg):
        del cfg["hydra"]
    groups = "\n".join(f"{name}: {', '.join(options)}" for name, options in config_groups(root).items())
    template = string.Template(
        "${header}\n== Configuration groups ==\n"
        "Compose your configuration from those groups (group=option)\n\n"
        "${groups}\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n${config}\n${footer}"
    )
    return template.substitute(header=header, groups=groups, config=OmegaConf.to_yaml(cfg), footer=footer)


def print_help(argv: Sequence[str]) -> None:
    """Print the page; a bad override is one line on stderr and exit status 2, as for a job."""
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        text = help_text(overrides)
    except Exception as err:  # Hydra's composition and override errors
        print(f"Error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    print(text)
