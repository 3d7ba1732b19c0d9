"""Runs one of the CoMiGS paper's tables (1, 2 or 4) and writes it (`fedjax_lora.grid`).

    python experiments/comigs/run.py --table 1 [--llama] [--cells C ...] [--seeds S ...]
        [--methods M ...] [--set section.field=value ...] [--out runs/comigs_table1]

`--llama` runs the Llama-3.2-1B variant (spec-comigs §1.6): lr 2e-4, LoRA on q/k/v/o and the
MLP projections, and the MoE methods with the llama-moe gate (tanh MLP, noisy top-k) and the
CV² balance loss summed over layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedjax_lora import grid

HERE = Path(__file__).parent
MOE_METHODS = (
    "comigs",
    "comigs-2g",
    "comigs-2s",
    "comigs-tr",
    "pfedmoe",
    "local-moe",
    "fedavg-moe",
)
LLAMA_MOE = (
    "{gate: tanh_mlp, gate_noise: 0.703, balance_loss: cv2, lb_coef: 0.01, generalist_share: null}"
)
LLAMA = [
    "model.source=meta-llama/Llama-3.2-1B",
    "optimizer.lr=0.0002",
    "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    *(f"method_options.{m}.moe={LLAMA_MOE}" for m in MOE_METHODS),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", choices=("1", "2", "4"), required=True)
    parser.add_argument("--llama", action="store_true", help="the Llama-3.2-1B variant")
    grid.add_arguments(parser, default_out="")
    args = parser.parse_args(argv)
    suffix = "_llama" if args.llama else ""
    args.out = args.out or f"runs/comigs_table{args.table}{suffix}"
    if args.llama:
        args.set = [*LLAMA, *args.set]
    return grid.main(HERE / f"table{args.table}.yaml", args)


if __name__ == "__main__":
    sys.exit(main())
