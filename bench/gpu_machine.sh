#!/usr/bin/env bash
# On a GPU machine: the GPU check (tests/gpu/check_gpu.py) and the gateway bench (bench/gateway.py, without the real
# SGLang tokens test), both results in one folder, whatever either one does.
#
#   bash bench/gpu_machine.sh [OUT_DIR [bench/gateway.py options...]]   # OUT_DIR: bench/results/gpu-$(hostname)
#
# Needs this project's Python packages (requirements.txt) with torch and nvidia-ml-py, and wrk and nginx on PATH
# (bench/gateway.py installs them with apt-get where it can). PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-$(hostname)}
shift || true
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" tests/gpu/check_gpu.py 2>&1 | tee "$out/check_gpu.txt"
gpu=${PIPESTATUS[0]}
"$python" bench/gateway.py --skip-tokens --output "$out/gateway.json" "$@" 2>&1 | tee "$out/gateway.txt"
bench=${PIPESTATUS[0]}
echo "GPU check exit $gpu, gateway bench exit $bench; results in $out"
[ "$gpu" = 0 ] && [ "$bench" = 0 ]
