r"""Vectorized sweeps: `S` independent simulations as one more mapped axis of one compiled round.

`fedjax-lora sweep CONFIG` reads the experiment config's `sweep:` section (`SweepSpec`):

- `seeds` × `lrs`: the `S = |seeds|·|lrs|` simulations of one data set are stacked on a leading
  axis and run by `jit(vmap(round))`: one program, compiled once, every round. A member differs
  in its initial state (clients and cohort key from its seed) and its learning rate, which
  lives in the optimizer state: the clients' optimizer is `chain(tx₁, scale(η))`, `tx₁` the
  configured optimizer and schedule built at peak learning rate 1, `η` a value of the
  optimizer state (`LearningRate`) set per member. Every schedule here is linear in its peak rate
  (`lr(t) = η · shape(t)`), so member `(seed, η)` follows the single run with `seed` and
  `optimizer.lr = η` (equal up to float rounding);
- `overlaps`: levels of the synthetic corpus's heterogeneity change the data (the `Problem`),
  so they run one after another on the host, one compiled program per level.

Results: `sweep.json` (every member's per-round validation and test perplexities and final
metrics) and `sweep.md` (per method, heterogeneity and learning rate: mean ± sample standard
deviation over the seeds of the final mean perplexities and accuracy). A member whose loss or
adapters become non-finite is kept and flagged (`diverged`), not fatal. Sweeps do not checkpoint
and need a strategy other than `sharded`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lora.config import ExperimentConfig, merge_base
from fedjax_lora.engine.optim import OptimizerConfig

PyTree = Any


class LearningRate(NamedTuple):
    """Optimizer state of `scale_by_learning_rate_state`: the simulation's learning rate."""

    lr: jax.Array


