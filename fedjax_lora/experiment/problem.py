"""The problem an experiment runs: the base model with its LoRA (`build_model`), the clients' data
(`build_data`, over the registered sources of `fedjax_lora.experiment.sources`), evaluation
windows, the side data the selected methods declare and the instruction task, assembled into a
`Problem` (`build_problem`); and each method built for it with its options (`method_factory`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora import lora
from fedjax_lora.algorithms import METHODS, Algorithm, Problem, SideData, get_method
from fedjax_lora.config import ExperimentConfig, import_modules
from fedjax_lora.data import (
    FederatedData,
    eval_windows,
    keep_train_fraction,
    stack_streams,
)
from fedjax_lora.data.streams import split_tail
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment.sources import SIDE_DATA, checked_source, get_source, side_data_fix
from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.factory import from_config
from fedjax_lora.options import resolve
from fedjax_lora.settings import TrustOptions

SPLITS = ("val", "test")


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
    """The clients' data as the config describes it: the registered source of `data.source`
    (`sources.SOURCES`), its requirements checked (`checked_source`), built, then what every
    source shares: `data.train_fractions` and the check against the sequence length and
    vocabulary (`FederatedData.validate`)."""
    data = checked_source(config)(config, vocab_size, tokenizer)
    if config.data.train_fractions:
        data = keep_train_fraction(data, config.data.train_fractions)
    return data.validate(config.training.seq_len, vocab_size)


def base_tokenizer(config: ExperimentConfig) -> Any:
    """The tokenizer files of `model.source`, or None: for the synthetic corpus (token ids
    already), the random base, or a checkpoint without them (which may still read bytes,
    `text_tokenizer`)."""
    if not config.model.source or not get_source(config.data.source).text:
        return None
    from fedjax_lora import models

    try:
        return models.load_tokenizer(config.model.source)
    except models.CheckpointError:
        return None


def _with_task(problem: Problem, config: ExperimentConfig, data: FederatedData) -> Problem:
    """The problem with `config.eval.generation`'s task on the clients' test examples."""
    from fedjax_lora.engine import instruction

    gen = config.eval.generation
    if gen is None:
        return problem
    task = data.task  # the source declares one (checked_source)
    if task is None:
        raise ValueError(
            f"data.source={config.data.source!r} is registered with task=True but its builder "
            "returned data without a task (FederatedData.task); set it, or register the source "
            "without task"
        )
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
    check_side_data(config, needs)
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
    check_side_data(config, needs, data)
    for what in SIDE_DATA:
        if any(getattr(need, what) for need in needs.values()):
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


def check_side_data(
    config: ExperimentConfig, needs: dict[str, SideData], data: FederatedData | None = None
) -> None:
    """Refuses methods whose declared side data `config.data.source` does not provide: before
    anything is built, by the source's declaration (`SourceSpec.provides`); given the built
    `data`, also side data it declares but did not build (e.g. `data.reference_sequences = 0`).
    One line naming the methods and the sources that provide it."""
    provides = get_source(config.data.source).provides
    for what in SIDE_DATA:
        wanting = [name for name, need in needs.items() if getattr(need, what)]
        held = None if data is None else getattr(data, what)
        unbuilt = data is not None and (held is None or not np.size(held))
        if wanting and (what not in provides or unbuilt):
            raise ConfigError(
                f"method(s) {wanting} need the data's {what}, which data.source="
                f"{config.data.source!r} does not provide; {side_data_fix(what)}"
            )


def side_needs(config: ExperimentConfig) -> dict[str, SideData]:
    """The side data every selected method of `config` declares (its registration's `side`), by
    method; methods that read none are left out."""
    needs = {name: get_method(name).side for name in config.methods}
    return {name: need for name, need in needs.items() if need != SideData()}


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
