"""`train_and_evaluate`: build the problem from an `ExperimentConfig`, run every method, write
`metrics.jsonl`, `summary.json` and the plots (`fedjax_lora.plots`).

Every round record carries the round's costs (`round_costs`): the bytes each client uploaded and
downloaded (the method's `ServerProgram.comm`) and their running totals, and under client-level DP
the `ε` spent so far at `δ` (`fedjax_lora.aggregation.privacy`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora import lora
from fedjax_lora.algorithms import (
    METHODS,
    Algorithm,
    Problem,
    SideData,
    SimState,
    get_method,
)
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.config import (
    RESUMABLE,
    ExperimentConfig,
    import_modules,
    resume_differences,
    to_dict,
)
from fedjax_lora.data import (
    FederatedData,
    eval_windows,
    keep_train_fraction,
    reference_windows,
    stack_streams,
    synthetic_corpus,
    uniform_evaluation,
)
from fedjax_lora.data.streams import split_tail
from fedjax_lora.distributed import host
from fedjax_lora.engine.evaluate import EvalSet
from fedjax_lora.engine.state import client_model_state
from fedjax_lora.errors import CheckpointError, ConfigError, DivergenceError
from fedjax_lora.export import ADAPTERS_DIR, save_run_adapters
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.options import resolve
from fedjax_lora.plots import plot_bytes, plot_expert_assignment, plot_history, plot_trust
from fedjax_lora.settings import TrustOptions
from fedjax_lora.tracking import (
    evaluation_progress,
    interactive,
    json_safe,
    open_trackers,
    progress_bar,
    require_wandb,
)

SPLITS = ("val", "test")
INSTRUCTION_SOURCES = ("dolly", "snli", "natural_instructions")


def build_model(config: ExperimentConfig):
    """The base model with the config's LoRA attached, and its tokenizer (None for the tiny
    random base)."""
    spec = config.model
    dtype = jnp.dtype(spec.dtype)
    overrides = {
        k: getattr(spec, k)
        for k in ("dropout", "attn_dropout", "activation")
        if getattr(spec, k) is not None
    }
    if spec.source:
        from fedjax_lora import models

        model = models.load(spec.source, dtype=dtype, **overrides)
        tokenizer = base_tokenizer(config)
    else:
        cfg = ModelConfig(
            family=spec.family,
            vocab_size=spec.vocab_size,
            d_model=spec.d_model,
            n_layers=spec.n_layers,
            n_heads=spec.n_heads,
            d_ff=spec.d_ff,
            max_positions=spec.max_positions,
            **overrides,
        )
        model, tokenizer = from_config(cfg, dtype=dtype, seed=spec.seed), None
    lora.add_lora(model, config.lora, key=jax.random.key(config.seed))
    return model, tokenizer


def build_data(config: ExperimentConfig, vocab_size: int, tokenizer=None) -> FederatedData:
    """The clients' data as the config describes it, validated for the sequence length."""
    spec = config.data
    seq = config.training.seq_len
    if spec.eval_mixture == "uniform" and spec.source not in ("synthetic", "fortunes"):
        raise ValueError(
            f"data.eval_mixture=uniform is built for data.source synthetic or fortunes, not "
            f"{spec.source!r}; use data.eval_mixture=own (or comigs_ag_news for CoMiGS's "
            "out-of-distribution setting on real data)"
        )
    if spec.source == "synthetic":
        per_split = spec.tokens_per_client
        data = synthetic_corpus(
            spec.num_groups,
            spec.clients_per_group,
            vocab_size=vocab_size,
            overlap=spec.overlap,
            train_tokens=per_split,
            val_tokens=max(int(per_split * spec.val_fraction), seq + 1),
            test_tokens=max(int(per_split * spec.test_fraction), seq + 1),
            reference_shape=(spec.reference_sequences, seq),
            shared_eval_tokens=spec.shared_eval_tokens,
            eval_mixture=spec.eval_mixture,
            seed=spec.seed,
        )
    elif spec.source == "fortunes":
        data = _fortunes_data(config, vocab_size, tokenizer)
    elif spec.source in INSTRUCTION_SOURCES:
        data = _instruction_data(config, vocab_size, tokenizer)
    else:
        from fedjax_lora.data import comigs_datasets, trust_datasets

        builders = comigs_datasets if spec.source in comigs_datasets.DATASETS else trust_datasets
        data = builders.from_spec(spec, tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq)
    if spec.train_fractions:
        data = keep_train_fraction(data, spec.train_fractions)
    return data.validate(seq, vocab_size)


