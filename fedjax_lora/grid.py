"""Paper tables as grids: cells × methods × seeds, each run by `train_and_evaluate`, summarised as
mean ± std over seeds.

A grid file (YAML) holds:

    methods: [local, fedavg, ...]      # the table's columns (a cell may name its own)
    seeds: [1, 2, 3]
    metric: val_mean_ppl               # or test_mean_ppl, test_mean_accuracy, ... (summary keys)
    base: {...}                        # an ExperimentConfig, or a YAML file next to this one
    cells:                             # the table's rows
      - {name: agnews-mixed, set: {data: {source: ag_news, variant: mixed}}, methods: [...]}

Each run is `base`, then the cell's `set`, then the command line's overrides, then the methods and
the seed; it writes `OUT/<cell>/seed<s>/` (metrics, summary, plots). `OUT/results.md` and
`results.json` hold the table; cells whose runs record mixing matrices also get
`OUT/heatmaps/<cell>.png` (first seed). `fedjax-lora grid GRID.yaml --out OUT` and the
`experiments/*/run.py` scripts are this module's `main`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedjax_lora import config as config_lib

__all__ = ["cell_config", "grid_configs", "load_grid", "main", "results_table", "run_grid"]

Results = dict[str, dict[str, list[float]]]


def load_grid(path: str | Path) -> dict[str, Any]:
    """Reads and checks a grid file (every key named, every cell with a name)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid file {str(p)!r} does not exist")
    grid = yaml.safe_load(p.read_text()) or {}
    missing = {"methods", "seeds", "base", "cells"} - set(grid)
    if missing:
        raise ValueError(f"grid file {str(p)!r} lacks {sorted(missing)}")
    unnamed = [k for k, c in enumerate(grid["cells"]) if "name" not in c]
    if unnamed:
        raise ValueError(f"grid file {str(p)!r}: cells {unnamed} have no name")
    if isinstance(grid["base"], str):  # a config file shared by several grids, next to this one
        base = p.parent / grid["base"]
        if not base.is_file():
            raise FileNotFoundError(f"grid file {str(p)!r}: base config {str(base)!r} is missing")
        grid["base"] = yaml.safe_load(base.read_text()) or {}
    return grid


def cell_config(
    grid: dict, cell: dict, seed: int, methods: list[str], overrides: list[str]
) -> config_lib.ExperimentConfig:
    """The base config, then the cell's `set`, the command-line overrides, methods and seed."""
    config = config_lib.merge_base(config_lib.ExperimentConfig(), grid["base"])
    config = config_lib.merge_base(config, cell.get("set", {}))
    config = config_lib.load(None, overrides, base=config)
    return config_lib.merge_base(config, {"methods": methods, "seed": seed})


def results_table(final: Results, methods: list[str], metric: str = "val_mean_ppl") -> str:
    """Cells × methods, `mean ± std (n)` of `metric` over seeds (`-` where a cell lacks a
    method)."""
    lines = [
        f"{metric}, mean ± std (seeds)",
        "",
        "| cell | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for cell, per_method in final.items():
        cells = []
        for m in methods:
            v = np.asarray(per_method.get(m, []))
            cells.append(f"{v.mean():.3f} ± {v.std():.3f} ({v.size})" if v.size else "-")
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_configs(
    grid: dict,
    cells: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    overrides: list[str] = (),
) -> tuple[dict[str, list[str]], dict[tuple[str, int], config_lib.ExperimentConfig]]:
    """The selected cells' methods `{cell: [method]}` and every run's checked config
    `{(cell, seed): config}` (no JAX needed: the CLI calls it before JAX loads)."""
    by_name = {c["name"]: c for c in grid["cells"]}
    unknown = sorted(set(cells or []) - set(by_name))
    if unknown:
        raise ValueError(f"unknown cells {unknown}; the grid has {sorted(by_name)}")
    chosen = cells or list(by_name)
    cell_methods = {
        name: list(methods or by_name[name].get("methods", grid["methods"])) for name in chosen
    }
    configs = {
        (name, seed): cell_config(grid, by_name[name], seed, cell_methods[name], list(overrides))
        for name in chosen
        for seed in list(seeds or grid["seeds"])
    }
    return cell_methods, configs


def run_grid(
    grid: dict,
    out: Path,
    *,
    cells: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    overrides: list[str] = (),
    progress: bool = True,
) -> Results:
    """Runs the selected cells and seeds; returns `{cell: {method: [metric per seed]}}` and writes
    `results.md`, `results.json` and the trust heatmaps under `out`. `methods` replaces every
    cell's methods. All cells' configs are checked before the first run (and before JAX loads)."""
    out = Path(out)
    metric = grid.get("metric", "val_mean_ppl")
    seeds = list(seeds or grid["seeds"])
    cell_methods, configs = grid_configs(grid, cells, seeds, methods, overrides)
    chosen = list(cell_methods)
    from fedjax_lora.experiment import final_trust, train_and_evaluate
    from fedjax_lora.plots import plot_trust
    from fedjax_lora.report import load_history
    from fedjax_lora.tracking import progress_bar

    final: Results = {}
    runs = [(name, k, seed) for name in chosen for k, seed in enumerate(seeds)]
    for name, k, seed in progress_bar(runs, enabled=progress, desc="grid", unit="run"):
        final.setdefault(name, {m: [] for m in cell_methods[name]})
        run_dir = out / name / f"seed{seed}"
        summary = train_and_evaluate(configs[(name, seed)], run_dir, progress=progress)
        for m in cell_methods[name]:
            final[name][m].append(summary[m][metric])
        client_names = summary[cell_methods[name][0]]["client_names"]
        trust = final_trust(load_history(run_dir), len(client_names)) if k == 0 else None
        if trust:
            (out / "heatmaps").mkdir(parents=True, exist_ok=True)
            plot_trust(
                trust, client_names, out / "heatmaps" / f"{name}.png", f"{name}, seed {seed}"
            )
    columns = list(dict.fromkeys(m for name in chosen for m in cell_methods[name]))
    (out / "results.json").write_text(json.dumps({"metric": metric, "results": final}, indent=2))
    (out / "results.md").write_text(results_table(final, columns, metric) + "\n")
    return final


def add_arguments(parser: argparse.ArgumentParser, default_out: str | None = None) -> None:
    """The grid runner's options (shared by `fedjax-lora grid` and `experiments/*/run.py`)."""
    parser.add_argument("--out", default=default_out, required=default_out is None)
    parser.add_argument("--cells", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")


def main(grid_path: str | Path, args: argparse.Namespace) -> int:
    """Runs the grid file with the parsed `add_arguments` options and prints the table."""
    grid = load_grid(grid_path)
    final = run_grid(
        grid,
        Path(args.out),
        cells=args.cells,
        seeds=args.seeds,
        methods=args.methods,
        overrides=args.set,
        progress=not args.no_progress,
    )
    columns = list(dict.fromkeys(m for per in final.values() for m in per))
    print(results_table(final, columns, grid.get("metric", "val_mean_ppl")))
    print(f"\nwrote {Path(args.out) / 'results.md'}")
    return 0
