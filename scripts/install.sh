#!/usr/bin/env bash
# Install kvpo-megatron and its dependencies on a fresh machine (Python 3.11 or 3.12).
#   bash scripts/install.sh          # CPU (default)
# torch is pinned through scripts/constraints.txt so that nothing pulls a CUDA build.
# megatron-core 0.19.2 declares Python >= 3.12 but its wheel works on 3.11: it is installed
# alone, without its (already satisfied) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
C=scripts/constraints.txt
$PIP -c $C torch==2.13.0
$PIP --no-deps --ignore-requires-python megatron-core==0.19.2
$PIP -c $C numpy packaging pyyaml pytest triton peft sentencepiece tensorstore safetensors einops \
    diffusers transformers tqdm tensorboard protobuf imageio av matplotlib
$PIP -c $C --no-deps -e .
python3 - <<'PY'
import torch, megatron.core, peft, diffusers, transformers
print(f"kvpo-megatron install ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"peft {peft.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
PY