def base_tokenizer(config: ExperimentConfig) -> Any:
    """The tokenizer files of `model.source`, or None: for the synthetic corpus (token ids
    already), the random base, or a checkpoint without them (which may still read bytes,
    `text_tokenizer`)."""
    if not config.model.source or config.data.source == "synthetic":
        return None
    from fedjax_lora import models

    try:
        return models.load_tokenizer(config.model.source)
    except models.CheckpointError:
        return None


def text_tokenizer(config: ExperimentConfig, tokenizer: Any, vocab_size: int) -> Any:
    """The tokenizer text data is read with: the base's, or UTF-8 bytes (`ByteTokenizer`) for a
    base without tokenizer files whose vocabulary is the bytes: the tiny random base with
    `model.vocab_size >= 256`, or a checkpoint of exactly 256 tokens (e.g. a byte-level base
    pretrained here)."""
    from fedjax_lora.data.instruction import ByteTokenizer

    if tokenizer is not None:
        return tokenizer
    if config.model.source:
        if vocab_size != ByteTokenizer.vocab_size:
            raise ValueError(
                f"data.source={config.data.source!r} needs a tokenizer: {config.model.source!r} "
                f"has no tokenizer files and a vocabulary of {vocab_size} (not 256 bytes); add "
                "the tokenizer files or choose another model.source"
            )
    elif vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"data.source={config.data.source!r} without model.source reads bytes: set "
            f"model.vocab_size >= 256 (got {vocab_size}) or give model.source"
        )
    return ByteTokenizer()


def _instruction_data(config: ExperimentConfig, vocab_size: int, tokenizer) -> FederatedData:
    """FedAMoLE's instruction data (`fedjax_lora.data.instruction`); the tiny random base reads
    bytes."""
    from fedjax_lora.data import datasets_hf, instruction

    spec, gen = config.data, config.eval.generation
    tokenizer = text_tokenizer(config, tokenizer, vocab_size)
    kw = {"source": spec.paths[0]} if spec.paths else {}
    if spec.source == "natural_instructions":
        pairs = datasets_hf.load_natural_instructions(num_tasks=spec.num_tasks, **kw)
    elif spec.source == "dolly":
        pairs = datasets_hf.load_dolly(limit=spec.max_rows, **kw)
    else:  # the unlabelled rows count in the reference's partition
        pairs = datasets_hf.load_snli(limit=spec.max_rows, unlabelled=True, **kw)
    return instruction.instruction_data(
        pairs,
        tokenizer,
        vocab_size=vocab_size,
        num_clients=spec.num_clients,
        partition="task" if spec.source == "natural_instructions" else "dirichlet",
        alpha=spec.alpha,
        seed=spec.seed,
        val_fraction=spec.val_fraction,
        test_fraction=spec.test_fraction,
        aux_fraction=spec.aux_fraction,
        max_test=gen.max_examples if gen else 50,
        choices=gen is not None and gen.metric == "choice_accuracy",
        bos_id=instruction.default_bos_id(tokenizer),
        packing=spec.instruction_packing,
        seq_len=config.training.seq_len,
    )


