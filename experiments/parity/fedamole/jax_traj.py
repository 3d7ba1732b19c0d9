"""Trajectory parity, fedjax_lora side: the real `fedamole(problem, dispatch="static")` rounds.

  python jax_traj.py plan [examples|examples2]
                            # -> results/traj_plan[_examples[2]].npz: the batches the engine's epoch
                            #    sampler will draw (predicted with `engine.batches.sample_starts`
                            #    and the clients' `data_key`s), for ref_traj.py to feed the ref.
  python jax_traj.py run [static|rsea|static_examples|static_examples2] [map|vmap]
                            # needs results/ref_traj_<run>.npz: loads the reference's initial
                            #    pool and round-0 assignment into the clients, runs TRAJ["rounds"]
                            #    rounds, writes results/jax_traj_<run>_<strategy>.npz

`static` keeps the round-0 architecture (the reference's --static_arch, "FedAMoLE-R"); `rsea`
recomputes it after every round from the clients' statistics on their aux examples (2 per
client), the assignment read from both sides (`rsea.assign` / `optimize_expert_dispatch`).

Every client's stream is its examples (each exactly `seq` tokens) concatenated plus one pad token,
so with `sampling="epoch"` every window is exactly one example (`[bos] prompt target eos`, the
next example's BOS as a weight-0 last target): the engine's windows equal the reference's
batch-size-`batch` examples. `static_examples` (issue 14 point 6): examples of different lengths
(`common.traj_examples_var`), one right-padded slot each with `LocalTraining(packing="examples")`,
at the reference's default batch size 1 (no padding on its side); `static_examples2`: the same at
batch 2, where the reference's collator pads on the left and counts that padding in its
load-balancing loss (`common.traj_run`). Dropout is off on both sides; Adam eps is the
reference's fp32 1e-8.
"""

from __future__ import annotations

import sys

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax_side import FIXTURE, amole_config, amole_modules, set_module

from fedjax_lora import amole, lora
from fedjax_lora.aggregation import rsea
from fedjax_lora.algorithms import Problem
from fedjax_lora.algorithms.fedamole import FedAMoLEOptions, fedamole
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import LocalTraining, OptimizerConfig
from fedjax_lora.engine.batches import sample_starts
from fedjax_lora.engine.strategy import Strategy
from fedjax_lora.models.weights import load_hf

sys.path.insert(0, str(common.HERE.parent))
from results import has_field, has_param  # noqa: E402

T = common.TRAJ


def client_streams(which: str):
    streams, masks = [], []
    for c in range(T["num_clients"]):
        if which == "examples":  # one slot of T + 1 tokens per example, right-padded (EOS, mask 0)
            slots = np.full((T["examples"], T["seq"] + 1), 1, np.int64)
            slot_masks = np.zeros(slots.shape, np.int64)
            for i, (ids, mask) in enumerate(common.traj_examples_var(c)):
                slots[i, : len(ids)], slot_masks[i, : len(ids)] = ids, mask
            streams.append(slots.ravel())
            masks.append(slot_masks.ravel())
            continue
        ids, mask = common.traj_examples(c) if which == "train" else common.traj_aux(c)
        streams.append(np.concatenate([ids.ravel(), [2]]))  # + one pad token
        masks.append(np.concatenate([mask.ravel(), [0]]))
    return stack_streams(streams, masks)


def examples_packing() -> bool:
    """Whether this fedjax_lora has one-example-per-row training (issue 14 point 6)."""
    return has_field(LocalTraining, "packing") and has_param(sample_starts, "examples")


def response_only_eval() -> bool:
    """Whether this fedjax_lora's evaluation windows carry the target mask (issue 14 point 8)."""
    return has_param(eval_windows, "masked")


def build(strategy="map", dispatch="static", examples=False, batch=T["batch"]):
    model = load_hf(FIXTURE)
    amole.add_amole(model, amole_config(T["num_experts"]))
    train = client_streams("examples" if examples else "train")
    # val: example 0, its response tokens counted (experiment.build_problem's val/test sets)
    kw = {"masked": True} if response_only_eval() else {}
    if examples:
        kw["stride"] = T["seq"] + 1
    sets = {"val": eval_windows(train, T["seq"], 1, **kw)}
    if dispatch == "rsea":
        sets["aux"] = eval_windows(client_streams("aux"), T["seq"], T["aux_examples"])
    packing = {"packing": "examples"} if examples else {}
    problem = Problem.create(
        model,
        train,
        sets,
        training=LocalTraining(
            steps=T["steps"],
            batch_size=batch,
            seq_len=T["seq"],
            sampling="epoch",
            dropout=False,
            **packing,
        ),
        optimizer=OptimizerConfig(name="adam", lr=T["lr"], b1=0.9, b2=0.999, eps=T["eps"]),
        strategy=Strategy(strategy),
        eval_batch_size=1,
    )
    options = FedAMoLEOptions(
        clients_per_expert=T["k"],
        min_experts=T["lo"],
        max_experts=T["hi"],
        round_decay=T["lr_decay"],
    )
    return problem, fedamole(problem, options, dispatch=dispatch)


def predict_order(problem, sim, examples=False) -> np.ndarray:
    """`int [C, rounds * steps, batch]`: example index of every window the sampler draws."""
    seq, b = T["seq"], problem.training.batch_size
    kw = {"examples": True} if examples else {}
    max_windows = problem.train.max_windows(seq)
    out = np.zeros((T["num_clients"], T["rounds"] * T["steps"], b), np.int64)
    for c in range(T["num_clients"]):
        counter = int(sim.clients.windows_seen[c])
        for s in range(T["rounds"] * T["steps"]):
            starts = sample_starts(
                sim.clients.data_key[c],
                problem.train.lengths[c],
                jnp.asarray(counter),
                batch_size=b,
                seq_len=seq,
                max_windows=max_windows,
                sampling="epoch",
                **kw,
            )
            out[c, s] = np.asarray(starts) // (seq + 1 if examples else seq)
            counter += b
    return out


