"""Where the Hydra config folder is, whether the package runs from a checkout or from a wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def conf_dir() -> Path:
    """`conf/`: inside the package in a wheel (hatch force-includes it there), at the repo root otherwise."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"No Hydra config folder (conf/train.yaml) next to {PACKAGE_DIR} or in its parent; "
        "reinstall lightning-qlora."
    )
