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
- `overlaps`: levels of the synthetic corpus's heterogeneity change the data (the `Problem`'s
  training streams, evaluation windows, reference set and mixtures). Levels whose data have
  equal shapes (the synthetic corpus at any overlap) are one more mapped axis of the same
  program: `jit(vmap over levels (vmap over seeds × lrs (round)))`, the levels' data stacked
  and passed to the round as arguments (the method's factory traced with them). A method that
  reads its data on the host (`Capabilities.data_axis` false, e.g. `centralized`'s pooled
  stream), or levels of different shapes, run one program per level; `sweep.json`'s `programs`
  says how many each method compiled. A method whose round has a host step
  (`Capabilities.sweeps` false: FedAMoLE with RSEA) is refused (`NotVectorizable`). Every
  method is built once (`prepare`), all of them before the first one runs, so a refusal comes
  before any compute.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lora.config import ExperimentConfig, merge_base
from fedjax_lora.engine.optim import OptimizerConfig
from fedjax_lora.typing import PyTree


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


class NotVectorizable(ValueError):
    """A method whose factory or round needs concrete values (host-side steps) and so cannot
    take its data, or its simulation, as one more mapped axis."""


def check_sweepable(algo) -> None:
    """Refuses (`NotVectorizable`) a method that does not declare vectorized sweeps
    (`Capabilities.sweeps`: its round has a host step, e.g. FedAMoLE's assignment LP), naming the
    alternative."""
    if not algo.method.capabilities.sweeps:
        raise NotVectorizable(
            f"method {algo.name!r} runs a host-side step in its round and cannot be vectorized "
            "over simulations; run it with `fedjax-lora grid` or `run` per seed"
        )


def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _member(tree: PyTree, level: int, s: int) -> PyTree:
    return jax.tree.map(lambda x: x[level, s], tree)


def _level_data(problem) -> dict[str, Any]:
    """What a heterogeneity level changes in a `Problem`: its data, as arrays."""
    return {"train": problem.train, "eval_sets": problem.eval_sets, "side": problem.side}


def _shapes(tree: PyTree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(x.dtype)) for x in leaves)


Check = Callable[[int, int, dict, PyTree], None]


@dataclasses.dataclass(frozen=True)
class SweepMethod:
    """One method built for a sweep over heterogeneity levels: `levels` (the problems with the
    sweep's optimizer, `sweep_optimizer`), `algos` (the method built on each) and `factory`
    (the method's `Problem -> Algorithm`, traced again on the stacked data when `data_axis`).
    `data_axis`: the levels run as one vmapped axis of one program (their data have equal
    shapes and the method does not read its data on the host)."""

    name: str
    factory: Callable
    levels: list
    algos: list
    data_axis: bool


def prepare(name: str, problems: list, config: ExperimentConfig) -> SweepMethod:
    """Builds `name` on every problem for a sweep, refusing before any compute
    (`NotVectorizable`) a `sharded` strategy, an optimizer that is not an `OptimizerConfig` and a
    method without vectorized sweeps (`check_sweepable`)."""
    from fedjax_lora.experiment.problem import method_factory

    if problems[0].strategy.kind == "sharded":
        raise NotVectorizable(
            "a sweep maps simulations with vmap and cannot nest the 'sharded' strategy; set "
            "strategy.kind to map, chunked or vmap"
        )
    if not isinstance(problems[0].optimizer, OptimizerConfig):
        raise NotVectorizable(
            "a sweep needs the optimizer as an OptimizerConfig (config.optimizer)"
        )
    optimizer = sweep_optimizer(problems[0].optimizer)
    levels = [dataclasses.replace(p, optimizer=optimizer) for p in problems]
    factory = method_factory(name, config)
    algos = [factory(p) for p in levels]
    check_sweepable(algos[0])
    equal = len({_shapes(_level_data(p)) for p in problems}) == 1
    data_axis = equal and algos[0].method.capabilities.data_axis
    return SweepMethod(name, factory, levels, algos, data_axis)


def run_members(
    name: str,
    problems: list,
    config: ExperimentConfig,
    seeds: list[int],
    lrs: list[float],
    check: Check | None = None,
) -> list[dict[str, Any]]:
    """One method on every problem (heterogeneity level) for every `(seed, lr)`; per member
    `{"level", "program", "seed", "lr", "records", "diverged", "state"}` (level-major, then
    seed, then lr) with `experiment._round_record` records and the final `SimState`.
    `check(member, round, metrics, params)`, if given, sees every member's scored metrics and
    adapters after every round (and may stop the sweep by raising).

    The levels' data (and the base) are arguments of the compiled round, so the levels run as
    one vmapped axis of one program when their data have equal shapes, and problems of equal
    shapes share compiled programs; a method whose factory needs its data on the host runs one
    program per level with its data as constants (`program`: the member's program)."""
    return _run(prepare(name, problems, config), config, seeds, lrs, check)


