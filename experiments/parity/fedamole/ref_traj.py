"""Trajectory parity, reference side: the authors' `Server`/`Client` round loop of `main.py`
(static architecture: `--static_arch true`), fed the batches of results/traj_plan.npz.

  python ref_traj.py [static|rsea|static_examples]   # -> results/ref_traj_<run>.npz

`Server.__init__` builds the global pool (PEFT init, torch seed TRAJ["torch_seed"]), and
`dispatch_experts(0)` draws the random round-0 architecture (torch.rand + SCIP); both are saved
for jax_traj.py to load. Each round, every client runs `load_model`, `train_experts(r)` (Adam
re-created, lr · decay^(r-1), `client_step` steps over its persistent iterator) and
`release_model`; then `Server.aggregate()` (also after the last round, which main.py skips, so
the final pools can be compared). Per-step CE and load-balancing loss are read with a forward
hook on the model. With `rsea`, after each round but the last every client runs
`compute_embs(r)` on its aux examples before `aggregate` (main.py's order), and the scores and
assignment that `dispatch_experts(r)` passes through `optimize_expert_dispatch` are recorded.
"""

from __future__ import annotations

import copy
import sys

import common
import numpy as np
import peft.tuners.lora as lora
import torch
from ref_side import NullWriter, install, make_args, node, ref_common, ref_preprocess

T = common.TRAJ


def batches_for(client: int, order: np.ndarray, examples: str = "fixed") -> list[dict]:
    """Client `client`'s batches as its DataLoader would yield them: one dict of `[B, L]`
    tensors per step, examples `order[client, step]` (labels -100 outside the target mask),
    put together by the reference's own `CausalLMDataCollator` (which pads on the left)."""
    if examples == "fixed":
        ids, mask = common.traj_examples(client)
        rows = list(zip(ids, mask, strict=True))
    else:
        rows = common.traj_examples_var(client)
    collate = ref_preprocess.CausalLMDataCollator(tokenizer())
    out = []
    for step in order[client]:
        samples = []
        for i in step:
            ids, mask = rows[i]
            labels = np.where(mask == 0, -100, ids)
            samples.append(
                {
                    "input_ids": ids.tolist(),
                    "attention_mask": [1] * len(ids),
                    "labels": labels.tolist(),
                }
            )
        out.append(collate(samples))
    return out


def tokenizer():
    """The fixture tokenizer, as the reference loads it (its pad token pads the batches)."""
    return ref_common.get_tokenizer(make_args(model_name="tiny"))


def pools(experts: dict, token_proj: dict, prefix: str) -> dict:
    """Server-side pool (`Server.experts` lists indexed by expert id, shared last) -> arrays."""
    out = {}
    for name, lst in experts.items():
        e = len(lst) - 1
        a = lambda d, k: d[k].detach().numpy().copy()
        out[f"{prefix}|{name}|A"] = np.stack(
            [a(lst[i], f"lora_A.expert_{i}.weight") for i in range(e)]
        )
        out[f"{prefix}|{name}|B"] = np.stack(
            [a(lst[i], f"lora_B.expert_{i}.weight") for i in range(e)]
        )
        out[f"{prefix}|{name}|sA"] = a(lst[e], "lora_A.expert_shared.weight")
        out[f"{prefix}|{name}|sB"] = a(lst[e], "lora_B.expert_shared.weight")
        out[f"{prefix}|{name}|W"] = a(token_proj[name], "token_proj.weight")
    return out


def main(run: str = "static"):
    """`run`: `static`, `rsea`, or `static_examples` (the examples of `traj_examples_var`)."""
    install()
    dispatch, _, examples = run.partition("_")
    examples = examples or "fixed"
    plan = common.load_npz(f"traj_plan{'' if examples == 'fixed' else '_examples'}.npz")
    if "order" not in plan:  # fedjax_lora without one-example rows: nothing to compare with
        print(f"ref trajectory ({run}): skipped, no plan")
        return
    order = plan["order"]
    args = make_args(
        expert_num=T["num_experts"],
        expert_choices=T["k"],
        max_experts=T["hi"],
        client_num=T["num_clients"],
        static_arch=dispatch == "static",
        lr=T["lr"],
        lr_decay=T["lr_decay"],
        batch_size=T["batch"],
        client_step=T["steps"],
        rounds=T["rounds"],
    )
    assert args.precision == "fp32"  # the reference then uses Adam eps 1e-8 (TRAJ["eps"])
    torch.manual_seed(T["torch_seed"])
    writer = NullWriter()
    server = node.Server(None, writer, args)
    res = pools(server.experts, server.token_proj, "init")
    clients = []
    for c in range(T["num_clients"]):
        loader = batches_for(c, order, examples)  # batches in the engine's order
        ids, _ = common.traj_aux(c)
        aux = [
            {
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.ones(ids.shape, dtype=torch.long),
                "labels": torch.tensor(ids),
            }
        ]  # one batch of aux_examples (min(batch, len(aux)))
        # Example 0 as a batch of one, scored by Client.eval (HF loss: response tokens only).
        evalset = batches_for(c, np.zeros((T["num_clients"], 1, 1), np.int64), examples)
        clients.append(node.Client(c, loader, aux, evalset, [], None, writer, args))
    server.register_clients(clients)
    server.dispatch_experts(0)
    for name, x in server.expert_dispatch.items():
        res[f"init|{name}|X"] = np.asarray(x, bool)
    eval_loss = []
    for client in clients:  # main.py's `client.eval()` of the initial model (test_init)
        client.load_model()
        eval_loss.append(client.eval())
        client.release_model()
    res["eval_loss_init"] = np.array(eval_loss)
    model = server.global_model
    log = []

    def hook(module, inputs, output):
        acc = next(m.new_module.accumulator for m in model.modules() if isinstance(m, lora.Linear))
        log.append((output.loss.item(), acc.load_balance_loss.item() if acc else float("nan")))

    model.register_forward_hook(hook)
    ce = np.zeros((T["num_clients"], T["rounds"], T["steps"]))
    loss = np.zeros_like(ce)
    for r in range(1, T["rounds"] + 1):
        for c, client in enumerate(clients):
            log.clear()
            client.load_model()
            client.train_experts(r)
            client.release_model()
            steps = np.array(log)
            ce[c, r - 1] = steps[:, 0]
            loss[c, r - 1] = steps[:, 0] + args.load_balance_alpha * steps[:, 1]
        if dispatch == "rsea":  # (after the last round too, so that `aggregate` can run)
            for client in clients:
                client.load_model()
                client.compute_embs(r)
                client.release_model()
        server.aggregate()
        res.update(pools(copy.deepcopy(server.experts), server.token_proj, f"agg{r}"))
        if r < T["rounds"]:
            calls = []
            original = node.optimize_expert_dispatch

            def recording(prob_gate, a, calls=calls, original=original):
                calls.append(prob_gate.copy())
                return original(prob_gate, a)

            node.optimize_expert_dispatch = recording
            try:
                server.dispatch_experts(r)  # static: re-sends the same architecture
            finally:
                node.optimize_expert_dispatch = original
            if dispatch == "rsea":
                for name, p in zip(server.lora_modules, calls, strict=True):
                    res[f"dispatch{r}|{name}|P"] = p
                    res[f"dispatch{r}|{name}|X"] = np.asarray(server.expert_dispatch[name], bool)
    res["ce"], res["loss"], res["order"] = ce, loss, order
    common.save_npz(f"ref_traj_{run}.npz", **res)
    print(f"ref trajectory ({run}): CE", np.round(ce, 5).tolist())


if __name__ == "__main__":
    main(*sys.argv[1:])
