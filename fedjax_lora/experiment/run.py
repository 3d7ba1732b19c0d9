"""`train_and_evaluate`: build the problem from an `ExperimentConfig`, run every method
(`run_method`: rounds, checkpoints, divergence checks), write `metrics.jsonl`, `summary.json` and
the plots (`fedjax_lora.experiment.records`); `train_and_evaluate_seeds`: one experiment at several
seeds; `resumable`: what `--resume` may continue."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.algorithms import Algorithm, Problem, SimState
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.config import RESUMABLE, ExperimentConfig, resume_differences, to_dict
from fedjax_lora.distributed import host
from fedjax_lora.engine.state import client_model_state
from fedjax_lora.errors import CheckpointError, ConfigError, DivergenceError
from fedjax_lora.experiment.problem import build_problem, method_factory
from fedjax_lora.experiment.records import (
    _round_record,
    final_analyses,
    round_costs,
    scored,
    write_results,
)
from fedjax_lora.export import ADAPTERS_DIR, save_run_adapters
from fedjax_lora.tracking import (
    evaluation_progress,
    interactive,
    open_trackers,
    progress_bar,
    require_wandb,
)


@jax.jit
def _finite_per_client(params) -> jax.Array:
    """`bool [N]`: every adapter value of client i is finite."""
    per_leaf = [jnp.isfinite(x).reshape(x.shape[0], -1).all(1) for x in jax.tree.leaves(params)]
    return jnp.stack(per_leaf).all(0)


# Divergence to a finite collapse (issue 15): a model whose logits became constant predicts the
# uniform distribution, loss exactly ln V on every window; one that is worse than uniform by a
# factor of 2 in log-loss (perplexity above V²) has left any reasonable optimum.
COLLAPSE_TOLERANCE = 1e-4  # nats from ln V, on both the last training step and validation
DIVERGENCE_FACTOR = 2.0  # a training loss above DIVERGENCE_FACTOR · ln V


def diverged_clients(
    train_loss: np.ndarray, val_loss: np.ndarray | None, trained: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(collapsed, exploded)`: client indices whose predictions collapsed to uniform (the last
    training step's loss and the validation loss both within `COLLAPSE_TOLERANCE` of `ln V`) and
    those with a training loss above `DIVERGENCE_FACTOR · ln V`. `train_loss [K, steps]` of the
    clients `trained [K]`, `val_loss [N]` (None: no validation loss)."""
    uniform = np.log(vocab_size)
    exploded = trained[np.any(train_loss > DIVERGENCE_FACTOR * uniform, axis=-1)]
    if val_loss is None:
        return np.zeros(0, int), exploded
    flat = np.abs(train_loss[:, -1] - uniform) < COLLAPSE_TOLERANCE
    flat &= np.abs(np.asarray(val_loss)[trained] - uniform) < COLLAPSE_TOLERANCE
    return trained[flat], exploded


def _finite_or_raise(
    method: str, round_idx: int, metrics: dict, params, names, vocab_size: int
) -> None:
    """Stops the run (before anything of this round is checkpointed) when training diverged:
    a non-finite training loss or adapter value, predictions collapsed to uniform, or a loss far
    above the uniform prediction's (`diverged_clients`), naming the method, the clients and the
    round. The config's values and the base's weights were checked before training, so the
    cause is the optimization."""
    loss = np.asarray(metrics["train"]["train_loss"])
    finite = np.array(host(_finite_per_client(params)))
    trained = np.asarray(metrics["train"].get("cohort", np.arange(finite.size)))  # rows of `loss`
    finite[trained] &= np.all(np.isfinite(loss), axis=-1)
    who = lambda idx: [names[i] if names else int(i) for i in idx]
    fix = (
        "lower optimizer.lr (or set optimizer.grad_clip); the last good checkpoint, if any, is kept"
    )
    bad = np.flatnonzero(~finite)
    if bad.size:
        raise DivergenceError(
            f"method {method!r}: non-finite training loss or parameters for client(s) {who(bad)} "
            f"in round {round_idx}: training diverged; {fix}"
        )
    val = metrics.get("val", {}).get("loss")
    collapsed, exploded = diverged_clients(loss, val, trained, vocab_size)
    if collapsed.size:
        raise DivergenceError(
            f"method {method!r}: training diverged for client(s) {who(collapsed)} in round "
            f"{round_idx}: predictions collapsed to uniform (loss = ln V = "
            f"{np.log(vocab_size):.4f}, perplexity = the vocabulary size {vocab_size}); {fix}"
        )
    if exploded.size:
        raise DivergenceError(
            f"method {method!r}: training diverged for client(s) {who(exploded)} in round "
            f"{round_idx}: training loss above {DIVERGENCE_FACTOR:g} · ln V = "
            f"{DIVERGENCE_FACTOR * np.log(vocab_size):.4f} (worse than uniform predictions); {fix}"
        )


