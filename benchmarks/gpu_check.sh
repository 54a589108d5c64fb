#!/usr/bin/env bash
# GPU check of the char-LM benchmarks: jaxseq vs PyTorch (cuDNN) vs flax.linen on one GPU.
#
# Run from anywhere on a machine with a GPU, in an environment that already has jax with
# its CUDA plugin, flax, optax and (for the cuDNN reference) torch built with CUDA:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# It installs nothing. It prints one JSON line per measurement on stdout (the tables go to
# stderr) and, first, one JSON line describing the devices; when JAX sees no GPU it says so
# in that line and exits with status 3 instead of timing CPUs. About 5 minutes on an H100
# for the char-LM runs; the recurrence run (40 workers, each compiling one train step) has
# not been timed on a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'PY'
import json, sys
info = {"gpu_check": "devices"}
try:
    import jax
    info["jax"] = jax.__version__
    info["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    info["jax_backend"] = jax.default_backend()
except Exception as e:  # report, do not install
    info["jax_error"] = repr(e)
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.cuda.is_available()
    info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
except ImportError:
    info["torch"] = None
print(json.dumps(info), flush=True)
if info.get("jax_backend") != "gpu":
    print(json.dumps({"gpu_check": "skipped", "reason": "JAX sees no GPU (install jax with "
                      "its CUDA plugin in this environment first)"}), flush=True)
    sys.exit(3)
PY

# Training: H = 256 and 512, all three cells, jaxseq vs flax.linen vs PyTorch (cuDNN when
# torch sees the GPU), interleaved; jaxseq-scan is jaxseq without its fused layers.
"$PYTHON" -m benchmarks charlm --cell all --hidden 256 512 \
    --impl jaxseq jaxseq-scan flax torch --steps 10 --warmup 3 --json --no-progress
# Mixed precision (bfloat16 compute, float32 parameters) for the JAX implementations.
"$PYTHON" -m benchmarks charlm --cell lstm --hidden 512 --dtype bfloat16 \
    --impl jaxseq flax torch --steps 10 --warmup 3 --json --no-progress
# Sampling: 2,000 characters at batch 1 and 64.
"$PYTHON" -m benchmarks sample --cell lstm --hidden 512 --batch 1 64 --json
# minGRU and minLSTM, scan and associative forms, against the fused GRU and LSTM: 2-layer
# char LMs, T = 128 / 512 / 2048 / 8192 at 8192 characters per batch, equal hidden size and
# equal parameter count (benchmarks/recurrence.md has the CPU run). On a GPU "auto" picks
# the associative form for the min cells (jaxseq/_linear.py: associative_pays); this run
# says whether that holds.
"$PYTHON" -m benchmarks recurrence --json --no-progress