def _with_task(problem: Problem, config: ExperimentConfig, data: FederatedData) -> Problem:
    """The problem with `config.eval.generation`'s task on the clients' test examples."""
    from fedjax_lora.engine import instruction

    gen = config.eval.generation
    if gen is None:
        return problem
    if data.task is None:
        raise ValueError(
            f"eval.generation needs an instruction data source {INSTRUCTION_SOURCES}, got "
            f"data.source={config.data.source!r}; unset eval.generation"
        )
    task = data.task
    context = nnx.merge(problem.graphdef, problem.template, problem.base).config.max_positions
    if gen.metric == "rouge_l":
        budget = gen.max_prompt_tokens or context - gen.max_new_tokens
        make = lambda n: instruction.make_generation_set(task.prompts, config.eval.batch_size, n)
        text_task = instruction.TextTask(
            "rouge_l",
            gen.max_new_tokens,
            task.eos_id,
            task.references,
            task.decode,
            rouge=config.eval.rouge,
        )
    else:
        budget = gen.max_prompt_tokens or context - max(len(c) for c in task.choices)
        make = lambda n: instruction.make_choice_set(
            task.prompts, task.labels, task.choices, config.eval.batch_size, n
        )
        text_task = instruction.TextTask("choice_accuracy", gen.max_new_tokens, task.eos_id)
    if budget < 1:
        raise ValueError(
            f"no room for prompts: the model's context is {context} positions; lower "
            "eval.generation.max_new_tokens or set eval.generation.max_prompt_tokens"
        )
    return problem.with_task(text_task, make(budget))


def _fortunes_data(config: ExperimentConfig, vocab_size: int, tokenizer) -> FederatedData:
    from fedjax_lora.data import build_federated, fortunes

    spec = config.data
    tokenizer = text_tokenizer(config, tokenizer, vocab_size)
    root = spec.fortunes_dir or fortunes.FORTUNES_ROOT
    if not spec.categories:
        raise ValueError("data.categories is empty; name fortune languages (en, de, ...) or topics")
    languages = set(fortunes.list_languages(root))
    clients, names, groups, held_out = [], [], [], []
    seq, per_category = config.training.seq_len, spec.reference_sequences // len(spec.categories)
    for g, category in enumerate(spec.categories):
        texts = (
            fortunes.load_language(category, root, spec.encodings)
            if category in languages
            else fortunes.load_topic(category, "en", root, spec.encodings)
        )
        rng = np.random.default_rng(spec.seed + g)
        order = rng.permutation(len(texts))
        # The last fortunes of the shuffled order, enough for this category's reference windows,
        # go to the shared reference set (prediction trust); no client holds them.
        kept, reference = _hold_out(texts, order, per_category * (seq + 1), tokenizer, vocab_size)
        held_out.append(reference_windows(reference, per_category, seq) if per_category else None)
        for c in range(spec.clients_per_group):
            clients.append([texts[i] for i in kept[c :: spec.clients_per_group]])
            names.append(f"{category}-{c}")
            groups.append(g)
    train = 1.0 - spec.val_fraction - spec.test_fraction
    data = build_federated(
        clients,
        vocab_size=vocab_size,
        split=(train, spec.val_fraction, spec.test_fraction),
        tokenizer=tokenizer,
        client_names=names,
        groups=np.asarray(groups),
        reference=np.concatenate(held_out) if per_category else None,
    )
    return uniform_evaluation(data) if spec.eval_mixture == "uniform" else data


def _hold_out(texts, order, tokens: int, tokenizer, vocab_size: int):
    """`(kept order, held-out stream)`: fortunes from the end of `order` until their tokens
    reach `tokens`."""
    from fedjax_lora.data import tokenize_texts

    pieces, have = [], 0
    for i in order[::-1][: len(order) - 1]:  # at least one fortune stays with the clients
        if have >= tokens:
            break
        pieces.append(tokenize_texts([texts[i]], tokenizer, vocab_size=vocab_size))
        have += len(pieces[-1])
    if have < tokens:
        raise ValueError(
            f"the fortunes cannot fill {tokens} reference tokens; lower data.reference_sequences"
        )
    if not pieces:  # no reference set asked for (data.reference_sequences = 0)
        return order, np.zeros(0, np.int32)
    return order[: len(order) - len(pieces)], np.concatenate(pieces[::-1])


