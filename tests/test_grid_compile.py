"""A grid's runs that share shapes share compiled programs: a cell's seeds run as one vectorized
sweep (one compiled round per method, each seed equal to its single run), and with the CLI's
persistent compilation cache a 4-run grid (2 cells of different data × 2 seeds) compiles its
programs in the first cell only; the second loads them (JAX's cache miss / hit events, counted
per cell)."""

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
cells, train_and_evaluate_seeds = [], experiment.train_and_evaluate_seeds

def counted(*args, **kwargs):
    before = dict(counts)
    result = train_and_evaluate_seeds(*args, **kwargs)
    cells.append({k: counts[k] - before[k] for k in counts})
    return result

experiment.train_and_evaluate_seeds = counted  # the grid looks it up when it starts
assert main(sys.argv[1:]) == 0
print("CELLS", json.dumps(cells))
"""


def test_grid_cells_compile_each_program_once(tmp_path):
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
    cells = json.loads(result.stdout.split("CELLS", 1)[1])
    assert len(cells) == 2  # each cell's 2 seeds in one sweep
    assert cells[0]["miss"] > 0  # the first cell compiles every program
    assert cells[1]["miss"] == 0  # the second, other data of the same shapes, compiles nothing
    assert cells[1]["hit"] > 0  # it loads the programs it traces anew
    runs = [
        tmp_path / "out" / cell / f"seed{seed}" for cell in ("distinct", "mixed") for seed in (0, 1)
    ]
    for run in runs:
        assert (run / "summary.json").is_file() and (run / "metrics.jsonl").is_file()
        assert (run / "adapters" / "fedavg.safetensors").is_file()


def test_a_cells_seeds_run_as_one_sweep_equal_to_their_single_runs(tmp_path):
    """2 seeds × 2 methods in one cell: one compiled round per method (not per seed), and every
    seed's summary equals the single run of that seed."""
    import numpy as np

    from fedjax_lora import grid as grid_lib
    from fedjax_lora.experiment import train_and_evaluate
    from tests.tiny import compilations

    (tmp_path / "grid.yaml").write_text(GRID.replace("[fedavg]", "[local, fedavg]"))
    grid = grid_lib.load_grid(tmp_path / "grid.yaml")
    with compilations() as compiled:
        grid_lib.run_grid(grid, tmp_path / "out", cells=["mixed"], progress=False)
    assert compiled.count("jit(sweep_round)") == 2  # local and fedavg, each over both seeds
    _, configs = grid_lib.grid_configs(grid, ["mixed"])
    for seed in (0, 1):
        single = train_and_evaluate(
            configs[("mixed", seed)], tmp_path / f"single{seed}", progress=False
        )
        swept = json.loads(
            (tmp_path / "out" / "mixed" / f"seed{seed}" / "summary.json").read_text()
        )
        for method in ("local", "fedavg"):
            for key in ("val_ppl", "test_ppl", "val_mean_ppl"):
                np.testing.assert_allclose(
                    swept[method][key],
                    single[method][key],
                    rtol=2e-5,
                    err_msg=f"{seed} {method} {key}",
                )


def test_the_toolbox_grid_composes_what_the_docs_say():
    from fedjax_lora.experiment import method_factory
    from fedjax_lora.grid import cell_config, load_grid

    grid = load_grid(ROOT / "experiments" / "configs" / "toolbox.yaml")
    cells = {}
    for cell in grid["cells"]:
        methods = cell.get("methods", grid["methods"])
        config = cell_config(grid, cell, grid["seeds"][0], methods, [])
        for m in methods:
            method_factory(m, config)  # raises on an unknown option or a bad value
        cells[cell["name"]] = config
    dp = cells["dp-fedadam"]
    assert dp.aggregation.dp.noise_multiplier == 1.0 and dp.aggregation.dp.clip_norm == 0.5
    assert dp.method_options["ffa-lora"]["server_opt"]["kind"] == "adam"
    assert cells["fedyogi-generalist"].method_options["comigs"]["server_opt"]["kind"] == "yogi"
    trimmed = cells["cohort-4-trimmed-mean"]
    assert trimmed.data.cohort_size == 4 and trimmed.aggregation.reduction == "trimmed_mean"
    assert cells["defaults"].aggregation.default and cells["cohort-4"].aggregation.default