def scale_by_learning_rate_state(lr: float) -> optax.GradientTransformation:
    """`updates · η` with `η` kept in the optimizer state (`LearningRate`), so simulations stacked
    on a mapped axis can each carry their own."""

    def init(params):
        del params
        return LearningRate(jnp.asarray(lr, jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.lr, updates), state

    return optax.GradientTransformation(init, update)


def sweep_optimizer(optimizer: OptimizerConfig) -> optax.GradientTransformation:
    """`chain(optimizer at peak learning rate 1, scale by η)`, `η` in the optimizer state."""
    unit = dataclasses.replace(optimizer, lr=1.0).build()
    return optax.chain(unit, scale_by_learning_rate_state(optimizer.lr))


def with_learning_rate(opt_state: PyTree, lr: float) -> PyTree:
    """`opt_state` (of `sweep_optimizer`, possibly inside a method's own chain) with every
    client's `η` set to `lr`."""
    is_lr = lambda node: isinstance(node, LearningRate)
    return jax.tree.map(
        lambda node: LearningRate(jnp.full_like(node.lr, lr)) if is_lr(node) else node,
        opt_state,
        is_leaf=is_lr,
    )


def check_sweepable(algo) -> None:
    """Refuses a method that does not declare vectorized sweeps (`Capabilities.sweeps`: its round
    has a host step, e.g. FedAMoLE's assignment LP), naming the alternative."""
    if not algo.method.capabilities.sweeps:
        raise ValueError(
            f"method {algo.name!r} runs a host-side step in its round and cannot be vectorized "
            "over simulations; run it with `fedjax-lora grid` or `run` per seed"
        )


def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _member(tree: PyTree, s: int) -> PyTree:
    return jax.tree.map(lambda x: x[s], tree)


def run_members(
    name: str, problem, config: ExperimentConfig, seeds: list[int], lrs: list[float]
) -> list[dict[str, Any]]:
    """One method on one problem for every `(seed, lr)` as one vmapped simulation; per member
    `{"seed", "lr", "records", "diverged"}` with `experiment._round_record` records."""
    from fedjax_lora.experiment import _finite_per_client, _round_record, method_factory, scored

    if problem.strategy.kind == "sharded":
        raise ValueError(
            "a sweep maps simulations with vmap and cannot nest the 'sharded' strategy; set "
            "strategy.kind to map, chunked or vmap"
        )
    if not isinstance(problem.optimizer, OptimizerConfig):
        raise ValueError("a sweep needs the optimizer as an OptimizerConfig (config.optimizer)")
    problem = dataclasses.replace(problem, optimizer=sweep_optimizer(problem.optimizer))
    algo = method_factory(name, config)(problem)
    check_sweepable(algo)
    grid = list(itertools.product(seeds, lrs))
    sims = []
    for seed, lr in grid:
        sim = algo.init(jax.random.key(seed))
        clients = sim.clients._replace(opt_state=with_learning_rate(sim.clients.opt_state, lr))
        sims.append(sim._replace(clients=clients))
    sims = _stack(sims)
    vround = jax.jit(jax.vmap(algo.round))
    vevaluate = jax.jit(jax.vmap(algo.evaluate))
    finite = jax.jit(jax.vmap(_finite_per_client))

    members = [{"seed": s, "lr": lr, "records": [], "diverged": False} for s, lr in grid]

    def record(r: int, metrics: dict, seconds: float, params_ok=None) -> None:
        for s, m in enumerate(members):
            one = scored(_member(metrics, s), problem)
            m["records"].append(_round_record(name, r, one, seconds))
            if params_ok is not None:
                loss_ok = np.all(np.isfinite(np.asarray(one["train"]["train_loss"])))
                m["diverged"] |= not (loss_ok and bool(np.all(params_ok[s])))

    record(0, jax.device_get(vevaluate(sims)), 0.0)
    for r in range(1, config.rounds + 1):
        start = time.perf_counter()
        sims, metrics = vround(sims)
        metrics = jax.device_get(metrics)
        params_ok = np.asarray(finite(sims.clients.params))
        record(r, metrics, time.perf_counter() - start, params_ok)
    return members


def _final(member: dict[str, Any]) -> dict[str, float]:
    last = member["records"][-1]
    return {
        k: last[k] for k in ("val_mean_ppl", "test_mean_ppl", "test_mean_accuracy") if k in last
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summary_table(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per `(method, overlap, lr)`: mean and standard deviation over seeds of the final metrics."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for m in members:
        groups.setdefault((m["method"], m["overlap"], m["lr"]), []).append(m)
    rows = []
    for (method, overlap, lr), ms in groups.items():
        row = {"method": method, "overlap": overlap, "lr": lr, "seeds": [m["seed"] for m in ms]}
        for key in _final(ms[0]):
            row[key] = _mean_std([_final(m)[key] for m in ms])
        row["diverged"] = sum(m["diverged"] for m in ms)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """`sweep.md`: mean ± std (over seeds) of the final mean perplexities and accuracy."""
    lines = [
        "| method | overlap | lr | seeds | val ppl | test ppl | test accuracy | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, p: "–" if v is None else f"{v[0]:.{p}f} ± {v[1]:.{p}f}"
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['overlap']:g} | {r['lr']:g} | {len(r['seeds'])} | "
            f"{fmt(r.get('val_mean_ppl'), 3)} | {fmt(r.get('test_mean_ppl'), 3)} | "
            f"{fmt(r.get('test_mean_accuracy'), 4)} | {r['diverged']} |"
        )
    return "\n".join(lines)


def run_sweep(config: ExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs the config's sweep grid for every method; writes `sweep.json` and `sweep.md` under
    `out_dir` and returns the JSON document."""
    from fedjax_lora.experiment import build_problem, method_factory

    spec = config.sweep
    spec.check_seeds()
    seeds = list(spec.seeds)
    lrs = list(spec.lrs or (config.optimizer.lr,))
    overlaps = list(spec.overlaps or (config.data.overlap,))
    if spec.overlaps and config.data.source != "synthetic":
        raise ValueError("sweep.overlaps varies the synthetic corpus; set data.source: synthetic")
    members, compiled = [], []
    for overlap in overlaps:
        level = merge_base(config, {"data": {"overlap": overlap}})
        problem, _ = build_problem(level)
        if overlap == overlaps[0]:  # every method checked before any runs
            for name in config.methods:
                check_sweepable(method_factory(name, level)(problem))
        for name in config.methods:
            start = time.perf_counter()
            for m in run_members(name, problem, level, seeds, lrs):
                members.append({"method": name, "overlap": overlap, **m})
            compiled.append(
                {"method": name, "overlap": overlap, "seconds": time.perf_counter() - start}
            )
    rows = summary_table(members)
    doc = {
        "grid": {"seeds": seeds, "lrs": lrs, "overlaps": overlaps, "methods": list(config.methods)},
        "programs": compiled,
        "table": rows,
        "members": [{**m, "final": _final(m)} for m in members],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=2))
    (out / "sweep.md").write_text(markdown(rows) + "\n")
    return doc
