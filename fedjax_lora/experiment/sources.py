"""The one registry of data sources: `register_source(name, builder, doc=..., fields=...)`.

A registered source is a builder `(config, vocab_size, tokenizer) -> FederatedData` (`tokenizer`:
the base's, None for the tiny random base or a checkpoint without tokenizer files;
`text_tokenizer` turns that into UTF-8 bytes where the vocabulary allows) and what it reads and
requires: the `DataSpec` fields it reads (`fields`; `fedjax-lora sources` and docs/api.md list
them), whether it reads text with a tokenizer (`text`; False: it makes token ids itself, as the
synthetic corpus), whether it builds `data.eval_mixture=uniform` (`uniform_eval`), whether it
yields the instruction task `eval.generation` scores (`task`), and its own `check(config)` (e.g.
fortunes needs `data.categories`). `experiment.build_data` looks `data.source` up, checks it
(`checked_source`), builds it, then applies what every source shares (`data.train_fractions`,
the check against the sequence length and vocabulary).

JAX-free: the builders import the data pipeline when called, so the config checks `data.source`
against `SOURCES` before JAX loads. A module named in the config's `imports:` (the CLI's
`--import`) registers a source of its own as it registers a method.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedjax_lora.config import DataSpec, ExperimentConfig
from fedjax_lora.errors import ConfigError

if TYPE_CHECKING:
    from fedjax_lora.data import FederatedData

__all__ = [
    "SIDE_DATA",
    "SOURCES",
    "Builder",
    "SourceSpec",
    "checked_source",
    "describe_sources",
    "get_source",
    "register_source",
    "side_data_fix",
    "text_tokenizer",
]

Builder = Callable[[ExperimentConfig, int, Any], "FederatedData"]
"""`(config, vocab_size, tokenizer) -> FederatedData`: a source's clients as `config.data`
describes them (`tokenizer`: the base's, or None)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A registered data source: `builder(config, vocab_size, tokenizer) -> FederatedData`, a
    one-line `doc`, the `DataSpec` `fields` it reads (besides those every source shares:
    `train_fractions`, `aux_fraction`, `cohort_*`), whether it reads `text` with a tokenizer,
    builds `data.eval_mixture=uniform` (`uniform_eval`), yields an instruction `task` for
    `eval.generation`, `check(config)`: its own requirements, raising `ConfigError`, and the side
    data it `provides` for the methods that declare them (`SideData`): `"reference"` (a held-out
    reference set of `data.reference_sequences` windows, prediction trust) and `"mixtures"` (the
    clients' known domain mixtures, the oracle)."""

    name: str
    builder: Builder
    doc: str
    fields: tuple[str, ...] = ()
    text: bool = True
    uniform_eval: bool = False
    task: bool = False
    check: Callable[[ExperimentConfig], None] | None = None
    provides: tuple[str, ...] = ()

    def __call__(self, config: ExperimentConfig, vocab_size: int, tokenizer: Any) -> FederatedData:
        return self.builder(config, vocab_size, tokenizer)

    @property
    def supports(self) -> tuple[str, ...]:
        """What only some sources build: `data.eval_mixture=uniform`, `eval.generation`, the side
        data it `provides`."""
        settings = ("data.eval_mixture=uniform",) * self.uniform_eval
        side = tuple(f"side data: {what}" for what in self.provides)
        return settings + ("eval.generation",) * self.task + side


SIDE_DATA = ("reference", "mixtures")
"""The side data a source may provide beyond its splits (`SourceSpec.provides`)."""

SOURCES: dict[str, SourceSpec] = {}
"""Every registered data source by name (this module registers the library's)."""


def register_source(
    name: str,
    builder: Builder,
    *,
    doc: str | None = None,
    fields: tuple[str, ...] = (),
    text: bool = True,
    uniform_eval: bool = False,
    task: bool = False,
    check: Callable[[ExperimentConfig], None] | None = None,
    provides: tuple[str, ...] = (),
) -> SourceSpec:
    """Registers `builder` as `data.source: name`. `doc`: one line for `fedjax-lora sources`
    (default: the first sentence of the builder's docstring); `fields`: the `DataSpec` fields it
    reads; `text`: it reads text with the base's tokenizer (False: token ids of its own);
    `uniform_eval`: it builds `data.eval_mixture=uniform`; `task`: its data carries the
    instruction task of `eval.generation`; `check(config)`: its own requirements, raising
    `ConfigError` before anything is built; `provides`: the side data its `FederatedData` holds
    (`"reference"`, `"mixtures"`; `SourceSpec`)."""
    unknown = sorted(set(provides) - set(SIDE_DATA))
    if unknown:
        raise ValueError(f"data source {name!r}: provides {unknown}, not among {SIDE_DATA}")
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is already registered")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(DataSpec)})
    if unknown:
        raise ValueError(f"data source {name!r}: fields {unknown} are not DataSpec fields")
    if doc is None:
        words = " ".join((getattr(builder, "__doc__", None) or "").split())
        doc = words.split(". ")[0].rstrip(".")
    spec = SourceSpec(
        name, builder, doc, tuple(fields), text, uniform_eval, task, check, tuple(provides)
    )
    SOURCES[name] = spec
    return spec


def get_source(name: str) -> SourceSpec:
    """The registered source `name`; an unknown name raises one line listing the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(
            f"config field 'data.source' must be a registered data source {tuple(SOURCES)}, got "
            f"{name!r}; a module named in imports: (--import) may register_source its own"
        ) from None


def side_data_fix(what: str) -> str:
    """How to obtain side data `what` ("reference", "mixtures"): the registered sources that
    provide it (`SourceSpec.provides`)."""
    providers = ", ".join(name for name, spec in SOURCES.items() if what in spec.provides)
    if what == "reference":
        return (
            f"set data.reference_sequences > 0 with a source that holds out a reference set "
            f"({providers}), or drop the method"
        )
    return f"choose a source with known client mixtures ({providers}), or drop the method"


def checked_source(config: ExperimentConfig) -> SourceSpec:
    """The registered source of `config.data.source` with its requirements checked: the
    source's own `check`, `data.eval_mixture=uniform` only where it is built (`uniform_eval`),
    `eval.generation` only for a source with a `task`."""
    spec = get_source(config.data.source)
    if config.data.eval_mixture == "uniform" and not spec.uniform_eval:
        where = " or ".join(name for name, s in SOURCES.items() if s.uniform_eval)
        raise ConfigError(
            f"data.eval_mixture=uniform is built for data.source {where}, not {spec.name!r}; "
            "use data.eval_mixture=own (or comigs_ag_news for CoMiGS's out-of-distribution "
            "setting on real data)"
        )
    if config.eval.generation is not None and not spec.task:
        tasks = tuple(name for name, s in SOURCES.items() if s.task)
        raise ConfigError(
            f"eval.generation needs an instruction data source {tasks}, got "
            f"data.source={spec.name!r}; unset eval.generation"
        )
    if spec.check is not None:
        spec.check(config)
    return spec


def describe_sources(sources: dict[str, SourceSpec] | None = None) -> str:
    """`fedjax-lora sources`: every registered source with its doc and the `data.*` fields it
    reads."""
    sources = SOURCES if sources is None else sources
    lines = []
    for name, spec in sources.items():
        lines.append(f"{name}  {spec.doc}")
        lines.append(f"    reads: {', '.join(f'data.{f}' for f in spec.fields) or '-'}")
        if spec.supports:
            lines.append(f"    supports: {', '.join(spec.supports)}")
    return "\n".join(lines)


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


def _synthetic(config: ExperimentConfig, vocab_size: int, tokenizer: Any) -> FederatedData:
    """The embedded heterogeneous corpus: groups of clients drawn from distinct Markov token
    sources (`fedjax_lora.data.synthetic_corpus`)."""
    from fedjax_lora.data import synthetic_corpus

    del tokenizer  # token ids of its own
    spec, seq = config.data, config.training.seq_len
    per_split = spec.tokens_per_client
    return synthetic_corpus(
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


def _fortunes(config: ExperimentConfig, vocab_size: int, tokenizer: Any) -> FederatedData:
    """Debian fortune files by language or topic (`data.categories`), `clients_per_group`
    clients per category; the last fortunes of each category are held out of every client as
    the shared reference set (prediction trust)."""
    from fedjax_lora.data import build_federated, fortunes, reference_windows, uniform_evaluation

    spec = config.data
    tokenizer = text_tokenizer(config, tokenizer, vocab_size)
    root = spec.fortunes_dir or fortunes.FORTUNES_ROOT
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


def _needs_categories(config: ExperimentConfig) -> None:
    if not config.data.categories:
        raise ConfigError(
            "data.categories is empty; name fortune languages (en, de, ...) or topics"
        )


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


def _paper_splits(config: ExperimentConfig, vocab_size: int, tokenizer: Any) -> FederatedData:
    """A trust-weighted or CoMiGS paper split (`from_spec` of `fedjax_lora.data.trust_datasets`
    or `comigs_datasets`, by `data.source`)."""
    from fedjax_lora.data import comigs_datasets, trust_datasets

    spec = config.data
    builders = comigs_datasets if spec.source in comigs_datasets.DATASETS else trust_datasets
    seq = config.training.seq_len
    return builders.from_spec(spec, tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq)


def _instruction_data(
    config: ExperimentConfig,
    vocab_size: int,
    tokenizer: Any,
    *,
    load: Callable[[DataSpec, dict[str, str]], Any],
    partition: str,
) -> FederatedData:
    """FedAMoLE's instruction data (`fedjax_lora.data.instruction`) of the pairs `load(spec,
    kw)` reads (`kw`: `source=paths[0]` when given), partitioned by `partition`; the tiny random
    base reads bytes."""
    from fedjax_lora.data import instruction

    spec, gen = config.data, config.eval.generation
    tokenizer = text_tokenizer(config, tokenizer, vocab_size)
    pairs = load(spec, {"source": spec.paths[0]} if spec.paths else {})
    return instruction.instruction_data(
        pairs,
        tokenizer,
        vocab_size=vocab_size,
        num_clients=spec.num_clients,
        partition=partition,
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


def _dolly(spec: DataSpec, kw: dict[str, str]) -> Any:
    from fedjax_lora.data import datasets_hf

    return datasets_hf.load_dolly(limit=spec.max_rows, **kw)


def _snli(spec: DataSpec, kw: dict[str, str]) -> Any:
    from fedjax_lora.data import datasets_hf

    # the unlabelled rows count in the reference's partition
    return datasets_hf.load_snli(limit=spec.max_rows, unlabelled=True, **kw)


def _natural_instructions(spec: DataSpec, kw: dict[str, str]) -> Any:
    from fedjax_lora.data import datasets_hf

    return datasets_hf.load_natural_instructions(num_tasks=spec.num_tasks, **kw)


_SPLIT = ("val_fraction", "test_fraction", "seed")
register_source(
    "synthetic",
    _synthetic,
    fields=(
        "num_groups",
        "clients_per_group",
        "tokens_per_client",
        "overlap",
        "reference_sequences",
        "shared_eval_tokens",
        "eval_mixture",
        *_SPLIT,
    ),
    doc="the embedded heterogeneous corpus: groups of clients drawn from distinct Markov token "
    "sources (`data.overlap` shared between groups)",
    text=False,
    uniform_eval=True,
    provides=("reference", "mixtures"),
)
register_source(
    "fortunes",
    _fortunes,
    fields=(
        "categories",
        "fortunes_dir",
        "encodings",
        "clients_per_group",
        "reference_sequences",
        "eval_mixture",
        *_SPLIT,
    ),
    doc="Debian fortune files, `clients_per_group` clients per language or topic of "
    "`categories`, the last fortunes of each held out as the shared reference set",
    uniform_eval=True,
    check=_needs_categories,
    provides=("reference",),
)
# The trust-weighted and CoMiGS splits: `from_spec` of their data module reads `data.source`.
_TRUST = ("variant", "paper_bug_compatible", "paths", "clients_per_group", "reference_sequences")
_TRUST_POOLS = (*_TRUST, "tokens_per_client", "val_fraction", "seed")
_COMIGS = ("paths", "clients_per_group", "tokens_per_client", *_SPLIT)
_TRUST_SIDE = ("reference", "mixtures")
register_source(
    "ag_news",
    _paper_splits,
    doc="the trust-weighted paper's AG News split (`trust_datasets.ag_news`)",
    fields=_TRUST,
    provides=_TRUST_SIDE,
)
register_source(
    "multilingual_wikipedia",
    _paper_splits,
    doc="the trust-weighted paper's German / Italian / French Wikipedia split "
    "(`trust_datasets.multilingual_wikipedia`)",
    fields=_TRUST_POOLS,
    provides=_TRUST_SIDE,
)
register_source(
    "code_wiki",
    _paper_splits,
    doc="the trust-weighted paper's English Wikipedia / Java code split "
    "(`trust_datasets.code_wiki`)",
    fields=_TRUST_POOLS,
    provides=_TRUST_SIDE,
)
register_source(
    "comigs_wikipedia",
    _paper_splits,
    doc="CoMiGS's users, one Wikipedia language each (`comigs_datasets.wikipedia`)",
    fields=("categories", *_COMIGS),
    provides=("mixtures",),
)
register_source(
    "comigs_slimpajama",
    _paper_splits,
    doc="CoMiGS's users, one SlimPajama subset each (`comigs_datasets.slimpajama`)",
    fields=("categories", *_COMIGS),
    provides=("mixtures",),
)
register_source(
    "comigs_ag_news",
    _paper_splits,
    doc="CoMiGS's users, one AG News class each for training, every class in validation and "
    "test (out-of-distribution; `comigs_datasets.ag_news`)",
    fields=_COMIGS,
    provides=("mixtures",),
)
_INSTRUCTION = ("paths", "num_clients", "aux_fraction", "instruction_packing", *_SPLIT)
register_source(
    "dolly",
    functools.partial(_instruction_data, load=_dolly, partition="dirichlet"),
    doc="FedAMoLE's Dolly-15k clients, Dirichlet(`alpha`) over categories",
    fields=(*_INSTRUCTION, "alpha", "max_rows"),
    task=True,
)
register_source(
    "snli",
    functools.partial(_instruction_data, load=_snli, partition="dirichlet"),
    doc="FedAMoLE's SNLI clients, Dirichlet(`alpha`) over the labels",
    fields=(*_INSTRUCTION, "alpha", "max_rows"),
    task=True,
)
register_source(
    "natural_instructions",
    functools.partial(_instruction_data, load=_natural_instructions, partition="task"),
    doc="FedAMoLE's Natural Instructions clients, one task each of the `num_tasks` largest",
    fields=(*_INSTRUCTION, "num_tasks"),
    task=True,
)
