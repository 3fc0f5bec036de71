#!/usr/bin/env bash
# CUDA checks on a GPU machine: the CUDA-marked tests, a world-size-1 "qlora_fsdp" run over NCCL against
# "qlora", then the training benchmark in CUDA mode (QLoRA vs bf16 LoRA vs transformers + PEFT QLoRA: peak
# max_memory_allocated, s/step), tables written to benchmarks/results/cuda/. Sized to finish in under 9
# minutes on one recent GPU.
#
# Works offline: wheels carried in a `wheels/` folder (a CUDA torch, bitsandbytes, ...) are installed with
# --no-index first; otherwise the current environment (.venv if present, else python3) must already have
# a CUDA torch and the package's dependencies. The package itself is used from this checkout (PYTHONPATH).
#
#   bash scripts/cuda_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=benchmarks/results/cuda
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi

shopt -s nullglob
wheels=(wheels/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    echo "== installing ${#wheels[@]} carried wheel(s) from wheels/ (offline)"
    "$PY" -m pip install --quiet --no-index --find-links wheels "${wheels[@]}" || {
        echo "cuda_check.sh: installing the carried wheels failed" >&2
        exit 2
    }
fi

"$PY" - <<'PYEOF' || exit 3
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"cuda_check.sh: torch {torch.__version__} sees no CUDA device (a CPU build, or no driver).")
import bitsandbytes

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), bitsandbytes {bitsandbytes.__version__}, "
      f"{torch.cuda.get_device_name(0)}", flush=True)
PYEOF

mkdir -p "$OUT"
status=0

echo "== pytest -m cuda"
timeout 240 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider \
    --ignore=tests/strategies/test_fsdp_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "cuda_check.sh: CUDA tests failed (exit $rc)" >&2
    status=1
fi

echo "== qlora_fsdp, world size 1, NCCL (FSDP2 units over bitsandbytes' CUDA kernels) vs qlora"
timeout 200 "$PY" -m pytest tests/strategies/test_fsdp_cuda.py -m cuda -q -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest_fsdp_nccl.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "cuda_check.sh: the qlora_fsdp NCCL run failed (exit $rc)" >&2
    status=1
fi

echo "== training benchmark, CUDA (0.5B Llama shapes, batch 1 x 256, checkpointing on)"
timeout 300 "$PY" -m benchmarks.train_memory_speed --device cuda --model-size 0.5b \
    --configs lora qlora peft_qlora --threads 1 --repeats 1 --out "$OUT"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "cuda_check.sh: training benchmark failed (exit $rc)" >&2
    status=1
fi

echo "== written to $OUT:"
ls -l "$OUT"
exit $status
