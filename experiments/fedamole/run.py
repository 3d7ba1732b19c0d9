"""Runs FedAMoLE's scenario table (or its client-count scaling) and writes it.

For every cell of `grid.yaml` (`scenarios` or `scaling`) and seed, `train_and_evaluate` runs the
methods into `OUT/<cell>/seed<s>/` (`aux/` for the methods of `aux_methods`, which hold
`aux_fraction` of the training data out for RSEA; `plain/` for the others, trained on all of it).
The cell's metric is the clients' mean task score (`task_mean_rouge_l` for Dolly and Natural
Instructions, `task_mean_accuracy` for SNLI), reported × 100 as the paper does:

- `last`: the last round's score; `best`: the best round's (rounds >= 1), as the reference's
  `evaluation.py::summary` (`last=True` / `False`); mean ± std over seeds;
- the relative improvement of `ours` over the `compare` baselines
  (`fedjax_lora.engine.instruction.relative_improvement`), per cell and over all cells.

`OUT/results.md` holds both tables, `OUT/results.json` every number.

    python experiments/fedamole/run.py [--table scenarios|scaling] [--cells C ...] [--seeds S ...]
        [--methods M ...] [--set section.field=value ...] --out runs/fedamole
    python experiments/fedamole/run.py --smoke --out /tmp/fedamole_smoke

`--smoke`: a tiny random base reading bytes, synthetic Dolly- and SNLI-shaped data written under
`OUT/data/`, three clients, one round of two steps (checks the pipeline, not the paper).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedjax_lora import config as config_lib
from fedjax_lora.engine.instruction import relative_improvement
from fedjax_lora.experiment import train_and_evaluate
from fedjax_lora.grid import cell_config as grid_cell_config
from fedjax_lora.report import load_history

GRID = Path(__file__).with_name("grid.yaml")
METRICS = ("task_mean_rouge_l", "task_mean_accuracy")


def cell_config(
    grid: dict, cell: dict, seed: int, methods: list[str], overrides: list[str], aux: bool
) -> config_lib.ExperimentConfig:
    """The base config, then the cell's `set`, the command-line overrides, methods, seed and the
    auxiliary split (`aux_fraction` for RSEA methods, 0 otherwise)."""
    config = grid_cell_config(grid, cell, seed, methods, overrides)
    fraction = float(grid.get("aux_fraction", 0.05)) if aux else 0.0
    return config_lib.merge_base(config, {"data": {"aux_fraction": fraction}})


def task_scores(records: list[dict[str, Any]]) -> tuple[float, float]:
    """`(last, best)` of the clients' mean task score × 100 over rounds >= 1."""
    key = next((k for k in METRICS if k in records[-1]), None)
    if key is None:
        raise ValueError("the run has no task metric; set eval.generation in the config")
    values = [100.0 * r[key] for r in records if r["round"] >= 1]
    return values[-1], max(values)


