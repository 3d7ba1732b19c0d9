"""Speed worker, fedjax_lora side (driven by speed.py; one JSON line per round).

  python speed_jax.py map|vmap

One round is `fedamole(problem).round(sim)`: per-round Adam reset, `steps` local steps of
`batch` windows of `seq` tokens for every client (strategy `map` = lax.map over clients, or
`vmap`), evaluation of the local models on the (one-window) val set and the aux set, RSEA
statistics on the aux set, holder-averaged aggregation, and the host-side assignment (HiGHS) of
every module. Same tiny Llama, pool, batch, steps and data as speed_ref.py; float32, LoRA
dropout 0.05.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import common
import jax
import numpy as np

from fedjax_lora import amole
from fedjax_lora.algorithms import Problem
from fedjax_lora.algorithms.fedamole import FedAMoLEOptions, fedamole
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import LocalTraining, OptimizerConfig
from fedjax_lora.engine.strategy import Strategy
from fedjax_lora.models.weights import load_hf

S = common.SPEED


def stream(rows):
    ids = np.concatenate([r["input_ids"] for r in rows] + [[2]])
    mask = np.concatenate([np.asarray(r["labels"]) != -100 for r in rows] + [[False]])
    return ids, mask.astype(np.uint8)


def build(strategy: str):
    model = load_hf(common.fixtures() / "tiny_speed")
    amole.add_amole(
        model,
        amole.AMoLEConfig(
            targets=("q_proj", "v_proj"),
            num_experts=S["num_experts"],
            rank=common.RANK,
            alpha=common.ALPHA,
            dropout=0.05,
            top_k=common.TOP_K,
            load_balance=common.LB_COEF,
        ),
    )
    train, aux = zip(*(common.speed_examples(c) for c in range(S["num_clients"])), strict=True)
    train = stack_streams(*zip(*(stream(rows) for rows in train), strict=True))
    aux = stack_streams(*zip(*(stream(rows) for rows in aux), strict=True))
    problem = Problem.create(
        model,
        train,
        {
            "val": eval_windows(train, S["seq"], 1),
            "aux": eval_windows(aux, S["seq"], S["aux_examples"]),
        },
        training=LocalTraining(steps=S["steps"], batch_size=S["batch"], seq_len=S["seq"]),
        optimizer=OptimizerConfig(name="adam", lr=5e-5, b1=0.9, b2=0.999, eps=1e-8),
        strategy=Strategy(strategy),
        eval_batch_size=1,
    )
    options = FedAMoLEOptions(clients_per_expert=S["k"], min_experts=S["lo"], max_experts=S["hi"])
    return fedamole(problem, options)


def main(strategy: str):
    algo = build(strategy)
    sim = algo.init(jax.random.key(0))
    jax.block_until_ready(sim)
    print(json.dumps({"ready": True, "devices": str(jax.devices())}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        sim, metrics = algo.round(sim)
        jax.block_until_ready((sim, metrics))
        sec = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": sec, "peak_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "map")