def build_problem(config: ExperimentConfig) -> tuple[Problem, FederatedData]:
    """Model, adapters, data, evaluation windows and the side data the selected methods declare
    (`side_needs`) assembled into a `Problem` (the config's `imports` imported first, so their
    methods are known)."""
    import_modules(config.imports)
    unknown = sorted(set(config.method_options) - set(METHODS))
    if unknown:
        raise ValueError(
            f"method_options names unknown method(s) {unknown}; available: {sorted(METHODS)}"
        )
    for name in dict.fromkeys((*config.methods, *config.method_options)):
        method_factory(name, config)  # unknown methods and options fail before any compute
    needs = side_needs(config)
    aux_fraction = config.data.aux_fraction
    if aux_fraction is None:
        aux_fraction = max((need.aux for need in needs.values()), default=0.0)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, aux_fraction=aux_fraction)
    )
    model, tokenizer = build_model(config)
    data = build_data(config, model.config.vocab_size, tokenizer)
    seq, ev = config.training.seq_len, config.eval
    train, training = data.train, config.training
    stride = None
    if data.example_rows:  # one padded example per slot of seq + 1 tokens
        stride, training = seq + 1, dataclasses.replace(training, packing="examples")
    # val/test count the target tokens only (an instruction example's response); aux every token
    # (FedAMoLE's RSEA statistics: prompt and response, as the reference).
    windows = {
        split: eval_windows(
            data.split(split), seq, ev.max_windows, data.client_names, stride=stride, masked=True
        )
        for split in SPLITS
    }
    side: dict[str, Any] = {}
    aux = data.aux
    if aux is None and aux_fraction > 0:  # held out of the training stream
        train, aux = split_tail(train, aux_fraction)
    if aux is not None:
        side["aux"] = eval_windows(
            aux, seq, ev.max_windows, data.client_names, stride=stride, masked=data.example_rows
        )
    for what in ("reference", "mixtures"):
        wanting = [name for name, need in needs.items() if getattr(need, what)]
        if wanting and getattr(data, what) is None:
            raise ValueError(
                f"method(s) {wanting} need the data's {what}, which data.source="
                f"{config.data.source!r} does not provide; {SIDE_DATA_FIX[what]}"
            )
        if wanting:
            side[what] = getattr(data, what)
    shared = {}
    for name, stream in (data.shared_eval or {}).items():
        w, v = eval_windows(stack_streams([stream]), seq, ev.max_windows)
        shared[f"shared_{name}"] = (w[0], v[0])
    problem = Problem.create(
        model,
        train,
        windows,
        training=training,
        optimizer=config.optimizer,
        strategy=config.strategy,
        eval_batch_size=ev.batch_size,
        client_names=data.client_names,
        shared_windows=shared,
        side=side,
        cohort=config.data.cohort(),
    )
    problem = dataclasses.replace(problem, global_rule=config.aggregation)
    return _with_task(problem, config, data), data


SIDE_DATA_FIX = {
    "reference": "set data.reference_sequences > 0 with a source that holds out a reference set "
    "(synthetic, fortunes, the trust-weighted datasets), or drop the method",
    "mixtures": "choose a source with known client mixtures (synthetic, the trust-weighted or "
    "CoMiGS datasets), or drop the method",
}


def side_needs(config: ExperimentConfig) -> dict[str, SideData]:
    """The side data every selected method of `config` declares (its registration's `side`), by
    method; methods that read none are left out."""
    needs = {name: get_method(name).side for name in config.methods}
    return {name: need for name, need in needs.items() if need != SideData()}


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


