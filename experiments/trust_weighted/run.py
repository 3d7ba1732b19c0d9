"""Runs the trust-weighted paper's grid and writes the results table and trust heatmaps.

For every cell (dataset x heterogeneity) and seed of `grid.yaml`, `train_and_evaluate` runs all
methods into `OUT/<cell>/seed<s>/` (metrics.jsonl with every round's trust matrix, summary.json,
plots). Then `OUT/results.md` holds the mean ± std over seeds of the final mean client validation
perplexity per cell and method, and `OUT/heatmaps/<cell>.png` the final trust matrices of every
method (first seed).

    python experiments/trust_weighted/run.py [--grid grid.yaml] [--cells C ...] [--seeds S ...]
        [--methods M ...] [--set section.field=value ...] --out runs/trust_weighted
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from fedjax_lora import config as config_lib
from fedjax_lora.experiment import final_trust, plot_trust, train_and_evaluate
from fedjax_lora.report import load_history

GRID = Path(__file__).with_name("grid.yaml")


def cell_config(
    grid: dict, cell: dict, seed: int, methods: list[str], overrides: list[str]
) -> config_lib.ExperimentConfig:
    """The base config, then the cell's `set`, the command-line overrides, methods and seed."""
    config = config_lib.merge_base(config_lib.ExperimentConfig(), grid["base"])
    config = config_lib.merge_base(config, cell.get("set", {}))
    config = config_lib.load(None, overrides, base=config)
    return config_lib.merge_base(config, {"methods": methods, "seed": seed})


def results_table(final: dict[str, dict[str, list[float]]], methods: list[str]) -> str:
    """Cells x methods, `mean ± std (n)` of the final mean client validation perplexity."""
    lines = ["| cell | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for cell, per_method in final.items():
        cells = []
        for m in methods:
            v = np.asarray(per_method.get(m, []))
            cells.append(f"{v.mean():.3f} ± {v.std():.3f} ({v.size})" if v.size else "-")
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_grid(
    grid: dict,
    out: Path,
    *,
    cells: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    overrides: list[str] = (),
    progress: bool = True,
) -> dict[str, dict[str, list[float]]]:
    """Runs the selected cells and seeds; returns `{cell: {method: [final val ppl per seed]}}`
    and writes `results.md`, `results.json` and `heatmaps/<cell>.png` under `out`."""
    by_name = {c["name"]: c for c in grid["cells"]}
    unknown = sorted(set(cells or []) - set(by_name))
    if unknown:
        raise ValueError(f"unknown cells {unknown}; the grid has {sorted(by_name)}")
    methods = list(methods or grid["methods"])
    seeds = list(seeds or grid["seeds"])
    final: dict[str, dict[str, list[float]]] = {}
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    for name in cells or list(by_name):
        final[name] = {m: [] for m in methods}
        for k, seed in enumerate(seeds):
            config = cell_config(grid, by_name[name], seed, methods, list(overrides))
            run_dir = out / name / f"seed{seed}"
            summary = train_and_evaluate(config, run_dir, progress=progress)
            for m in methods:
                final[name][m].append(summary[m]["val_mean_ppl"])
            if k == 0:
                client_names = summary[methods[0]]["client_names"]
                trust = final_trust(load_history(run_dir), len(client_names))
                plot_trust(
                    trust, client_names, out / "heatmaps" / f"{name}.png", f"{name}, seed {seed}"
                )
    (out / "results.json").write_text(json.dumps(final, indent=2))
    (out / "results.md").write_text(results_table(final, methods) + "\n")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default=str(GRID))
    parser.add_argument("--out", default="runs/trust_weighted")
    parser.add_argument("--cells", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    grid = yaml.safe_load(Path(args.grid).read_text())
    final = run_grid(
        grid,
        Path(args.out),
        cells=args.cells,
        seeds=args.seeds,
        methods=args.methods,
        overrides=args.set,
        progress=not args.no_progress,
    )
    print(results_table(final, list(args.methods or grid["methods"])))
    print(f"\nwrote {Path(args.out) / 'results.md'} and {Path(args.out) / 'heatmaps'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
