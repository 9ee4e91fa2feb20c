#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go: the head epilogue, scoring and training at the
# issue's shapes (Llama-3.2-1B and Llama-2-7B, random init, bf16, B×T = 8×2048).
#
#   bash bench/gpu_suite.sh [OUT_DIR]          # default: bench-gpu-<date>
#
# Needs a CUDA GPU, torch and transformers (nothing else from fuseflow's dependencies) and fuseflow importable
# (`pip install --no-deps --no-build-isolation -e .`). Each step writes OUT_DIR/<name>.json and <name>.txt and
# the suite goes on when one fails (its .txt says why); the Triton kernel's GPU tests run first so that its
# head figures are only read once it is known to be correct.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

step() {  # name, command...
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@" > "$out/$name.txt" 2>&1; then
        echo "   ok in $((SECONDS - t0)) s"
    else
        echo "   FAILED in $((SECONDS - t0)) s (see $out/$name.txt)"
    fi
}

step kernels-gpu python -m pytest tests/kernels -m gpu -q -p no:cacheprovider
step head-1b python bench/head.py --shape llama-3.2-1b --out "$out/head-1b.json"
step head-7b python bench/head.py --shape llama-2-7b --out "$out/head-7b.json"
step score-1b python bench/score.py --shape llama-3.2-1b --out "$out/score-1b.json"
step score-1b-flex python bench/score.py --shape llama-3.2-1b --no-dense --min-seq-len 256 \
    --attn-implementation flex_attention --out "$out/score-1b-flex.json"
step score-7b python bench/score.py --shape llama-2-7b --no-dense --out "$out/score-7b.json"
step train-1b python bench/train.py --shape llama-3.2-1b --activation-checkpointing --out "$out/train-1b.json"
step train-1b-chunked python bench/train.py --shape llama-3.2-1b --activation-checkpointing --loss-impl chunked \
    --out "$out/train-1b-chunked.json"
echo "results in $out/"
