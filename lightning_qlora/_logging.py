"""The package logger: one name, shown at INFO like Lightning's own, printed on rank 0 only."""

from __future__ import annotations

import logging

from lightning.fabric.utilities.rank_zero import rank_zero_only

log = logging.getLogger("lightning_qlora")
if not logging.getLogger().hasHandlers():  # leave applications that configure logging alone
    log.setLevel(logging.INFO)
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
    log.propagate = False


@rank_zero_only
def rank_zero_info(message: str) -> None:
    """Log once per job, not once per process."""
    log.info(message)


@rank_zero_only
def rank_zero_warn(message: str) -> None:
    log.warning(message)