def _round_record(method: str, round_idx: int, metrics: dict, seconds: float) -> dict[str, Any]:
    """One round's record for `metrics.jsonl`: the clients' last training loss (`train_loss`),
    the `cohort`, whether the server aggregated (`aggregated`) and its mixing matrix (`trust`),
    per-client and mean `loss`/`ppl`/`accuracy`/`rouge_l` of every evaluation set
    (`val_ppl`, `val_mean_ppl`, ...), and every other metric the method's programs return,
    namespaced by the method (`fdlora/fusion_weights`, `comigs/train_ce`; `method_metric`)."""
    record: dict[str, Any] = {"method": method, "round": round_idx, "seconds": seconds}
    if "train" in metrics:
        train = metrics["train"]
        record["train_loss"] = np.asarray(train["train_loss"])[:, -1].tolist()
        if "cohort" in train:
            record["cohort"] = np.asarray(train["cohort"]).tolist()
        for key, value in train.items():
            if key not in ("train_loss", "cohort"):
                record[f"{method}/{key}"] = method_metric(value)
    if "aggregation" in metrics:
        agg = metrics["aggregation"]
        record["aggregated"] = bool(agg["applied"])
        if "matrix" in agg:
            record["trust"] = np.asarray(agg["matrix"], np.float64).tolist()
        for key, value in agg.items():
            if key not in ("applied", "matrix"):
                record[f"{method}/{key}"] = method_metric(value)
    for split, values in metrics.items():
        if split in ("train", "aggregation"):
            continue
        for key in ("ppl", "loss", "accuracy", "rouge_l"):
            if key not in values:  # a text task reports accuracy or rouge_l only
                continue
            per_client = np.asarray(values[key], np.float64)
            record[f"{split}_{key}"] = per_client.tolist()
            record[f"{split}_mean_{key}"] = float(per_client.mean())
    return record


def method_metric(value: Any) -> Any:
    """A method's metric as JSON: an array as (nested) lists, its leading axis the clients
    (`[N, steps]` training series, `[N, 2]` fusion weights); a nested mapping key by key."""
    if isinstance(value, dict):
        return {k: method_metric(v) for k, v in value.items()}
    array = np.asarray(value)
    if array.dtype == bool:
        return array.tolist()
    return array.astype(np.float64).tolist()


Costs = Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any]]


