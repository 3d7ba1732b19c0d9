"""Typed experiment configurations: frozen dataclasses loaded from YAML with dotted overrides.

Every configuration error is raised before any compute starts, naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fedjax_lora.errors import ConfigError
from fedjax_lora.families import FAMILIES, NAMES
from fedjax_lora.memory import experiment_bytes, host_memory_bytes
from fedjax_lora.presets import PRESETS
from fedjax_lora.settings import (
    GlobalRule,
    LocalTraining,
    LoRAConfig,
    OptimizerConfig,
    Strategy,
    TrustOptions,
)

if typing.TYPE_CHECKING:
    from fedjax_lora.engine.cohort import Cohort


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The frozen base: `source` is a local HF directory, a hub id or a `.gguf` file; without a
    source a randomly initialised model of the given sizes is built (the embedded tiny base).
    `dropout`, `attn_dropout`, `activation`: `ModelConfig` overrides when set (the trust-weighted
    reference: 0.2, 0.2, `gelu_erf`)."""

    source: str | None = None
    family: Literal[NAMES] = "gpt2"  # one of `fedjax_lora.families.FAMILIES`
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_positions: int = 128
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    dropout: float | None = None
    attn_dropout: float | None = None
    activation: str | None = None


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Client data. `source`: a registered data source (`fedjax_lora.experiment.sources`,
    `fedjax-lora sources`; a module in `imports` may `register_source` its own).
    `synthetic`: the embedded heterogeneous corpus (groups of clients drawn from distinct token
    sources, `overlap` in [0, 1]); `fortunes`: Debian fortune files by topic or
    language (`categories`; each file decoded strictly in the first of `encodings` that reads
    all of it, default UTF-8 only), tokenized with the model's tokenizer (bytes for a base without
    one whose vocabulary is the 256 bytes: `experiment.text_tokenizer`); the last fortunes of
    each category, enough for `reference_sequences / len(categories)` windows, are held out of
    every client as the shared reference set (prediction trust). `ag_news`,
    `multilingual_wikipedia`, `code_wiki`: the trust-weighted paper's splits
    (`fedjax_lora.data.trust_datasets`; `variant`, `paper_bug_compatible`, `paths` = local files
    or hub ids, `tokens_per_client` train tokens, `val_fraction · tokens_per_client` validation
    tokens per client, `reference_sequences` shared reference windows). `comigs_wikipedia`,
    `comigs_slimpajama`, `comigs_ag_news` (out-of-distribution): CoMiGS's four users, one category
    each (`fedjax_lora.data.comigs_datasets`; `categories` = languages or SlimPajama subsets,
    `clients_per_group` users per category, train / validation / test). `aux_fraction > 0` holds
    that share of every client's training tokens out as the auxiliary side data (`SideData.aux`:
    FedAMoLE's RSEA statistics, FDLoRA's fusion; never evaluated), for every method of the run so
    that all train on the same data; unset (None): the largest share the selected methods
    declare (`fedamole`, `fdlora`: the reference's 0.05), 0 when none reads it.
    `shared_eval_tokens > 0` (synthetic) adds the `shared_uniform` evaluation set, the same
    stream from the uniform mixture of all sources for every client (out-of-distribution
    evaluation); `eval_mixture: uniform`
    draws every client's validation and test streams from that uniform mixture (synthetic), or
    gives every client an equal share of every category's validation and test text (fortunes,
    `fedjax_lora.data.uniform_evaluation`): CoMiGS's out-of-distribution setting, the router
    trains on the target distribution.
    `cohort_size > 0`: a cross-device population, `cohort_size` clients drawn per round without
    replacement (`cohort_sampling`: `uniform` or by training-token counts `tokens`), idle
    clients' optimizer states kept or reset at their next draw (`cohort_optimizer`; see
    `fedjax_lora.engine.cohort`).

    `train_fractions` (one value in (0, 1] per client, any source): client `i` keeps the first
    `train_fractions[i]` of its training stream (users with different amounts of data, CoMiGS
    Figs. 4–5; validation and test unchanged; `fedjax_lora.data.keep_train_fraction`).

    `dolly`, `snli`, `natural_instructions`: FedAMoLE's instruction data
    (`fedjax_lora.data.instruction`; `paths[0]` a local file/directory, else the hub dataset):
    `num_clients` clients, Dirichlet(`alpha`) over categories/classes (one task per client for
    Natural Instructions, of its `num_tasks` largest tasks), each client's examples split into
    train / `val_fraction` / `test_fraction` (and `aux_fraction` of the rest as the auxiliary
    split, at most 200 examples: the reference's 0.05, i.e. 4 % of the examples), cut as the
    reference cuts them; `max_rows` keeps the first rows only; `instruction_packing`: `examples`
    (default, the reference: one example per training row, right-padded and masked, cut at
    `training.seq_len` tokens with EOS forced, over-long prompts dropped) or `windows`
    (`seq_len`-token windows of each client's stream of concatenated examples). A model without
    tokenizer files reads bytes (`ByteTokenizer`, vocabulary 256)."""

    source: str = "synthetic"  # a registered source: `fedjax_lora.experiment.sources.SOURCES`
    num_groups: int = 2
    clients_per_group: int = 2
    tokens_per_client: int = 4096
    overlap: float = 0.0
    categories: tuple[str, ...] = ()
    fortunes_dir: str | None = None
    encodings: tuple[str, ...] = ("utf-8",)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    aux_fraction: float | None = None
    shared_eval_tokens: int = 0
    eval_mixture: Literal["own", "uniform"] = "own"
    variant: Literal["mixed", "specific"] = "specific"
    paper_bug_compatible: bool = False
    paths: tuple[str, ...] = ()
    reference_sequences: int = 16
    seed: int = 0
    cohort_size: int = 0
    cohort_sampling: Literal["uniform", "tokens"] = "uniform"
    cohort_optimizer: Literal["keep", "reset"] = "keep"
    num_clients: int = 10
    alpha: float = 1.0
    num_tasks: int = 100
    max_rows: int | None = None
    instruction_packing: Literal["examples", "windows"] = "examples"
    train_fractions: tuple[float, ...] = ()

    def cohort(self) -> Cohort | None:
        """The per-round client sample (None: every client takes part in every round)."""
        if self.cohort_size < 0:
            raise ConfigError(
                f"data.cohort_size must be >= 0 (0: all clients), got {self.cohort_size}"
            )
        if self.cohort_size == 0:
            return None
        from fedjax_lora.engine.cohort import Cohort

        return Cohort(self.cohort_size, self.cohort_sampling, self.cohort_optimizer)


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """The instruction-task evaluation of every client's test examples
    (`fedjax_lora.engine.instruction`): `rouge_l` of greedy generations of at most
    `max_new_tokens` (stopping at EOS), or `choice_accuracy` by the lowest per-choice loss (SNLI);
    at most `max_examples` test examples per client (reference: 50 generation, 200
    classification); prompts keep their last `max_prompt_tokens` tokens (default: the model's
    context minus `max_new_tokens`)."""

    metric: Literal["rouge_l", "choice_accuracy"] = "rouge_l"
    max_new_tokens: int = 128
    max_examples: int = 50
    max_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_examples < 1:
            raise ConfigError(
                f"eval.generation.max_new_tokens and max_examples must be >= 1, got "
                f"{self.max_new_tokens}, {self.max_examples}"
            )


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluation windows: at most `max_windows` fixed windows per client and split, processed
    `batch_size` at a time; `generation`: the instruction-task metric per client (instruction
    data sources only; reported as `task_rouge_l` / `task_accuracy`); `rouge`: the ROUGE-L
    implementation of `rouge_l` tasks, `rouge` (PyPI `rouge` 1.0.1, the FedAMoLE paper's) or
    `rouge-score` (`fedjax_lora.engine.instruction.rouge_l`); `attention_dropout`: the
    trust-weighted methods evaluate (reported perplexities and trust inputs) with attention
    dropout of this rate kept on, as the paper (0.2; `TrustOptions.eval_attention_dropout`);
    null: no dropout in evaluation."""

    max_windows: int = 16
    batch_size: int = 8
    generation: GenerationSpec | None = None
    rouge: Literal["rouge", "rouge-score"] = "rouge"
    attention_dropout: float | None = None

    def __post_init__(self):
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"eval.attention_dropout must be in [0, 1) or null, got {self.attention_dropout}"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Save the whole simulation every `every` rounds (0: never; the last round is always saved
    when checkpointing is on), keeping the last `keep` checkpoints per method."""

    every: int = 0
    keep: int = 3

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ConfigError(
                f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {self.every}, "
                f"{self.keep}"
            )


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
    """Where round records go besides `metrics.jsonl`: TensorBoard event files and W&B.
    `progress`: progress bars for rounds and long host-side loops (shown only on a terminal or
    in a notebook; they never change results)."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "fedjax_lora"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """`fedjax-lora sweep`: the grid of simulations. `seeds` (initialisation and cohort keys) and
    `lrs` (peak learning rates) are one more mapped axis of one compiled round (`vmap` over the
    `S = |seeds| · |lrs|` simulations); `overlaps` (the synthetic corpus's heterogeneity, different
    data of equal shapes) are a further mapped axis of the same program, the levels' data passed
    as arguments (one program per level for methods that need their data on the host). Empty:
    the experiment's own value;
    `seeds` needs at least 2 entries (`check_seeds`). Examples:
    `experiments/configs/sweep_*.yaml`."""

    seeds: tuple[int, ...] = ()
    lrs: tuple[float, ...] = ()
    overlaps: tuple[float, ...] = ()

    def __post_init__(self):
        for name, kind in (("seeds", int), ("lrs", float), ("overlaps", float)):
            values = getattr(self, name)
            try:
                converted = tuple(kind(v) for v in values)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"sweep.{name} must be a list of numbers, got {values!r}"
                ) from None
            object.__setattr__(self, name, converted)
        if any(lr <= 0 for lr in self.lrs):
            raise ConfigError(f"sweep.lrs must be positive, got {self.lrs}")

    def check_seeds(self) -> None:
        """Raises unless `seeds` names at least 2 seeds: a sweep reports mean ± std over them."""
        if len(self.seeds) < 2:
            raise ConfigError(
                f"sweep.seeds names {len(self.seeds)} seed(s); a sweep reports mean ± std over "
                "seeds, give at least 2 (e.g. --set 'sweep.seeds=[0,1,2]'; examples: "
                "experiments/configs/sweep_*.yaml)"
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """`method_options`: per method name, fields of its registered options dataclass, e.g.
    `{"comigs": {"expert_counts": [1, 2, 3, 4], "moe": {"num_experts": 4}}}`, resolved onto the
    method's defaults (`fedjax_lora.options.resolve`: a mapping replaces a nested dataclass's
    fields; unknown keys fail before any compute, listing the valid ones; `fedjax-lora methods`
    lists every option with its default).
    `preset`: the paper preset (`fedjax_lora.presets.PRESETS`) applied under this config's own
    values (recorded here; see `merge_base`).
    `imports`: Python modules imported before methods are looked up (`import_modules`), e.g. one
    that `register`s your own method (the CLI's `--import`).
    `aggregation`: how every method with a global part reduces it (`GlobalRule`: a robust
    reduction, or client-level DP with `aggregation.dp.*`)."""

    methods: tuple[str, ...] = ("local", "fedavg")
    rounds: int = 10
    seed: int = 0
    model: ModelSpec = ModelSpec()
    lora: LoRAConfig = LoRAConfig(targets=FAMILIES["gpt2"].lora_targets, rank=8, alpha=16.0)
    data: DataSpec = DataSpec()
    training: LocalTraining = LocalTraining(steps=5, batch_size=8, seq_len=32)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-2)
    strategy: Strategy = Strategy()
    eval: EvalSpec = EvalSpec()
    trust: TrustOptions = TrustOptions()
    aggregation: GlobalRule = GlobalRule()
    checkpoint: CheckpointSpec = CheckpointSpec()
    tracking: TrackingSpec = TrackingSpec()
    sweep: SweepSpec = SweepSpec()
    method_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    preset: str | None = None
    imports: tuple[str, ...] = ()

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; available: {sorted(PRESETS)}")
        if not self.methods:
            raise ConfigError("methods is empty; name at least one (see `fedjax-lora methods`)")
        check_source(self)
        check_ranges(self)


def check_source(config: ExperimentConfig) -> None:
    """Raises `ConfigError` unless `data.source` is a registered data source
    (`fedjax_lora.experiment.sources.SOURCES`, JAX-free); a name not yet registered is looked up
    again after importing the config's `imports`, whose modules may `register_source` it."""
    from fedjax_lora.experiment.sources import SOURCES, get_source

    if config.data.source not in SOURCES:
        import_modules(config.imports)
        get_source(config.data.source)


# Range rules of every numeric config value: (field, test, requirement). Pure Python, so a config
# is checked before JAX is imported or anything is built.
_SEED = 2**32
_INT_RULES: tuple[tuple[str, int | None, int | None], ...] = (
    # (field, smallest, largest) for integers; None: unbounded on that side.
    ("rounds", 1, None),
    ("seed", 0, _SEED - 1),
    ("model.vocab_size", 1, None),
    ("model.d_model", 1, None),
    ("model.n_layers", 1, None),
    ("model.n_heads", 1, None),
    ("model.d_ff", 1, None),
    ("model.max_positions", 1, None),
    ("model.seed", 0, _SEED - 1),
    ("lora.rank", 1, None),
    ("data.num_groups", 1, None),
    ("data.clients_per_group", 1, None),
    ("data.tokens_per_client", 1, None),
    ("data.shared_eval_tokens", 0, None),
    ("data.reference_sequences", 0, None),
    ("data.seed", 0, _SEED - 1),
    ("data.cohort_size", 0, None),
    ("data.num_clients", 1, None),
    ("data.num_tasks", 1, None),
    ("data.max_rows", 1, None),
    ("training.steps", 1, None),
    ("training.batch_size", 1, None),
    ("training.seq_len", 1, None),
    ("training.grad_accum", 1, None),
    ("training.ce_chunk", 1, None),
    ("optimizer.total_steps", 1, None),
    ("optimizer.warmup_steps", 0, None),
    ("strategy.chunk_size", 1, None),
    ("strategy.num_devices", 1, None),
    ("strategy.model_devices", 1, None),
    ("eval.max_windows", 1, None),
    ("eval.batch_size", 1, None),
    ("eval.generation.max_new_tokens", 1, None),
    ("eval.generation.max_examples", 1, None),
    ("eval.generation.max_prompt_tokens", 1, None),
    ("trust.first_aggregation_round", 1, None),
    ("trust.eval_seed", 0, _SEED - 1),
    ("trust.top_k", 1, None),
    ("trust.top_peers", 1, None),
    ("trust.min_keep", 1, None),
    ("aggregation.f", 0, None),
    ("aggregation.m", 1, None),
    ("checkpoint.every", 0, None),
    ("checkpoint.keep", 1, None),
)
# (field, low, high, low_open, high_open) for real numbers; every one must also be finite.
_FLOAT_RULES: tuple[tuple[str, float, float, bool, bool], ...] = (
    ("model.dropout", 0.0, 1.0, False, True),
    ("model.attn_dropout", 0.0, 1.0, False, True),
    ("lora.alpha", 0.0, math.inf, True, True),
    ("lora.dropout", 0.0, 1.0, False, True),
    ("lora.init_std", 0.0, math.inf, True, True),
    ("data.overlap", 0.0, 1.0, False, False),
    ("data.val_fraction", 0.0, 1.0, False, True),
    ("data.test_fraction", 0.0, 1.0, False, True),
    ("data.aux_fraction", 0.0, 1.0, False, True),
    ("data.alpha", 0.0, math.inf, True, True),
    ("optimizer.lr", 0.0, math.inf, True, True),
    ("optimizer.b1", 0.0, 1.0, False, True),
    ("optimizer.b2", 0.0, 1.0, False, True),
    ("optimizer.eps", 0.0, math.inf, True, True),
    ("optimizer.weight_decay", 0.0, math.inf, False, True),
    ("optimizer.grad_clip", 0.0, math.inf, False, True),
    ("optimizer.final_lr_fraction", 0.0, 1.0, False, False),
    ("optimizer.pct_start", 0.0, 1.0, True, True),
    ("optimizer.div_factor", 0.0, math.inf, True, True),
    ("optimizer.final_div_factor", 0.0, math.inf, True, True),
    ("trust.temperature", 0.0, math.inf, True, True),
    ("trust.scale", 0.0, math.inf, True, True),
    ("trust.threshold", -math.inf, math.inf, True, True),
    ("aggregation.beta", 0.0, 0.5, False, True),
    ("aggregation.dp.clip_norm", 0.0, math.inf, True, True),
    ("aggregation.dp.noise_multiplier", 0.0, math.inf, False, True),
    ("aggregation.dp.adaptive_quantile", 0.0, 1.0, True, True),
    ("aggregation.dp.clip_lr", 0.0, math.inf, True, True),
    ("aggregation.dp.count_noise_std", 0.0, math.inf, True, True),
    ("aggregation.dp.delta", 0.0, 1.0, True, True),
)


def _field(config: Any, path: str) -> Any:
    """The value at dotted `path`, or None when a section on the way is unset."""
    value = config
    for part in path.split("."):
        value = getattr(value, part, None) if value is not None else None
    return value


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_ranges(config: ExperimentConfig) -> None:
    """Raises `ConfigError` naming the first config value out of its range (and the fix): every
    count, seed, probability, fraction and optimizer constant, plus the constraints between
    fields (`model.d_model` divisible by `model.n_heads`, `data.val_fraction +
    data.test_fraction < 1`, every `sweep` value). Pure Python: nothing is built or imported."""

    def bad(path: str, requirement: str, value: Any) -> ConfigError:
        return ConfigError(
            f"config field {path!r} must be {requirement}, got {value!r}; set it in the config "
            f"file or with --set {path}=..."
        )

    for path, low, high in _INT_RULES:
        value = _field(config, path)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(path, "an integer", value)
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise bad(path, f"an integer {span}", value)
    for path, low, high, low_open, high_open in _FLOAT_RULES:
        value = _field(config, path)
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
        if not (ok and (value < high if high_open else value <= high)):
            raise bad(path, _range_text(low, high, low_open, high_open), value)
    targets = _field(config, "lora.targets")
    if not isinstance(targets, tuple) or not all(isinstance(t, str) and t for t in targets):
        raise bad("lora.targets", "a list of projection names such as [c_attn, mlp.c_fc]", targets)
    model, data = config.model, config.data
    if model.d_model % model.n_heads:
        raise bad("model.n_heads", f"a divisor of model.d_model={model.d_model}", model.n_heads)
    if data.val_fraction + data.test_fraction >= 1:
        raise bad(
            "data.test_fraction",
            f"below 1 - data.val_fraction = {1 - data.val_fraction:g} (training keeps the rest)",
            data.test_fraction,
        )
    for i, f in enumerate(data.train_fractions):
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise bad(f"data.train_fractions[{i}]", "a number in (0, 1]", f)
    estimate = experiment_bytes(config)
    if sum(estimate.values()) > host_memory_bytes() > 0:
        parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in estimate.items())
        raise ConfigError(
            f"the config needs about {sum(estimate.values()) / 2**30:.1f} GiB ({parts}), more "
            f"than this host's {host_memory_bytes() / 2**30:.1f} GiB; lower the model sizes "
            "(model.*), data.tokens_per_client or training.batch_size / seq_len"
        )
    for seed in config.sweep.seeds:
        if not 0 <= seed < _SEED:
            raise bad("sweep.seeds", f"integers in [0, {_SEED - 1}]", config.sweep.seeds)
    for lr in config.sweep.lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise bad("sweep.lrs", "finite numbers > 0", config.sweep.lrs)
    for overlap in config.sweep.overlaps:
        if not 0 <= overlap <= 1:
            raise bad("sweep.overlaps", "numbers in [0, 1]", config.sweep.overlaps)


def convert(tp: Any, value: Any, where: str) -> Any:
    """`value` (YAML data) as the annotated type `tp`, checked; `where` names it in errors.
    Dataclasses are built from mappings (an instance passes as is)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field {where!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else convert(args[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field {where!r} must be a mapping, got {value!r}")
        inner = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field {where!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else Any
        return tuple(convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config field {where!r} must be one of {choices}, got {value!r}")
        return value
    if tp is float:
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            return float(value)  # YAML 1.1 reads `1e-3` as a string
        except ValueError:
            raise ConfigError(f"config field {where!r} must be a number, got {value!r}") from None
    if tp is int and isinstance(value, bool | float) or tp is int and not isinstance(value, int):
        raise ConfigError(f"config field {where!r} must be an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"config field {where!r} must be a string, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config field {where!r} must be true or false, got {value!r}")
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, rejecting unknown fields by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config field(s) {[prefix + u for u in unknown]}; valid fields of "
            f"{where or 'the experiment'}: {sorted(names)}"
        )
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config section {where or 'experiment'!r}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def merge_base(base: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """`base` with the fields in the nested dict `values` replaced (sections merged key by key).
    A `preset` in `values` is applied first: `base`, then `PRESETS[preset]`, then `values`."""
    merged = to_dict(base)

    def update(dst, src, where):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                update(dst[k], v, f"{where}{k}.")
            else:
                dst[k] = v

    preset = values.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
        update(merged, PRESETS[preset], "")
    update(merged, values, "")
    return from_dict(ExperimentConfig, merged)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["training.steps=3", "methods=[local,fedavg]"]` -> nested dict; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _yaml(raw, f"--set {item}")
    return nested


def _yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML (safe: tags never execute); a syntax error names `where` and the
    line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def import_modules(names: typing.Iterable[str]) -> None:
    """Imports every module of `names` (`importlib.import_module`; the working directory comes
    first on the search path, as for `python -m`), e.g. one whose import registers a method."""
    names = list(names)
    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise  # the module exists but one of its own imports is missing
            raise ConfigError(
                f"imports: cannot import module {name!r} ({e}); give a module name importable "
                "from the working directory or PYTHONPATH, e.g. my_methods for ./my_methods.py"
            ) from None


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: ExperimentConfig | None = None,
    preset: str | None = None,
) -> ExperimentConfig:
    """Reads a YAML experiment config (if given) on top of `base` (and the paper `preset`, e.g.
    the command line's `--preset`), then applies overrides."""
    config = base or ExperimentConfig()
    if preset is not None:
        config = merge_base(config, {"preset": preset})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {str(p)!r} is not UTF-8 text (byte {e.start})"
            ) from None
        values = _yaml(text, f"config file {str(p)!r}") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        if preset is not None and values.get("preset", preset) != preset:
            raise ConfigError(
                f"config file {str(p)!r} names preset {values['preset']!r}, the command line "
                f"{preset!r}; keep one"
            )
        if preset is not None:  # already applied under the file's values
            values = {k: v for k, v in values.items() if k != "preset"}
        config = merge_base(config, values)
    if overrides:
        config = merge_base(config, parse_overrides(overrides))
    return config


# What may differ when a run is resumed: its length and how it is presented or saved.
RESUMABLE = ("rounds", "tracking", "checkpoint")


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf field by its dotted path; an empty mapping (e.g. no `method_options`) holds no
    field, so it equals a default filled in beside the saved run's entries."""
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: values}


def resume_differences(saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """`field: saved -> new` for every field where `config` differs from the `config.json` of
    the run it resumes, except those in `RESUMABLE` (`rounds`, `tracking.*`, `checkpoint.*`);
    a field missing from `saved` (written before the field existed) counts as its default."""
    plain = lambda c: _flat(json.loads(json.dumps(to_dict(c))))
    # A field the saved run predates held its default then.
    old, new = {**plain(ExperimentConfig()), **_flat(saved)}, plain(config)
    return [
        f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and key.split(".")[0] not in RESUMABLE
    ]
