#!/usr/bin/env bash
# The GPU session's one command (experiments/benchmarks/README.md, "On a lent GPU"): installs the
# carried wheels (.whl/) and the project, prints the device, runs gpu.py (arguments passed on) and
# copies its JSON, table, figure and log to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/gpu_out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "editable install failed; the checkout is on PYTHONPATH"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
marker="$(mktemp)"
python3 experiments/benchmarks/gpu.py --trace-dir "$out" "$@" 2>&1 | tee "$out/gpu_log.txt"
status=${PIPESTATUS[0]}
find experiments/benchmarks/results -maxdepth 1 -type f -newer "$marker" -exec cp {} "$out/" \;
ls -l "$out"
exit "$status"
