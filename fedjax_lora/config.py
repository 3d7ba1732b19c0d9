"""Typed experiment configurations: frozen dataclasses loaded from YAML with dotted overrides.

Every configuration error is raised before any compute starts, naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fedjax_lora.settings import (
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
    family: Literal["gpt2", "llama"] = "gpt2"
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
    """Client data. `synthetic`: the embedded heterogeneous corpus (groups of clients drawn from
    distinct token sources, `overlap` in [0, 1]); `fortunes`: Debian fortune files by topic or
    language (`categories`), tokenized with the model's tokenizer (bytes for a base without
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
    that share of every client's training tokens out as the `aux` evaluation set (FedAMoLE's
    auxiliary split for RSEA; the reference uses 0.05). `shared_eval_tokens > 0` (synthetic)
    adds the `shared_uniform` evaluation set, the same stream from the uniform mixture of all
    sources for every client (out-of-distribution evaluation); `eval_mixture: uniform`
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
    train / `val_fraction` / `test_fraction`; `max_rows` keeps the first rows only. A model without
    tokenizer files reads bytes (`ByteTokenizer`, vocabulary 256)."""

    source: Literal[
        "synthetic",
        "fortunes",
        "ag_news",
        "multilingual_wikipedia",
        "code_wiki",
        "comigs_wikipedia",
        "comigs_slimpajama",
        "comigs_ag_news",
        "dolly",
        "snli",
        "natural_instructions",
    ] = "synthetic"
    num_groups: int = 2
    clients_per_group: int = 2
    tokens_per_client: int = 4096
    overlap: float = 0.0
    categories: tuple[str, ...] = ()
    fortunes_dir: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    aux_fraction: float = 0.0
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
    train_fractions: tuple[float, ...] = ()

    def cohort(self) -> Cohort | None:
        """The per-round client sample (None: every client takes part in every round)."""
        if self.cohort_size < 0:
            raise ValueError(
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
            raise ValueError(
                f"eval.generation.max_new_tokens and max_examples must be >= 1, got "
                f"{self.max_new_tokens}, {self.max_examples}"
            )


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluation windows: at most `max_windows` fixed windows per client and split, processed
    `batch_size` at a time; `generation`: the instruction-task metric per client (instruction
    data sources only; reported as `task_rouge_l` / `task_accuracy`)."""

    max_windows: int = 16
    batch_size: int = 8
    generation: GenerationSpec | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Save the whole simulation every `every` rounds (0: never; the last round is always saved
    when checkpointing is on), keeping the last `keep` checkpoints per method."""

    every: int = 0
    keep: int = 3

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError(
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
    data) loop on the host, one compiled program per level. Empty: the experiment's own value;
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
                raise ValueError(
                    f"sweep.{name} must be a list of numbers, got {values!r}"
                ) from None
            object.__setattr__(self, name, converted)
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"sweep.lrs must be positive, got {self.lrs}")

    def check_seeds(self) -> None:
        """Raises unless `seeds` names at least 2 seeds: a sweep reports mean ± std over them."""
        if len(self.seeds) < 2:
            raise ValueError(
                f"sweep.seeds names {len(self.seeds)} seed(s); a sweep reports mean ± std over "
                "seeds, give at least 2 (e.g. --set 'sweep.seeds=[0,1,2]'; examples: "
                "experiments/configs/sweep_*.yaml)"
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """`method_options`: per method name, keyword options of its factory, e.g.
    `{"comigs": {"expert_counts": [1, 2, 3, 4], "moe": {"num_experts": 4}}}` (mappings become the
    annotated dataclasses; unknown names fail before any compute, listing the accepted ones).
    `imports`: Python modules imported before methods are looked up (`import_modules`), e.g. one
    that `register`s your own method (the CLI's `--import`)."""

    methods: tuple[str, ...] = ("local", "fedavg")
    rounds: int = 10
    seed: int = 0
    model: ModelSpec = ModelSpec()
    lora: LoRAConfig = LoRAConfig(
        targets=("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), rank=8, alpha=16.0
    )
    data: DataSpec = DataSpec()
    training: LocalTraining = LocalTraining(steps=5, batch_size=8, seq_len=32)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-2)
    strategy: Strategy = Strategy()
    eval: EvalSpec = EvalSpec()
    trust: TrustOptions = TrustOptions()
    checkpoint: CheckpointSpec = CheckpointSpec()
    tracking: TrackingSpec = TrackingSpec()
    sweep: SweepSpec = SweepSpec()
    method_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    imports: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not self.methods:
            raise ValueError("methods is empty; name at least one (see `fedjax-lora methods`)")


def convert(tp: Any, value: Any, where: str) -> Any:
    """`value` (YAML data) as the annotated type `tp`, checked; `where` names it in errors.
    Dataclasses are built from mappings (an instance passes as is)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config field {where!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else convert(args[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config field {where!r} must be a mapping, got {value!r}")
        inner = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        items = [value] if isinstance(value, str) else list(value)
        return tuple(items)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"config field {where!r} must be one of {choices}, got {value!r}")
        return value
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads `1e-3` as a string
        except ValueError:
            raise ValueError(f"config field {where!r} must be a number, got {value!r}") from None
    if tp is int and isinstance(value, bool | float) or tp is int and not isinstance(value, int):
        raise ValueError(f"config field {where!r} must be an integer, got {value!r}")
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, rejecting unknown fields by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config field(s) {[prefix + u for u in unknown]}; valid fields of "
            f"{where or 'the experiment'}: {sorted(names)}"
        )
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid config section {where or 'experiment'!r}: {e}") from None


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
    """`base` with the fields in the nested dict `values` replaced (sections merged key by key)."""
    merged = to_dict(base)

    def update(dst, src, where):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                update(dst[k], v, f"{where}{k}.")
            else:
                dst[k] = v

    update(merged, values, "")
    return from_dict(ExperimentConfig, merged)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["training.steps=3", "methods=[local,fedavg]"]` -> nested dict; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return nested


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
            raise ValueError(
                f"imports: cannot import module {name!r} ({e}); give a module name importable "
                "from the working directory or PYTHONPATH, e.g. my_methods for ./my_methods.py"
            ) from None


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: ExperimentConfig | None = None,
) -> ExperimentConfig:
    """Reads a YAML experiment config (if given) on top of `base`, then applies overrides."""
    config = base or ExperimentConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
        config = merge_base(config, values)
    if overrides:
        config = merge_base(config, parse_overrides(overrides))
    return config
