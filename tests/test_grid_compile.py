"""A grid's runs that share shapes share compiled programs: with the CLI's persistent compilation
cache, a 4-run grid (2 cells of different data × 2 seeds) compiles its programs in the first run
only; every later run loads them (JAX's cache miss / hit events, counted per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GRID = """
methods: [fedavg]
seeds: [0, 1]
base:
  model: {vocab_size: 64, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, max_positions: 32}
  data: {tokens_per_client: 600}
  training: {steps: 2, batch_size: 4, seq_len: 16}
  eval: {max_windows: 4, batch_size: 4}
  rounds: 1
  tracking: {tensorboard: false}
cells:
  - {name: distinct, set: {data: {overlap: 0.0}}}
  - {name: mixed, set: {data: {overlap: 0.5}}}
"""

COUNT = """
import json, sys
from jax import monitoring
from fedjax_lora import experiment
from fedjax_lora.cli import main

counts = {"miss": 0, "hit": 0}
EVENTS = {"/jax/compilation_cache/cache_misses": "miss", "/jax/compilation_cache/cache_hits": "hit"}
monitoring.register_event_listener(
    lambda event, **kw: counts.__setitem__(EVENTS[event], counts[EVENTS[event]] + 1)
    if event in EVENTS else None
)
runs, train_and_evaluate = [], experiment.train_and_evaluate

def counted(*args, **kwargs):
    before = dict(counts)
    result = train_and_evaluate(*args, **kwargs)
    runs.append({k: counts[k] - before[k] for k in counts})
    return result

experiment.train_and_evaluate = counted  # the grid looks it up when it starts
assert main(sys.argv[1:]) == 0
print("RUNS", json.dumps(runs))
"""


def test_grid_runs_compile_each_program_once(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FEDJAX_LORA_COMPILATION_CACHE": str(tmp_path / "cache"),  # fresh: nothing compiled yet
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = ["grid", "grid.yaml", "--out", "out", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(COUNT), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout.split("RUNS", 1)[1])
    assert len(runs) == 4
    assert runs[0]["miss"] > 0  # the first run compiles every program
    assert [r["miss"] for r in runs[1:]] == [0, 0, 0]  # later runs compile nothing
    assert all(r["hit"] > 0 for r in runs[1:])  # they load the programs they trace anew