def run_method(
    name: str,
    problem: Problem,
    config: ExperimentConfig,
    log,
    *,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    algorithm: Algorithm | None = None,
    adapters_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Runs one method for `config.rounds` rounds; returns and logs one record per round (round 0
    is the evaluation before training, `_round_record`). The last record holds the method's final
    analyses (`final_analyses`: FedAMoLE's `experts`, the CoMiGS family's `routing`).

    With `config.checkpoint.every > 0` the whole state and the records are saved to
    `checkpoint_dir` every that many rounds and after the last; `resume` continues from the newest
    readable checkpoint there, so the final state and metrics equal an uninterrupted run's.
    `algorithm`: the method already built from `problem` (else it is built here).
    `adapters_path`: where the final stacked adapters go (`export.save_run_adapters`; what
    `fedjax-lora export` reads).
    """
    algo = algorithm or method_factory(name, config)(problem)
    sim = algo.init(jax.random.key(config.seed))
    vocab = nnx.merge(problem.graphdef, problem.template, problem.base).config.vocab_size
    every = config.checkpoint.every
    saving = every or resume
    ckpt = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep) if saving else None
    restored = ckpt.restore_latest(sim) if ckpt and resume else None
    if resume and restored is None and ckpt.steps():
        raise CheckpointError(
            f"--resume: every checkpoint of method {name!r} in {checkpoint_dir} (rounds "
            f"{ckpt.steps()}) is unreadable; nothing was resumed. Start afresh in another --out"
        )
    evaluating = functools.partial(
        evaluation_progress,
        problem.num_clients * len(problem.eval_sets),
        enabled=problem.eval_progress,
        desc=f"{name} evaluation",
        unit="client",
        leave=False,
    )
    costs = round_costs(algo, problem, sim)
    if restored is None:
        with evaluating():
            metrics = scored(algo.evaluate(sim), problem)
        first, records = 1, [_round_record(name, 0, metrics, 0.0)]
        records[0].update(costs(records[0], None))
    else:
        done, sim, records = restored
        first = done + 1
    for record in records:
        log(record)
    rounds = range(first, config.rounds + 1)
    enabled = progress and config.tracking.progress
    bar = progress_bar(rounds, enabled=enabled, desc=name, unit="round", leave=False)
    for r in bar:
        start = time.perf_counter()
        with evaluating():
            sim, metrics = algo.round(sim)
            metrics = scored(metrics, problem)
        _finite_or_raise(name, r, metrics, sim.clients.params, problem.client_names, vocab)
        record = _round_record(name, r, metrics, time.perf_counter() - start)
        records.append({**record, **costs(record, records[-1])})
        if r == config.rounds:
            records[-1].update(final_analyses(algo, config, problem, sim))
        log(records[-1])
        if every and (r % every == 0 or r == config.rounds):
            ckpt.save(r, sim, records)
        bar.set_postfix(val_ppl=f"{records[-1]['val_mean_ppl']:.3f}")
    if ckpt:
        ckpt.close()
    if adapters_path is not None:
        _save_adapters(adapters_path, problem, sim, records[-1]["round"])
    return records


def _save_adapters(path: Path, problem: Problem, sim: SimState, round_idx: int) -> None:
    names = problem.client_names or [str(i) for i in range(problem.num_clients)]
    save_run_adapters(path, client_model_state(sim.clients), names, round_idx)


def resumable(out: Path, config: ExperimentConfig, *, if_any: bool = False) -> bool:
    """Whether `--resume` has a run to continue in `out`: checkpoints (some method's step
    directory) and the run's `config.json`, from which `config` differs only in
    `config.RESUMABLE` fields. Raises `CheckpointError` when there is nothing to resume (unless
    `if_any`: then False, a fresh start) and `ConfigError` naming every other changed field with
    both values."""
    steps = [p for p in (out / "checkpoints").glob("*/*") if p.name.isdigit() and p.is_dir()]
    if not steps:
        if if_any:
            return False
        raise CheckpointError(
            f"--resume: nothing to resume in {out}: it holds no checkpoints (a run saves them "
            "with --checkpoint-every K); check --out, or drop --resume (or pass "
            "--resume=if-any) to start from scratch"
        )
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"--resume: {out / 'config.json'} of the run to continue is unreadable ({e}); "
            "without it the configs cannot be compared, so nothing is resumed"
        ) from None
    changed = resume_differences(saved, config)
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the run in {out} in {'; '.join(changed)}; only "
            f"{', '.join(RESUMABLE)} may change on resume: restore those values, or start a new "
            "run in another --out"
        )
    return True


def train_and_evaluate(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool | str = False,
) -> dict[str, Any]:
    """Runs every method of `config` and writes under `out_dir`: `config.json`, `metrics.jsonl`
    (one record per method and round, with the mixing matrix), TensorBoard events in
    `tensorboard/` (and a W&B run if asked), `summary.json`, `results.md`, `ppl.png`, `bytes.png`
    (mean perplexity against the bytes exchanged),
    `trust.png` (final mixing matrices), `experts.png` (final expert assignments, FedAMoLE),
    `routing_<method>.png` (generalist routing shares, CoMiGS family) and every method's final
    adapters in `adapters/<method>.safetensors` (`fedjax-lora export`); returns the summary.
    Checkpoints go to `out_dir/checkpoints/<method>`; `resume` continues every method from its
    newest readable checkpoint (`resume="if-any"`: or starts afresh when there is none); the
    config may then differ from the saved run's only in `config.RESUMABLE` fields."""
    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise CheckpointError(
            f"{checkpoints} already holds checkpoints; pass --resume to continue that run or "
            "choose another output directory (nothing was overwritten)"
        )
    resume = bool(resume) and resumable(out, config, if_any=resume == "if-any")
    out.mkdir(parents=True, exist_ok=True)
    if config.tracking.wandb:
        require_wandb()
    problem, data = build_problem(config)
    groups = None if data.groups is None else np.asarray(data.groups).tolist()
    # Evaluation progress is compiled into the rounds only when a bar can show.
    shown = progress and config.tracking.progress and interactive()
    problem = dataclasses.replace(problem, eval_progress=shown)
    # Every method is built (its options checked) before any of them trains.
    algorithms = {name: method_factory(name, config)(problem) for name in config.methods}
    trackers = _start_run(out, config)
    history = {}
    try:
        for name in config.methods:
            history[name] = run_method(
                name,
                problem,
                config,
                trackers.log,
                progress=progress,
                checkpoint_dir=out / "checkpoints" / name,
                resume=resume,
                algorithm=algorithms[name],
                adapters_path=out / ADAPTERS_DIR / f"{name}.safetensors",
            )
    finally:
        trackers.close()
    return write_results(out, problem, groups, history)


def _start_run(out: Path, config: ExperimentConfig):
    """Writes the run's `config.json`, removes a stale summary and opens its trackers."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    for stale in ("summary.json", "results.md"):  # rewritten when every method has finished
        (out / stale).unlink(missing_ok=True)
    return open_trackers(
        out,
        tensorboard=config.tracking.tensorboard,
        wandb=config.tracking.wandb,
        project=config.tracking.wandb_project,
        config=to_dict(config),
    )


def train_and_evaluate_seeds(
    configs: list[ExperimentConfig], out_dirs: list[str | Path], *, progress: bool = True
) -> list[dict[str, Any]]:
    """The same experiment at several seeds (`configs` equal but for `seed`), each written to its
    directory in `out_dirs` as `train_and_evaluate` writes it; returns the summaries.

    Each method's seeds run as one vectorized sweep (`sweep.run_members`: one compiled round
    mapped over the seeds, the data and base its arguments, so runs of equal shapes share the
    program) where the method allows it, one run per seed otherwise; both stop on divergence
    like a single run. Runs that checkpoint, or a single seed, are `train_and_evaluate` calls.
    """
    from fedjax_lora.sweep import NotVectorizable, run_members

    first = configs[0]
    same = lambda c: dataclasses.replace(c, seed=first.seed) == first
    if len(configs) < 2 or first.checkpoint.every or not all(map(same, configs)):
        return [
            train_and_evaluate(c, d, progress=progress)
            for c, d in zip(configs, out_dirs, strict=True)
        ]
    outs = [Path(d) for d in out_dirs]
    for out in outs:
        if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise CheckpointError(
                f"{out / 'checkpoints'} already holds checkpoints; choose another output "
                "directory (nothing was overwritten)"
            )
    if first.tracking.wandb:
        require_wandb()
    problem, data = build_problem(first)
    groups = None if data.groups is None else np.asarray(data.groups).tolist()
    # Every method is built (its options checked) before any of them trains.
    algorithms = {name: method_factory(name, first)(problem) for name in first.methods}
    vocab = nnx.merge(problem.graphdef, problem.template, problem.base).config.vocab_size
    names = problem.client_names
    seeds = [c.seed for c in configs]
    histories: list[dict[str, list]] = [{} for _ in configs]
    for name in first.methods:
        check = lambda i, r, metrics, params, name=name: _finite_or_raise(
            f"{name} (seed {seeds[i]})", r, metrics, params, names, vocab
        )
        try:
            members = run_members(name, [problem], first, seeds, [first.optimizer.lr], check)
        except NotVectorizable:
            members = None
        for i, config in enumerate(configs):
            path = outs[i] / ADAPTERS_DIR / f"{name}.safetensors"
            if members is None:  # one run per seed
                histories[i][name] = run_method(
                    name, problem, config, lambda r: None, progress=progress, adapters_path=path
                )
                continue
            records, sim = members[i]["records"], members[i]["state"]
            records[-1].update(final_analyses(algorithms[name], config, problem, sim))
            _save_adapters(path, problem, sim, records[-1]["round"])
            histories[i][name] = records
    summaries = []
    for config, out, history in zip(configs, outs, histories, strict=True):
        trackers = _start_run(out, config)
        try:
            for records in history.values():
                for record in records:
                    trackers.log(record)
        finally:
            trackers.close()
        summaries.append(write_results(out, problem, groups, history))
    return summaries