def run_table(
    grid: dict,
    out: Path,
    *,
    table: str = "scenarios",
    cells: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    overrides: list[str] = (),
    progress: bool = True,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Runs the selected cells and seeds; returns `{cell: {method: {"last": [...], "best":
    [...]}}}` (one value per seed) and writes `results.md` and `results.json` under `out`."""
    by_name = {c["name"]: c for c in grid[table]}
    unknown = sorted(set(cells or []) - set(by_name))
    if unknown:
        raise ValueError(f"unknown cells {unknown}; the {table} table has {sorted(by_name)}")
    prefix = "scaling_" if table == "scaling" else ""
    methods = list(methods or grid.get(f"{prefix}methods", grid["methods"]))
    seeds = list(seeds or grid.get(f"{prefix}seeds", grid["seeds"]))
    aux_methods = set(grid.get("aux_methods", ()))
    groups = {
        "aux": [m for m in methods if m in aux_methods],
        "plain": [m for m in methods if m not in aux_methods],
    }
    scores: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name in cells or list(by_name):
        scores[name] = {m: {"last": [], "best": []} for m in methods}
        for seed in seeds:
            for group, members in groups.items():
                if not members:
                    continue
                config = cell_config(
                    grid, by_name[name], seed, members, list(overrides), group == "aux"
                )
                run_dir = out / name / f"seed{seed}" / group
                train_and_evaluate(config, run_dir, progress=progress)
                for method, records in load_history(run_dir).items():
                    last, best = task_scores(records)
                    scores[name][method]["last"].append(last)
                    scores[name][method]["best"].append(best)
    out.mkdir(parents=True, exist_ok=True)
    gains = {
        which: gain_summary(scores, grid.get("ours"), grid.get("compare", []), which)
        for which in ("last", "best")
    }
    (out / "results.json").write_text(json.dumps({"scores": scores, "gains": gains}, indent=2))
    (out / "results.md").write_text(results_markdown(scores, methods, gains) + "\n")
    return scores


def gain_summary(
    scores: dict, ours: str | None, compare: list[str], which: str
) -> dict[str, Any] | None:
    """The relative improvement of `ours` over the `compare` baselines present in every cell
    (seed means of the `which` score), or None when either side is missing."""
    cells = list(scores)
    present = [m for m in compare if all(m in scores[c] for c in cells)]
    if ours is None or not present or not all(ours in scores[c] for c in cells):
        return None
    mean = lambda c, m: float(np.mean(scores[c][m][which]))
    return relative_improvement(
        {c: mean(c, ours) for c in cells}, {m: {c: mean(c, m) for c in cells} for m in present}
    )


def results_markdown(scores: dict, methods: list[str], gains: dict[str, Any]) -> str:
    """Cells × methods, `mean ± std (n)` of the last- and best-round scores, and the gains."""
    parts = []
    for which in ("last", "best"):
        lines = [
            f"### {which} round (task score × 100: ROUGE-L F1 or accuracy)",
            "",
            "| cell | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for cell, per_method in scores.items():
            row = []
            for m in methods:
                v = np.asarray(per_method[m][which])
                row.append(f"{v.mean():.2f} ± {v.std():.2f} ({v.size})" if v.size else "-")
            lines.append(f"| {cell} | " + " | ".join(row) + " |")
        gain = gains.get(which)
        if gain is not None:
            per = ", ".join(f"{c} {g:+.2f} %" for c, g in gain["per_scenario"].items())
            lines += [
                "",
                f"Relative improvement over the best baseline: {gain['total']:+.2f} % overall "
                f"(vs {gain['best_baseline']}); per cell: {per}",
            ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def smoke_grid(out: Path) -> dict:
    """A tiny grid on synthetic Dolly- and SNLI-shaped files written under `out/data`."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "bird", "fish"]
    categories = ["open_qa", "summarization", "creative_writing"]
    with (data / "dolly.jsonl").open("w") as f:
        for i in range(90):
            w = rng.choice(words, 3)
            row = {
                "instruction": f"Name a {w[0]} thing.",
                "context": "" if i % 2 else f"The {w[1]} {w[2]}.",
                "response": f"A {w[0]} {w[1]}.",
                "category": categories[i % 3],
            }
            f.write(json.dumps(row) + "\n")
    with (data / "snli.jsonl").open("w") as f:
        for i in range(90):
            w = rng.choice(words, 2)
            row = {"premise": f"A {w[0]} runs.", "hypothesis": f"A {w[1]} runs.", "label": i % 3}
            f.write(json.dumps(row) + "\n")
    small = {"max_new_tokens": 8, "max_examples": 4, "max_prompt_tokens": 56}
    return {
        "seeds": [0],
        "methods": ["fedamole", "fedit-ft"],
        "aux_methods": ["fedamole"],
        "aux_fraction": 0.05,
        "ours": "fedamole",
        "compare": ["fedit-ft"],
        "base": {
            "rounds": 1,
            "model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
            "lora": {"targets": ["c_attn.q", "c_attn.v"], "rank": 4, "alpha": 8.0},
            "training": {"steps": 2, "batch_size": 2, "seq_len": 32},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "eval": {"max_windows": 2, "batch_size": 4, "generation": {"metric": "rouge_l"}},
            # Byte-level prompts are longer than the tiny model's context: stream windows.
            "data": {
                "num_clients": 3,
                "val_fraction": 0.1,
                "test_fraction": 0.1,
                "instruction_packing": "windows",
            },
            "method_options": {
                "fedamole": {
                    "amole": {"targets": ["c_attn.q", "c_attn.v"], "num_experts": 4, "rank": 2},
                    "max_experts": 4,
                }
            },
            "tracking": {"tensorboard": False, "progress": False},
        },
        "scenarios": [
            {
                "name": "dolly",
                "set": {
                    "data": {"source": "dolly", "paths": [str(data / "dolly.jsonl")]},
                    "eval": {"generation": {"metric": "rouge_l", **small}},
                },
            },
            {
                "name": "snli",
                "set": {
                    "data": {"source": "snli", "paths": [str(data / "snli.jsonl")]},
                    "eval": {"generation": {"metric": "choice_accuracy", **small}},
                },
            },
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default=str(GRID))
    parser.add_argument("--table", choices=("scenarios", "scaling"), default="scenarios")
    parser.add_argument("--out", default="runs/fedamole")
    parser.add_argument("--cells", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true", help="tiny offline setting (tests)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.smoke:
        grid, table = smoke_grid(out), "scenarios"
    else:
        grid, table = yaml.safe_load(Path(args.grid).read_text()), args.table
    run_table(
        grid,
        out,
        table=table,
        cells=args.cells,
        seeds=args.seeds,
        methods=args.methods,
        overrides=args.set,
        progress=not args.no_progress,
    )
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