def _run(
    method: SweepMethod,
    config: ExperimentConfig,
    seeds: list[int],
    lrs: list[float],
    check: Check | None = None,
) -> list[dict[str, Any]]:
    """`run_members` of a prepared method."""
    every = list(range(len(method.levels)))
    if method.data_axis:
        return _run_members(method, every, config, seeds, lrs, check)
    members = []
    for level in every:
        offset = level * len(seeds) * len(lrs)
        shifted = None if check is None else lambda i, *a, o=offset: check(i + o, *a)
        for m in _run_members(method, [level], config, seeds, lrs, shifted):
            members.append({**m, "level": level, "program": level})
    return members


def _run_members(
    method: SweepMethod,
    run_levels: list[int],
    config: ExperimentConfig,
    seeds: list[int],
    lrs: list[float],
    check: Check | None,
) -> list[dict[str, Any]]:
    """`run_members` over the levels `run_levels` of `method` as one program:
    `jit(vmap over levels (vmap over seeds × lrs (round)))`; with `method.data_axis` the levels'
    data and the base are arguments of the round, otherwise there is one level and its data are
    constants of the program."""
    from fedjax_lora.experiment.records import _round_record, round_costs, scored
    from fedjax_lora.experiment.run import _finite_per_client

    name, factory, data_axis = method.name, method.factory, method.data_axis
    levels = [method.levels[level] for level in run_levels]
    algos = [method.algos[level] for level in run_levels]
    grid = list(itertools.product(seeds, lrs))
    sims, costs = [], []
    for algo, level in zip(algos, levels, strict=True):
        row = []
        for seed, lr in grid:
            sim = algo.init(jax.random.key(seed))
            opt_state = with_learning_rate(sim.clients.opt_state, lr)
            row.append(sim._replace(clients=sim.clients._replace(opt_state=opt_state)))
        costs.append(round_costs(algo, level, row[0]))
        sims.append(_stack(row))
    sims = _stack(sims)
    if data_axis:
        data, base = _stack([_level_data(p) for p in levels]), levels[0].base
        on = lambda d, b: factory(dataclasses.replace(levels[0], base=b, **d))
    else:
        data, base, on = None, None, lambda d, b: algos[0]

    def sweep_round(sim, d, b):
        return on(d, b).round(sim)

    def sweep_evaluate(sim, d, b):
        return on(d, b).evaluate(sim)

    mapped = lambda f: jax.jit(jax.vmap(jax.vmap(f, in_axes=(0, None, None)), in_axes=(0, 0, None)))
    vround, vevaluate = mapped(sweep_round), mapped(sweep_evaluate)
    finite = jax.jit(jax.vmap(jax.vmap(_finite_per_client)))

    members = [
        {"level": level, "program": 0, "seed": s, "lr": lr, "records": [], "diverged": False}
        for level in range(len(levels))
        for s, lr in grid
    ]
    index = [(level, s) for level in range(len(levels)) for s in range(len(grid))]

    def record(r: int, metrics: dict, seconds: float, params_ok=None) -> None:
        for i, (m, (level, s)) in enumerate(zip(members, index, strict=True)):
            one = scored(_member(metrics, level, s), levels[level])
            rec = _round_record(name, r, one, seconds)
            previous = m["records"][-1] if m["records"] else None
            m["records"].append({**rec, **costs[level](rec, previous)})
            if params_ok is not None and check is not None:
                check(i, r, one, _member(sims.clients.params, level, s))
            if params_ok is not None:
                loss_ok = np.all(np.isfinite(np.asarray(one["train"]["train_loss"])))
                m["diverged"] |= not (loss_ok and bool(np.all(params_ok[level, s])))

    record(0, jax.device_get(vevaluate(sims, data, base)), 0.0)
    for r in range(1, config.rounds + 1):
        start = time.perf_counter()
        sims, metrics = vround(sims, data, base)
        metrics = jax.device_get(metrics)
        params_ok = np.asarray(finite(sims.clients.params))
        record(r, metrics, time.perf_counter() - start, params_ok)
    for m, (level, s) in zip(members, index, strict=True):
        m["state"] = _member(sims, level, s)
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
    from fedjax_lora.experiment.problem import build_problem

    spec = config.sweep
    spec.check_seeds()
    seeds = list(spec.seeds)
    lrs = list(spec.lrs or (config.optimizer.lr,))
    overlaps = list(spec.overlaps or (config.data.overlap,))
    if spec.overlaps and config.data.source != "synthetic":
        raise ValueError("sweep.overlaps varies the synthetic corpus; set data.source: synthetic")
    problems = []
    for overlap in overlaps:
        problem, _ = build_problem(merge_base(config, {"data": {"overlap": overlap}}))
        problems.append(problem)
    # Every method is built (and refused) before any of them runs.
    methods = [prepare(name, problems, config) for name in config.methods]
    members, compiled = [], []
    for name, method in zip(config.methods, methods, strict=True):
        start = time.perf_counter()
        run = _run(method, config, seeds, lrs)
        programs = len({m.pop("program") for m in run})
        for m in run:
            m.pop("state")
            members.append({"method": name, "overlap": overlaps[m.pop("level")], **m})
        seconds = time.perf_counter() - start
        compiled.append({"method": name, "programs": programs, "seconds": seconds})
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