def round_costs(algo: Algorithm, problem: Problem, sim: SimState) -> Costs:
    """`costs(record, previous) -> fields` of a round record (`previous`: the record before it,
    None for round 0), for `algo` on `problem` from its initial state `sim`:

    - `upload_bytes`, `download_bytes`: per client `[N]`, what the method moves in a round that
      aggregates (`ServerProgram.comm`), 0 for clients outside the round's cohort and in rounds
      without aggregation; `cumulative_upload_bytes`, `cumulative_download_bytes`,
      `cumulative_bytes`: their totals over clients and rounds so far;
    - with client-level DP (`ServerProgram.dp`): `epsilon` after the `dp_rounds` aggregations so
      far at `delta`, from `aggregation.privacy.epsilon` with `K = data.cohort_size` of `N`."""
    from fedjax_lora.aggregation import privacy

    server = algo.method.server if algo.method is not None else None
    exchange = None
    if server and server.comm:  # the bytes follow the adapters' and frozen state's shapes
        clients = sim.clients
        exchange = server.comm(
            clients._replace(params=host(clients.params), frozen=host(clients.frozen))
        )
    dp = server.dp if server is not None else None
    n = problem.num_clients
    k = None if problem.cohort is None else problem.cohort.size

    def costs(record: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
        previous, out = previous or {}, {}
        applied = bool(record.get("aggregated", False))
        if exchange is not None:
            rows = np.asarray(record.get("cohort", np.arange(n)), int)
            up, down = np.zeros(n, np.int64), np.zeros(n, np.int64)
            if applied:  # a pooled model (centralized) has one row for everyone
                up[rows] = np.broadcast_to(exchange.upload, (n,))[rows]
                down[rows] = np.broadcast_to(exchange.download, (n,))[rows]
            total_up = previous.get("cumulative_upload_bytes", 0) + int(up.sum())
            total_down = previous.get("cumulative_download_bytes", 0) + int(down.sum())
            out |= {
                "upload_bytes": up.tolist(),
                "download_bytes": down.tolist(),
                "cumulative_upload_bytes": total_up,
                "cumulative_download_bytes": total_down,
                "cumulative_bytes": total_up + total_down,
            }
        if dp is not None:
            rounds = previous.get("dp_rounds", 0) + applied
            eps = 0.0
            if rounds:
                z = dp.noise_multiplier
                eps = privacy.epsilon(z, n, k, rounds, dp.delta, dp.sampling)
            out |= {"dp_rounds": rounds, "epsilon": eps, "delta": dp.delta}
        return out

    return costs


def scored(metrics: dict, problem: Problem) -> dict:
    """The round's metrics on the host, a text task's generated tokens scored (ROUGE-L)."""
    from fedjax_lora.engine.instruction import score_task

    metrics = host(metrics)
    if problem.task is None:
        return metrics
    tasks = {k for k, v in problem.eval_sets.items() if not isinstance(v, EvalSet)}
    return {k: score_task(v, problem.task) if k in tasks else v for k, v in metrics.items()}


def _trust_options(config: ExperimentConfig):
    """`config.trust` with `eval.attention_dropout` as its evaluation dropout rate."""
    rate, own = config.eval.attention_dropout, config.trust.eval_attention_dropout
    if rate is None:
        return config.trust
    if own is not None and own != rate:
        raise ValueError(
            f"eval.attention_dropout={rate} and trust.eval_attention_dropout={own} disagree; "
            "set eval.attention_dropout only"
        )
    return dataclasses.replace(config.trust, eval_attention_dropout=rate)


def method_factory(name: str, config: ExperimentConfig) -> Callable[[Problem], Algorithm]:
    """`problem -> Algorithm` for method `name` with its options: the registered defaults with
    `config.method_options[name]` resolved onto them (`fedjax_lora.options.resolve`: unknown keys
    and bad values raise one line before any compute). The config's `trust` section (with
    `eval.attention_dropout`) is the defaults of every method whose options are `TrustOptions`."""
    spec = get_method(name)
    defaults = _trust_options(config) if isinstance(spec.options, TrustOptions) else spec.options
    options = resolve(defaults, config.method_options.get(name, {}), f"method_options.{name}")
    return functools.partial(spec, options=options)


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


def final_analyses(
    algo: Algorithm, config: ExperimentConfig, problem: Problem, sim: SimState
) -> dict[str, Any]:
    """What the last record of a run adds: the method's own analyses (`Method.analyses`, e.g.
    FedAMoLE's `experts`, the CoMiGS family's `routing`), token ids decoded with the base's
    tokenizer for text data (UTF-8 bytes for a base without one; ids for the synthetic corpus)."""
    method = algo.method
    if method is None or method.analyses is None:
        return {}
    tokenizer = base_tokenizer(config)
    if tokenizer is None and config.data.source != "synthetic":
        vocab = nnx.merge(problem.graphdef, problem.template, problem.base).config.vocab_size
        tokenizer = text_tokenizer(config, None, vocab)
    return method.analyses(sim, tokenizer)


def summarize(
    history: dict[str, list[dict[str, Any]]], client_names, groups: list[int] | None = None
) -> dict[str, Any]:
    """Per method: final mean and per-client perplexity (test and validation splits); with
    `groups` (the data's client groups), `client_groups` too; the bytes exchanged
    (`total_upload_bytes`, `total_download_bytes`, `total_bytes` over clients and rounds, and
    `upload_bytes_per_client_round`, `download_bytes_per_client_round`: the mean of a client
    taking part in a round) when recorded; `epsilon` and `delta` of a run with client-level DP."""
    summary = {}
    for method, records in history.items():
        last = records[-1]
        costs = {}
        if "cumulative_bytes" in last:
            taking_part = sum(len(r.get("cohort", r["upload_bytes"])) for r in records[1:])
            costs = {
                "total_upload_bytes": last["cumulative_upload_bytes"],
                "total_download_bytes": last["cumulative_download_bytes"],
                "total_bytes": last["cumulative_bytes"],
                "upload_bytes_per_client_round": last["cumulative_upload_bytes"]
                / max(taking_part, 1),
                "download_bytes_per_client_round": last["cumulative_download_bytes"]
                / max(taking_part, 1),
            }
        if "epsilon" in last:
            costs |= {"epsilon": last["epsilon"], "delta": last["delta"]}
        summary[method] = {
            "rounds": last["round"],
            "client_names": list(client_names),
            **({"client_groups": list(groups)} if groups is not None else {}),
            **{
                f"{split}_{what}": last[f"{split}_{what}"]
                for split in SPLITS
                for what in ("mean_ppl", "ppl", "mean_accuracy")
            },
            **{k: v for k, v in last.items() if k.startswith("task_")},
            **costs,
        }
    return summary


def final_trust(
    history: dict[str, list[dict[str, Any]]], num_clients: int
) -> dict[str, np.ndarray]:
    """Per method, the `num_clients × num_clients` mixing matrix of its last aggregated round
    (methods that never aggregated with such a matrix, e.g. centralized training of one model,
    are left out)."""
    out = {}
    for method, records in history.items():
        mixed = [r["trust"] for r in records if r.get("aggregated") and "trust" in r]
        if mixed and np.shape(mixed[-1]) == (num_clients, num_clients):
            out[method] = np.asarray(mixed[-1])
    return out


def final_experts(
    history: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per method with an assignment in its last record, `bool [M, E, C]` (modules in record
    order, expert axes padded with False to the largest pool), and the module names."""
    found = {
        m: records[-1]["experts"] for m, records in history.items() if records[-1].get("experts")
    }
    if not found:
        return {}, []
    modules = list(next(iter(found.values())))
    size = max(len(x) for held in found.values() for x in held.values())
    out = {}
    for method, held in found.items():
        x = [np.asarray(held[module], bool) for module in modules]
        out[method] = np.stack([np.pad(a, ((0, size - a.shape[0]), (0, 0))) for a in x])
    return out, modules


def results_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The results table's header and rows: final mean perplexities and accuracy per method,
    the megabytes exchanged (all clients, up and down, whole run) when recorded, and `ε` at `δ`
    when a method ran with client-level DP (`-` for the others)."""
    header = ["method", "val ppl (mean)", "test ppl (mean)", "test accuracy"]
    has_bytes = any("total_bytes" in s for s in summary.values())
    has_dp = any("epsilon" in s for s in summary.values())
    header += ["MB exchanged"] * has_bytes + ["ε (δ)"] * has_dp
    rows = []
    for method, s in summary.items():
        row = [
            method,
            f"{s['val_mean_ppl']:.3f}",
            f"{s['test_mean_ppl']:.3f}",
            f"{s['test_mean_accuracy']:.3f}",
        ]
        if has_bytes:
            row.append(f"{s['total_bytes'] / 1e6:.3f}" if "total_bytes" in s else "-")
        if has_dp:
            row.append(f"{s['epsilon']:.3g} ({s['delta']:g})" if "epsilon" in s else "-")
        rows.append(row)
    return header, rows


def results_table(summary: dict[str, Any]) -> str:
    """A Markdown table of `results_rows`."""
    header, rows = results_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


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


def write_results(
    out: Path, problem: Problem, groups: list | None, history: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """A finished run's `summary.json`, `results.md` and figures under `out`; returns the
    summary."""
    summary = summarize(history, problem.client_names, groups)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    (out / "results.md").write_text(results_table(summary) + "\n")
    plot_history(history, out / "ppl.png", groups=groups)
    if any("cumulative_bytes" in records[-1] for records in history.values()):
        plot_bytes(history, out / "bytes.png")
    trust = final_trust(history, problem.num_clients)
    if trust:
        plot_trust(trust, problem.client_names, out / "trust.png")
    experts, modules = final_experts(history)
    if experts:
        plot_expert_assignment(
            experts, problem.client_names, out / "experts.png", module_names=modules
        )
    for method, records in history.items():
        routing = records[-1].get("routing")
        if routing:
            from fedjax_lora.moe import plot_routing_shares

            plot_routing_shares(
                np.asarray(routing["shares"]),
                problem.client_names,
                out / f"routing_{method}.png",
                layers=routing["layers"],
                title=f"{method}: generalist share of the routing weight",
            )
    return summary
