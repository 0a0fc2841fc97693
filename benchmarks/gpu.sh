#!/usr/bin/env bash
# One prepared run of the benchmark suite on a CUDA machine (under 5 minutes on one H200):
# VGG-16 and ResNet-50 at 224x224, batch 64, float32 and bfloat16; images/s of the gradient and of
# every preset, compile time and XLA memory, appended to a results file; then SmolLM2-135M's AttnLRP and
# CP-LRP against the gradient on a 4,096-token prompt in bfloat16 (benchmarks/long_prompts.py).
#
#   benchmarks/gpu.sh [results.md]          # on the GPU machine (needs jax[cuda] installed)
#   TINY=1 benchmarks/gpu.sh /tmp/tiny.md   # smoke test of the same script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results-gpu-$(date +%Y-%m-%d).md}"
python="${PYTHON:-python3}"
"$python" -c "import jax; print('devices:', jax.devices())"
{
  echo "# GPU benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo
} >> "$out"
if [ "${TINY:-0}" = "1" ]; then
  args=(--model vggish --size 16 --batch 2 --repeats 1 --dtype float32 bfloat16
        --presets EpsilonGammaBox)
else
  args=(--model vgg16 resnet50 --size 224 --batch 64 --repeats 5 --dtype float32 bfloat16)
fi
PYTHONPATH=. "$python" benchmarks/relevance_vs_gradient.py "${args[@]}" --out "$out"
# SmolLM2-135M (scanned, rematerialised layers) on a long prompt in bfloat16: AttnLRP / CP-LRP vs the gradient
if [ "${TINY:-0}" = "1" ]; then
  llm_args=(--tiny --repeats 1 --dtype bfloat16)
else
  llm_args=(--seq 4096 --repeats 3 --dtype bfloat16)
fi
PYTHONPATH=. "$python" benchmarks/long_prompts.py "${llm_args[@]}" --out "$out"
echo "results appended to $out"