def inject(sim, problem, ref):
    """The reference's initial pool (all clients) and round-0 assignment into the SimState."""
    graphdef = problem.graphdef
    row = jax.tree.map(lambda a: a[0], sim.clients.params)
    model = nnx.merge(graphdef, row, problem.base)
    for name, m in amole_modules(model).items():
        pool = {k: ref[f"init|{name}|{k}"] for k in ("A", "B", "W", "sA", "sB")}
        set_module(m, pool, np.ones(T["num_experts"], bool))
    _, params, _ = lora.split(model)
    n = T["num_clients"]
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), params)
    masks = sim.clients.frozen
    flat = []
    for p, v in nnx.to_flat_state(masks):
        name = amole.module_path(p[:-1]).removesuffix(".lora")
        flat.append((p, v.replace(jnp.asarray(ref[f"init|{name}|X"][: T["num_experts"]].T, bool))))
    # (The optimizer state needs no change: every round re-creates it, as the reference does.)
    clients = sim.clients._replace(params=stacked, aux={"masks": nnx.from_flat_state(flat)})
    return sim._replace(clients=clients)


def pool_of(problem, params) -> dict:
    model = nnx.merge(problem.graphdef, jax.tree.map(lambda a: a[0], params), problem.base)
    t = lambda a: np.swapaxes(np.asarray(a), -1, -2)
    out = {}
    for name, m in amole_modules(model).items():
        out.update(
            {
                f"{name}|A": t(m.experts_a[...]),
                f"{name}|B": t(m.experts_b[...]),
                f"{name}|W": t(m.token_proj[...]),
                f"{name}|sA": t(m.shared.a[...]),
                f"{name}|sB": t(m.shared.b[...]),
            }
        )
    return out


def assignment(sim) -> dict:
    """`{module: bool [E + 1, C]}` (the reference's `expert_dispatch` layout, shared row last)."""
    out = {}
    for path, held in amole.by_module(sim.clients.frozen).items():
        x = np.ones((T["num_experts"] + 1, T["num_clients"]), bool)
        x[: T["num_experts"]] = np.asarray(held).T
        out[path.removesuffix(".lora")] = x
    return out


def main(mode: str, run: str = "static", strategy: str = "map"):
    """`plan [examples|examples2]` or `run static|rsea|static_examples[2] map|vmap`."""
    jax.config.update("jax_default_matmul_precision", "highest")
    if mode == "plan":
        dispatch, examples, batch, name = common.traj_run(
            "static" if run == "static" else f"static_{run}"
        )
        examples = examples == "var"
        if examples and not examples_packing():
            common.save_npz(name, missing=np.array(1))
            print("no LocalTraining(packing='examples') here: examples trajectory skipped")
            return
        problem, algo = build(dispatch=dispatch, examples=examples, batch=batch)
        sim = algo.init(jax.random.key(T["jax_seed"]))
        common.save_npz(name, order=predict_order(problem, sim, examples))
        return
    dispatch, examples, batch, _ = common.traj_run(run)
    examples = examples == "var"
    ref_file = common.results() / f"ref_traj_{run}.npz"
    if not ref_file.exists():
        print(f"no {ref_file.name}: skipped")
        return
    problem, algo = build(strategy, dispatch, examples, batch)
    sim = algo.init(jax.random.key(T["jax_seed"]))
    order = predict_order(problem, sim, examples)
    ref = common.load_npz(ref_file.name)
    sim = inject(sim, problem, ref)
    res = {"order": order, "response_only_eval": np.array(response_only_eval())}
    res.update({f"init|{k}": v for k, v in pool_of(problem, sim.clients.params).items()})
    res.update({f"init|{n}|X": x for n, x in assignment(sim).items()})
    # The engine's window evaluation of the same example 0 (the val set's one window).
    res["eval_loss_init"] = np.asarray(algo.evaluate(sim)["val"]["loss"])
    scores = []
    original = rsea.assign

    def recording(P, *args):
        scores.append(np.asarray(P))
        return original(P, *args)

    rsea.assign = recording
    ce, loss = [], []
    try:
        for r in range(T["rounds"]):
            scores.clear()
            sim, metrics = algo.round(sim)
            ce.append(np.asarray(metrics["train"]["train_ce"]))
            loss.append(np.asarray(metrics["train"]["train_loss"]))
            res.update(
                {f"agg{r + 1}|{k}": v for k, v in pool_of(problem, sim.clients.params).items()}
            )
            if dispatch == "rsea" and r + 1 < T["rounds"]:
                res.update({f"dispatch{r + 1}|{n}|X": x for n, x in assignment(sim).items()})
                names = sorted(amole.by_module(sim.clients.frozen))
                res.update(
                    {
                        f"dispatch{r + 1}|{n.removesuffix('.lora')}|P": p
                        for n, p in zip(names, scores, strict=True)
                    }
                )
    finally:
        rsea.assign = original
    res["ce"] = np.stack(ce, 1)  # [C, rounds, steps]
    res["loss"] = np.stack(loss, 1)
    common.save_npz(f"jax_traj_{run}_{strategy}.npz", **res)
    print(f"jax trajectory ({run}, {strategy}): CE", np.round(res["ce"], 5).tolist())


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["run"]))
