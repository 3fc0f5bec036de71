"""Fixtures for the strategy tests: a capture of the package logger that does not depend on import order."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def qlora_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for logger "lightning_qlora" at INFO.

    `lightning_qlora._logging` stops propagation to the root logger (where caplog listens) when the root had
    no handler at import time, so the capture handler is attached to the package logger itself.
    """
    logger = logging.getLogger("lightning_qlora")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # each record once, whichever way the package set itself up
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate
