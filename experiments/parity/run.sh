#!/usr/bin/env bash
# Parity of fedjax_lora with the authors' PyTorch code, one paper at a time.
#
#   bash experiments/parity/run.sh {trust|comigs|fedamole} REF_DIR OUT_DIR [--quick|--speed]
#
# REF_DIR: the authors' repository (a clone or an export; README.md says which one per paper).
# OUT_DIR: results; OUT_DIR/results.json holds every check ({"checks": [...], "info": [...],
# "speed": {...}}); the exit status is 0 iff every check passed.
# --quick (default): the parity checks only; --speed: also the interleaved speed test.
# Virtual environments (torch==2.13.0, the CPU wheel, and this project installed editable) are
# made once under $PARITY_VENVS (default OUT_DIR/venvs) and reused.
set -euo pipefail

usage() {
  echo "usage: bash experiments/parity/run.sh {trust|comigs|fedamole} REF_DIR OUT_DIR [--quick|--speed]" >&2
  exit 2
}
[ $# -ge 3 ] || usage
PAPER=$1
case $PAPER in trust | comigs | fedamole) ;; *) usage ;; esac
[ -d "$2" ] || { echo "REF_DIR $2 is not a directory: clone the authors' repository (README.md)" >&2; exit 2; }
SPEED=0
for arg in "${@:4}"; do
  case $arg in
    --quick) SPEED=0 ;;
    --speed) SPEED=1 ;;
    *) usage ;;
  esac
done
REF_DIR=$(cd "$2" && pwd)
mkdir -p "$3"
OUT_DIR=$(cd "$3" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENVS=${PARITY_VENVS:-$OUT_DIR/venvs}
PYTHON=${PYTHON:-python3}
TORCH='torch==2.13.0'  # pinned: the unpinned name pulls several GB of CUDA wheels

# One venv per set of pins, (re)installed when the pins or pyproject.toml change
# ($VENVS/<name>/.ready holds their hash).
venv() {
  local name=$1
  shift
  local dir=$VENVS/$name
  local stamp
  stamp=$( (echo "$@"; cat "$ROOT/pyproject.toml") | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$dir/.ready" 2>/dev/null)" != "$stamp" ]; then
    echo "== setting up $dir" >&2
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q "$@" >&2
    echo "$stamp" > "$dir/.ready"
  fi
  echo "$dir/bin/python"
}

# fedjax_lora (editable) beside the pinned torch: enough for the trust and CoMiGS references.
JAX_PY=$(venv jax -e "$ROOT" "$TORCH" tiktoken psutil)

export REF_DIR OUT_DIR TQDM_DISABLE=1
# torch single-threaded: on a few shared cores its 2-thread parallel regions stall (README.md).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT_DIR/parts"
rm -f "$OUT_DIR"/parts/*.json "$OUT_DIR/results.json"
WORK=$OUT_DIR/work
mkdir -p "$WORK"

case $PAPER in
  trust)
    # The paper-era code lives on branch `rebutal` (README.md); a clone gives it here, an export
    # needs REF_PAPER_DIR.
    REF_PAPER_DIR=${REF_PAPER_DIR:-}
    if [ -z "$REF_PAPER_DIR" ] && git -C "$REF_DIR" rev-parse --git-dir >/dev/null 2>&1; then
      for rev in rebutal origin/rebutal; do
        if git -C "$REF_DIR" rev-parse --verify -q "$rev" >/dev/null; then
          REF_PAPER_DIR=$WORK/ref_paper
          rm -rf "$REF_PAPER_DIR" && mkdir -p "$REF_PAPER_DIR"
          git -C "$REF_DIR" archive "$rev" | tar -x -C "$REF_PAPER_DIR"
          break
        fi
      done
    fi
    cd "$HERE/trust"
    "$JAX_PY" parity_rules.py --ref-dir "$REF_DIR" --work "$WORK"
    if [ -n "$REF_PAPER_DIR" ]; then
      # the paper layout: S1/naive/mixing/schedule rules, then the trajectories at the paper's lr
      "$JAX_PY" parity_rules.py --ref-dir "$REF_PAPER_DIR" --work "$WORK"
      "$JAX_PY" trajectory.py --ref-dir "$REF_PAPER_DIR" --work "$WORK" --rules validation fedavg
    else
      echo "no paper-era tree (branch rebutal): trajectories on $REF_DIR" >&2
      "$JAX_PY" trajectory.py --ref-dir "$REF_DIR" --work "$WORK" --rules validation fedavg
    fi
    if [ "$SPEED" = 1 ]; then
      "$JAX_PY" speed.py --ref-dir "$REF_DIR" --work "$WORK" --reps 3
    fi
    ;;
  comigs)
    cd "$HERE/comigs"
    "$JAX_PY" parity_blocks.py
    "$JAX_PY" trajectory.py                        # 1G1S: E=2, k=2 (LB constant)
    "$JAX_PY" trajectory.py --experts 3 --no-clean --ref-lb-on-routed-input
    "$JAX_PY" trajectory.py --experts 3 --no-clean --jax-lb-on-block-output
    if [ "$SPEED" = 1 ]; then
      "$JAX_PY" speed.py --clients 4 --reps 3
    fi
    ;;
  fedamole)
    # The reference pins transformers 4.48 / peft 0.14 (fedjax_lora needs transformers 5): a
    # second venv. cvxpy 1.4.2 needs numpy < 2 and scipy < 1.14; PySCIPOpt ships SCIP.
    REF_PY=$(venv fedamole-ref "$TORCH" transformers==4.48.0 peft==0.14.0 cvxpy==1.4.2 \
      PySCIPOpt==5.1.1 rouge==1.0.1 scikit-learn tqdm tensorboard safetensors datasets==3.2.0 \
      numpy==1.26.4 scipy==1.13.1 'pandas<2.3' 'pyarrow<19')
    cd "$HERE/fedamole"
    "$REF_PY" build_fixtures.py
    "$REF_PY" ref_side.py layer model rsea assign data
    "$JAX_PY" jax_side.py layer model rsea assign data
    "$JAX_PY" jax_traj.py plan
    "$JAX_PY" jax_traj.py plan examples     # examples of different lengths, padded (point 6)
    for run in static rsea static_examples; do
      "$REF_PY" ref_traj.py "$run"
      "$JAX_PY" jax_traj.py run "$run" map
    done
    "$JAX_PY" jax_traj.py run static vmap   # the float floor: map vs vmap
    "$JAX_PY" compare.py
    if [ "$SPEED" = 1 ]; then
      REF_PY=$REF_PY JAX_PY=$JAX_PY "$JAX_PY" speed.py --reps 3 --threads 1
    fi
    ;;
  *) usage ;;
esac

"$JAX_PY" "$HERE/results.py" "$OUT_DIR"
