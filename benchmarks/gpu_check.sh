#!/usr/bin/env bash
# The GPU checks of the megablocks/CUDA path in one go (for a lent GPU machine): the GPU tests,
# then the layer benchmark. Usage: bash benchmarks/gpu_check.sh  (from the repository root)
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python -m pytest -q -m gpu -rs tests
python benchmarks/bench_gpu.py "$@"
