#!/usr/bin/env bash
# GPU verification, for a machine with a CUDA GPU: the suite's CUDA cases, a short
# ColD Fusion run with the bundled MiniLM on the GPU, and training throughput there.
#
#   benchmarks/gpu_check.sh            # from the repository root, after `make .venv/.installed`
#   PYTHON=python3 benchmarks/gpu_check.sh   # with another interpreter that has coldfusion
#
# Writes its JSON lines and the run's summary under ${OUT:-/tmp/coldfusion-gpu-check}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/coldfusion-gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU here; nothing to check")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"bf16 {'native' if torch.cuda.is_bf16_supported(including_emulation=False) else 'absent'}")
PY

echo "== the suite's CUDA cases (and the precision tests around them)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_precision.py -k "cuda or bf16 or precision"

echo "== a short ColD Fusion run on the GPU (MiniLM, 2 iterations)"
cat > "$OUT/run.yaml" <<YAML
name: gpu-check
device: cuda
precision: auto
tasks: [tweet_sentiment, movie_sentiment, reuters_r8]
loop: {iterations: 2, examples_per_contributor: 1280}
finetune: {batch_size: 32}
output_dir: $OUT/runs
YAML
rm -rf "$OUT/runs/gpu-check"
start=$(date +%s)
"$PY" -m coldfusion run "$OUT/run.yaml" | tee "$OUT/run.log"
echo "{\"metric\": \"gpu_check_run_seconds\", \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/gpu_check.jsonl"

echo "== training throughput on the GPU: ours (auto = bf16) vs ours fp32 vs the Trainer"
"$PY" benchmarks/train_speed.py --device cuda --speed-examples 2048 --repeats 2 --accuracy-examples 2000 \
    --test-examples 1000 --epochs 1 --seeds 0 --out "$OUT/gpu_check.jsonl"
