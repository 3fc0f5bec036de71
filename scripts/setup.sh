#!/usr/bin/env bash
# Create .venv and install the package with everything its tests and benchmarks need.
# Idempotent: re-runs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# A pinned torch: the CPU wheel these machines carry. An unpinned torch would pull a multi-GB CUDA build.
# For CUDA, install your torch first and set TORCH_SPEC="" to keep it.
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
STAMP=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -f "$STAMP" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [ -n "$TORCH_SPEC" ]; then
        .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    fi
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$STAMP"
fi
