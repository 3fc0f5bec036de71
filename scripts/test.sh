#!/usr/bin/env bash
# The test suite, lint and type checks, on CPU (CUDA tests are skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
.venv/bin/ruff check .
.venv/bin/mypy
# Two workers, a test file each at a time (files share their expensive fixtures); PYTEST_WORKERS=0 runs
# in this process (for -x or a debugger).
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
