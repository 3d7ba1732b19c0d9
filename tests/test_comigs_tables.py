"""The CoMiGS table grids: every cell's config and method options are valid (GPT-2 and Llama
variants), and one cell runs end to end on a tiny override."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora.experiment import method_factory
from fedjax_lora.grid import cell_config, load_grid
from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
COMIGS = ROOT / "experiments" / "comigs"


def _runner():
    spec = importlib.util.spec_from_file_location("comigs_run", COMIGS / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


@pytest.mark.parametrize("table", ["1", "2", "4"])
@pytest.mark.parametrize("llama", [False, True])
def test_every_cell_and_method_option_is_valid(table, llama):
    grid = load_grid(COMIGS / f"table{table}.yaml")
    overrides = _runner().LLAMA if llama else []
    assert grid["metric"] == "test_mean_ppl" and grid["seeds"] == [42, 45, 47]
    for cell in grid["cells"]:
        methods = cell.get("methods", grid["methods"])
        config = cell_config(grid, cell, 42, methods, list(overrides))
        assert config.rounds == 20 and config.training.steps == 10
        assert config.data.source.startswith("comigs_")
        for m in methods:
            method_factory(m, config)  # raises on an unknown option or a bad value
    if table == "2":
        paper = [c for c in grid["cells"] if not c["name"].endswith("-faithful")]
        counts = {c["name"]: c["set"]["method_options"]["comigs"]["expert_counts"] for c in paper}
        assert counts["wikipedia-2444"] == [2, 4, 4, 4]
        assert len(paper) == 12 and len(grid["cells"]) == 24
        for c in paper:  # the reference's servers, comparable with the paper's columns
            options = c["set"]["method_options"]
            assert options["hetlora"]["reference_weights"] is True
            assert options["flexlora"]["reference_accumulator"] is True
            assert options["flexlora"]["merge_alpha"] == 16.0


def test_a_table_cell_runs_on_a_tiny_override(tmp_path):
    out = tmp_path / "t2"
    argv = ["--table", "2", "--cells", "agnews-2444", "--seeds", "42", "--out", str(out)]
    argv += ["--no-progress", "--set", *TINY, "model.source=null", "data.source=synthetic"]
    argv += ["data.num_groups=4", "data.clients_per_group=1", "rounds=1", "training.steps=1"]
    argv += ["method_options.hetlora.ranks=[2,4,4,4]", "method_options.flexlora.ranks=[2,4,4,4]"]
    assert _runner().main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "test_mean_ppl"
    assert set(results["results"]["agnews-2444"]) == {"hetlora", "flexlora", "comigs"}
    assert "| agnews-2444 |" in (out / "results.md").read_text()
    # The CoMiGS run's last record holds its routing analysis, and its heatmap is written.
    run_dir = out / "agnews-2444" / "seed42"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {r["method"]: r for r in records}
    routing = last["comigs"]["routing"]
    shares = np.asarray(routing["shares"])
    assert shares.shape == (4, 1) and np.all((shares >= 0) & (shares <= 1))
    assert len(routing["generalist_tokens"][0][0]) > 0
    assert "routing" not in last["hetlora"]
    assert (run_dir / "routing_comigs.png").stat().st_size > 0
