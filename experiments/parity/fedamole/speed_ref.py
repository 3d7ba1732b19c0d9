"""Speed worker, reference side (driven by speed.py over stdin/stdout; one JSON line per round).

One round is main.py's loop body for 0 < r < R without the eval/test passes: every client
`load_model` + `train_experts(r)` (`client_step` Adam steps on batches from its shuffled
`DataLoader` with the reference's collator) + `release_model`; then every client
`compute_embs` on its aux loader; `Server.aggregate()`; `Server.dispatch_experts(r)` (RSEA with
SCIP). float32 on the CPU, LoRA dropout 0.05 as in the reference's default.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import common
import torch
from ref_side import NullWriter, install, make_args, node, ref_preprocess
from torch.utils.data import DataLoader

S = common.SPEED


class PadOnly:
    pad_token_id = 2


def main():
    torch.set_num_threads(int(os.environ.get("SPEED_THREADS", "1")))
    install(common.fixtures() / "tiny_speed")
    args = make_args(
        expert_num=S["num_experts"],
        expert_choices=S["k"],
        max_experts=S["hi"],
        client_num=S["num_clients"],
        batch_size=S["batch"],
        client_step=S["steps"],
        lora_dropout=0.05,
        lr=5e-5,
    )
    torch.manual_seed(0)
    writer = NullWriter()
    server = node.Server(None, writer, args)
    collate = ref_preprocess.CausalLMDataCollator(PadOnly())
    clients = []
    for c in range(S["num_clients"]):
        train, aux = common.speed_examples(c)
        train_loader = DataLoader(train, S["batch"], shuffle=True, collate_fn=collate)
        aux_loader = DataLoader(aux, min(S["batch"], len(aux)), shuffle=False, collate_fn=collate)
        clients.append(node.Client(c, train_loader, aux_loader, [], [], None, writer, args))
    server.register_clients(clients)
    server.dispatch_experts(0)
    r = 0

    def one_round():
        nonlocal r
        r += 1
        for client in clients:
            client.load_model()
            client.train_experts(r)
            client.release_model()
        for client in clients:
            client.load_model()
            client.compute_embs(r)
            client.release_model()
        server.aggregate()
        server.dispatch_experts(r)

    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        one_round()
        sec = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": sec, "peak_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main()
