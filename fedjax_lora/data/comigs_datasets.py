"""The client splits of CoMiGS (Fan, Messmer, Doikov & Jaggi, ICML 2025; spec-comigs §4).

Four users, one category each, with train / validation / test token streams (the router trains
on validation, the tables report test perplexity):

- `wikipedia`: Multilingual Wikipedia, one language per user (de, fr, it, nl); in-distribution.
- `slimpajama`: SlimPajama, one subset per user (StackExchange, GitHub, ArXiv, Book);
  in-distribution.
- `ag_news`: AG News, *out-of-distribution*: user `i` trains on class `i`, but its validation and
  test streams are a uniform mixture of all four classes (disjoint pieces per user).

The data-prep scripts of the paper are not public (spec §4): documents are shuffled and cut into
train / validation / test pools (`split_fractions`), each user takes consecutive token ranges of
its category's pools (`fedjax_lora.data.domains.assemble`, no two users share tokens), as
`data_path/<n>/{train,valid,test}_<i>.bin` flat streams would hold them. `clients_per_category >
1` gives several users per category (the data-quantity experiments).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fedjax_lora.data import datasets_hf
from fedjax_lora.data.domains import assemble, domain_tokens, split_articles
from fedjax_lora.data.federated import FederatedData

__all__ = [
    "DATASETS",
    "LANGUAGES",
    "SLIMPAJAMA_CATEGORIES",
    "Budget",
    "ag_news",
    "from_spec",
    "slimpajama",
    "wikipedia",
]

LANGUAGES = ("de", "fr", "it", "nl")
SLIMPAJAMA_CATEGORIES = (
    "RedPajamaStackExchange",
    "RedPajamaGithub",
    "RedPajamaArXiv",
    "RedPajamaBook",
)
SPLITS = ("train", "val", "test")


class Budget(NamedTuple):
    """Tokens per user and split, users per category, how documents are split into the train /
    validation / test pools (in-distribution datasets), and the shuffling seed."""

    clients_per_category: int = 1
    train_tokens: int = 1_000_000
    val_tokens: int = 100_000
    test_tokens: int = 100_000
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0


def _in_distribution(
    texts_by_domain: dict[str, Sequence[str]], tokenizer: Any, vocab_size: int, budget: Budget
) -> FederatedData:
    """User `i` holds category `i // clients_per_category` in all three splits."""
    domains = list(texts_by_domain)
    rng = np.random.default_rng(budget.seed)
    pools = {}
    for domain, texts in texts_by_domain.items():
        parts = split_articles(texts, rng, budget.split_fractions)
        for split, part in zip(SPLITS, parts, strict=True):
            pools[(domain, split)] = domain_tokens(part, tokenizer, vocab_size)
    tokens = {"train": budget.train_tokens, "val": budget.val_tokens, "test": budget.test_tokens}
    c = budget.clients_per_category
    n = len(domains) * c
    plan = [{s: [(domains[i // c], tokens[s])] for s in SPLITS} for i in range(n)]
    names = [f"{domains[i // c]}-{i % c}" for i in range(n)]
    return assemble(pools, plan, domains=domains, names=names, vocab_size=vocab_size)


def wikipedia(
    *,
    tokenizer: Any,
    vocab_size: int,
    languages: Sequence[str] = LANGUAGES,
    sources: Sequence[str] | None = None,
    budget: Budget = Budget(),
    limit: int | None = None,
) -> FederatedData:
    """Multilingual Wikipedia, one language per user (`sources`: one local file or hub id per
    language, default the hub's `wikimedia/wikipedia`)."""
    sources = list(sources or [datasets_hf.WIKIPEDIA] * len(languages))
    if len(sources) != len(languages):
        raise ValueError(f"{len(sources)} sources for {len(languages)} languages {list(languages)}")
    texts = {
        lang: datasets_hf.load_wikipedia(lang, src, limit=limit)
        for lang, src in zip(languages, sources, strict=True)
    }
    return _in_distribution(texts, tokenizer, vocab_size, budget)


def slimpajama(
    *,
    tokenizer: Any,
    vocab_size: int,
    categories: Sequence[str] = SLIMPAJAMA_CATEGORIES,
    source: str = datasets_hf.SLIMPAJAMA,
    budget: Budget = Budget(),
    limit: int | None = None,
) -> FederatedData:
    """SlimPajama, one subset (`meta.redpajama_set_name`) per user."""
    data = datasets_hf.load_slimpajama(source, categories=list(categories), limit=limit)
    texts = {
        name: [t for t, y in zip(data.texts, data.labels, strict=True) if y == k]
        for k, name in enumerate(data.label_names)
    }
    return _in_distribution(texts, tokenizer, vocab_size, budget)


def ag_news(
    *,
    tokenizer: Any,
    vocab_size: int,
    source: str = datasets_hf.AG_NEWS,
    budget: Budget = Budget(),
    limit: int | None = None,
) -> FederatedData:
    """AG News out-of-distribution: user `i` trains on class `i // clients_per_category` (from
    the hub's train split); its validation and test streams hold `val_tokens / 4` and
    `test_tokens / 4` of every class (from the hub's test split, shuffled and halved into
    validation and test pools; `split_fractions` does not apply)."""
    classes = datasets_hf.AG_NEWS_LABELS
    rng = np.random.default_rng(budget.seed)
    pools = {}
    train = datasets_hf.load_ag_news(source, split="train", limit=limit)
    held = datasets_hf.load_ag_news(source, split="test", limit=limit)
    of_class = lambda data, k: [t for t, y in zip(data.texts, data.labels, strict=True) if y == k]
    for k, name in enumerate(classes):
        pools[(name, "train")] = domain_tokens(of_class(train, k), tokenizer, vocab_size)
        val, test = split_articles(of_class(held, k), rng, (0.5, 0.5))
        pools[(name, "val")] = domain_tokens(val, tokenizer, vocab_size)
        pools[(name, "test")] = domain_tokens(test, tokenizer, vocab_size)
    c = budget.clients_per_category
    n = len(classes) * c
    share = lambda total: [(name, total // len(classes)) for name in classes]
    plan = [
        {
            "train": [(classes[i // c], budget.train_tokens)],
            "val": share(budget.val_tokens),
            "test": share(budget.test_tokens),
        }
        for i in range(n)
    ]
    names = [f"{classes[i // c]}-{i % c}" for i in range(n)]
    return assemble(pools, plan, domains=classes, names=names, vocab_size=vocab_size)


DATASETS = {
    "comigs_wikipedia": wikipedia,
    "comigs_slimpajama": slimpajama,
    "comigs_ag_news": ag_news,
}
"""The paper's dataset builders by `DataSpec.source` name."""


def from_spec(spec: Any, *, tokenizer: Any, vocab_size: int, seq_len: int) -> FederatedData:
    """The dataset a `config.DataSpec` names: `source`, `categories` (languages or SlimPajama
    subsets; empty: the paper's four), `paths` (Wikipedia: one per language; SlimPajama and AG
    News: `[source]`; empty: the hub), `clients_per_group` users per category,
    `tokens_per_client` train tokens and `val_fraction` / `test_fraction` of it for validation and
    test, `seed`."""
    if tokenizer is None:
        raise ValueError(
            f"data.source={spec.source!r} needs a real tokenizer: set model.source to a Hugging "
            "Face directory, hub id or .gguf file"
        )
    kwargs = {
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "budget": Budget(
            clients_per_category=spec.clients_per_group,
            train_tokens=spec.tokens_per_client,
            val_tokens=max(int(spec.tokens_per_client * spec.val_fraction), seq_len + 1),
            test_tokens=max(int(spec.tokens_per_client * spec.test_fraction), seq_len + 1),
            seed=spec.seed,
        ),
    }
    paths = list(spec.paths)
    if spec.source == "comigs_wikipedia":
        if spec.categories:
            kwargs["languages"] = tuple(spec.categories)
        return wikipedia(sources=paths or None, **kwargs)
    if len(paths) > 1:
        raise ValueError(f"data.paths for {spec.source!r} takes one source, got {paths}")
    if paths:
        kwargs["source"] = paths[0]
    if spec.source == "comigs_slimpajama":
        if spec.categories:
            kwargs["categories"] = tuple(spec.categories)
        return slimpajama(**kwargs)
    if spec.categories:
        raise ValueError("data.categories does not apply to comigs_ag_news (always 4 classes)")
    return ag_news(**kwargs)
