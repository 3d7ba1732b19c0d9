"""Runs the trust-weighted paper's grid and writes the results table and trust heatmaps.

For every cell (dataset x heterogeneity) and seed of `grid.yaml`, `train_and_evaluate` runs all
methods into `OUT/<cell>/seed<s>/` (metrics.jsonl with every round's trust matrix, summary.json,
plots). Then `OUT/results.md` holds the mean ± std over seeds of the final mean client validation
perplexity per cell and method, and `OUT/heatmaps/<cell>.png` the final trust matrices of every
method (first seed). The runner is `fedjax_lora.grid`; this is
`fedjax-lora grid experiments/trust_weighted/grid.yaml`.

    python experiments/trust_weighted/run.py [--grid grid.yaml] [--cells C ...] [--seeds S ...]
        [--methods M ...] [--set section.field=value ...] --out runs/trust_weighted
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedjax_lora import grid

GRID = Path(__file__).with_name("grid.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default=str(GRID))
    grid.add_arguments(parser, default_out="runs/trust_weighted")
    args = parser.parse_args(argv)
    return grid.main(args.grid, args)


if __name__ == "__main__":
    sys.exit(main())
