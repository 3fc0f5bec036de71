#!/usr/bin/env bash
# The main job: QLoRA fine-tune of the real all-MiniLM-L6-v2 on the packaged sentiment data (its time and
# accuracy: benchmarks/results/jobs.md). Extra arguments are Hydra overrides, e.g.
# `scripts/train.sh lora.r=16 trainer.max_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/lightning-qlora-train "$@"
