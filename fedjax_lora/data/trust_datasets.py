"""The client splits of the trust-weighted paper (Wagner, Fan & Jaggi, COLM 2024; spec §3.4).

Every dataset is a set of *domains* (AG News classes; Wikipedia languages; English Wikipedia and
Java), each tokenized into a train pool and a validation pool (documents joined by one space, no
EOS, as the reference's `" ".join(texts)`). A client is a list of `(domain, tokens)` pieces per
split; pieces are cut consecutively from each pool (a cursor per pool), so no two clients share
tokens. Each builder returns `FederatedData` with the clients' known `mixtures` (train-token shares
per domain, for oracle trust) and the shared `reference` windows `[S, seq_len]` of prediction
trust. The paper has no test split: `test` is the validation split (its reported metric).

Intended mixtures by default; `paper_bug_compatible=True` reproduces the reference code's splits:

- `multilingual_wikipedia("mixed")`: the minority chunk comes from the *same* language (every
  "mixed" client is monolingual);
- `code_wiki("mixed")`: every client is 630k wiki + 210k code (IID) instead of alternating;
- `ag_news`: the reference set is clients 0–3's validation streams (the rebuttal's `ref =
  val_data`; for `specific` that covers World and Sports only) instead of all four classes.

Simplifications (documented in docs/trust_weighted.md): clients take consecutive *token* ranges
of a language's pool rather than 1,500-article ranges truncated to 840k tokens; AG News classes
are cut by token fractions rather than article counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from fedjax_lora.data import datasets_hf
from fedjax_lora.data.domains import article_pools, assemble, domain_tokens
from fedjax_lora.data.federated import FederatedData
from fedjax_lora.data.streams import reference_windows

__all__ = [
    "DATASETS",
    "ag_news",
    "code_wiki",
    "from_spec",
    "multilingual_wikipedia",
]

Variant = Literal["mixed", "specific"]
LANGUAGES = ("de", "it", "fr")


def _check_variant(variant: str) -> None:
    if variant not in ("mixed", "specific"):
        raise ValueError(f"variant must be 'mixed' or 'specific', got {variant!r}")


def ag_news(
    variant: Variant,
    *,
    tokenizer: Any,
    vocab_size: int,
    source: str = datasets_hf.AG_NEWS,
    clients_per_class: int = 2,
    paper_bug_compatible: bool = False,
    reference_sequences: int = 200,
    seq_len: int = 512,
    limit: int | None = None,
) -> FederatedData:
    """AG News (train split → train pools, test split → validation pools, per class).

    `specific`: `4 · clients_per_class` clients (8 in the paper); client `i` holds part
    `i % clients_per_class` of class `i // clients_per_class`. `mixed`: 4 clients; clients `2g`
    and `2g + 1` share classes `2g, 2g + 1` (World/Sports, Business/Sci-Tech) as `[¼, ¾]` and
    `[¾, ¼]`, train and validation alike. Reference: `reference_sequences / 4` windows from each
    class's validation pool (after the clients' shares, when any is left) or, bug-compatible,
    from clients 0–3's validation streams.
    """
    _check_variant(variant)
    classes = datasets_hf.AG_NEWS_LABELS
    pools = {}
    for split, hf_split in (("train", "train"), ("val", "test")):
        data = datasets_hf.load_ag_news(source, split=hf_split, limit=limit)
        for k, name in enumerate(classes):
            texts = [t for t, y in zip(data.texts, data.labels, strict=True) if y == k]
            pools[(name, split)] = domain_tokens(texts, tokenizer, vocab_size)
    size = {key: len(v) for key, v in pools.items()}
    if variant == "specific":
        c = clients_per_class
        plan = [
            {s: [(classes[i // c], size[(classes[i // c], s)] // c)] for s in ("train", "val")}
            for i in range(4 * c)
        ]
        names = [f"{classes[i // c]}-{i % c}" for i in range(4 * c)]
    else:
        plan, names = [], []
        for g in range(2):
            a, b = classes[2 * g], classes[2 * g + 1]
            for major, minor in ((b, a), (a, b)):
                plan.append(
                    {
                        s: [(major, 3 * size[(major, s)] // 4), (minor, size[(minor, s)] // 4)]
                        for s in ("train", "val")
                    }
                )
                names.append(f"{major}+{minor}")
    data = assemble(pools, plan, domains=classes, names=names, vocab_size=vocab_size)
    if paper_bug_compatible:
        parts = [data.val.stream(j) for j in range(4)]
    else:
        parts = [pools[(name, "val")] for name in classes]
    per = reference_sequences // 4
    reference = np.concatenate([reference_windows(p, per, seq_len) for p in parts])
    return FederatedData(**{**vars(data), "reference": reference})


def _wiki_pools(
    language: str,
    source: str,
    rng: np.random.Generator,
    tokenizer: Any,
    vocab_size: int,
    sample_fraction: float,
    val_fraction: float,
    limit: int | None,
) -> dict[tuple[str, str], np.ndarray]:
    articles = datasets_hf.load_wikipedia(language, source, limit=limit)
    train, val = article_pools(articles, rng, sample_fraction, val_fraction)
    return {
        (language, "train"): domain_tokens(train, tokenizer, vocab_size),
        (language, "val"): domain_tokens(val, tokenizer, vocab_size),
    }


def multilingual_wikipedia(
    variant: Variant,
    *,
    tokenizer: Any,
    vocab_size: int,
    sources: Sequence[str] | None = None,
    clients_per_language: int = 3,
    train_tokens: int = 840_000,
    val_tokens: int = 160_000,
    reference_tokens: int = 300_000,
    reference_sequences: int = 200,
    seq_len: int = 512,
    paper_bug_compatible: bool = False,
    sample_fraction: float = 0.2,
    val_fraction: float = 0.16,
    limit: int | None = None,
    seed: int = 0,
) -> FederatedData:
    """Multilingual Wikipedia (de, it, fr; `sources` in that order, default the hub).

    Client `i` has language `a = i % 3` (9 clients in the paper). `specific`: `train_tokens` /
    `val_tokens` of language `a`. `mixed` (intended): `¾` of language `a` and `¼` of language
    `a + 1 (mod 3)` in both splits, i.e. mixtures `[¾, ¼, 0], [0, ¾, ¼], [¼, 0, ¾]`;
    bug-compatible: both chunks from language `a`. Reference: `reference_tokens` of each
    language's validation pool after the clients' ranges, in the order fr, de, it.
    """
    _check_variant(variant)
    rng = np.random.default_rng(seed)
    sources = sources or [datasets_hf.WIKIPEDIA] * 3
    pools = {}
    for lang, src in zip(LANGUAGES, sources, strict=True):
        pools |= _wiki_pools(
            lang, src, rng, tokenizer, vocab_size, sample_fraction, val_fraction, limit
        )
    n = 3 * clients_per_language
    plan = []
    for i in range(n):
        a = LANGUAGES[i % 3]
        if variant == "specific":
            plan.append({"train": [(a, train_tokens)], "val": [(a, val_tokens)]})
            continue
        b = a if paper_bug_compatible else LANGUAGES[(i + 1) % 3]
        plan.append(
            {
                s: [(a, total - total // 4), (b, total // 4)]
                for s, total in (("train", train_tokens), ("val", val_tokens))
            }
        )
    names = [f"{LANGUAGES[i % 3]}-{i // 3}" for i in range(n)]
    return assemble(
        pools,
        plan,
        domains=LANGUAGES,
        names=names,
        vocab_size=vocab_size,
        reference_plan=[(lang, "val", reference_tokens) for lang in ("fr", "de", "it")],
        reference_sequences=reference_sequences,
        seq_len=seq_len,
    )


def code_wiki(
    variant: Variant,
    *,
    tokenizer: Any,
    vocab_size: int,
    wiki_source: str = datasets_hf.WIKIPEDIA,
    code_source: str = datasets_hf.GITHUB_CODE,
    num_clients: int = 8,
    train_tokens: int = 840_000,
    val_tokens: int = 160_000,
    reference_tokens: int = 500_000,
    reference_sequences: int = 200,
    seq_len: int = 512,
    code_offset: int = 20_000_000,
    code_files: int = 50_000,
    paper_bug_compatible: bool = False,
    sample_fraction: float = 0.2,
    val_fraction: float = 0.16,
    limit: int | None = None,
    seed: int = 0,
) -> FederatedData:
    """English Wikipedia and Java (the first `code_files` Java files joined into one stream).

    `specific`: even clients are Wikipedia, odd ones Java. `mixed` (intended): even clients `¾`
    wiki + `¼` code, odd clients `¼` wiki + `¾` code; bug-compatible: every client `¾` wiki + `¼`
    code (IID). Code train and validation slices are consecutive from token `code_offset` of the
    Java stream; the reference is `reference_tokens` of the wiki validation pool after the
    clients' ranges plus the first `reference_tokens` Java tokens (before `code_offset`).
    """
    _check_variant(variant)
    rng = np.random.default_rng(seed)
    pools = _wiki_pools(
        "en", wiki_source, rng, tokenizer, vocab_size, sample_fraction, val_fraction, limit
    )
    java = domain_tokens(
        datasets_hf.load_github_code(code_source, limit=code_files), tokenizer, vocab_size
    )
    if code_offset < reference_tokens:
        raise ValueError(
            f"code_offset={code_offset} must leave room for the {reference_tokens} Java reference "
            "tokens before the clients' code"
        )
    plan, names = [], []
    for i in range(num_clients):
        wiki_major = (paper_bug_compatible and variant == "mixed") or i % 2 == 0
        major, minor = ("en", "java") if wiki_major else ("java", "en")
        names.append(f"{'wiki' if wiki_major else 'code'}-{i}")
        if variant == "specific":
            plan.append({"train": [(major, train_tokens)], "val": [(major, val_tokens)]})
        else:
            plan.append(
                {
                    s: [(major, total - total // 4), (minor, total // 4)]
                    for s, total in (("train", train_tokens), ("val", val_tokens))
                }
            )
    code_train = sum(n for p in plan for d, n in p["train"] if d == "java")
    pools[("java", "ref")] = java[:code_offset]
    pools[("java", "train")] = java[code_offset : code_offset + code_train]
    pools[("java", "val")] = java[code_offset + code_train :]
    return assemble(
        pools,
        plan,
        domains=("en", "java"),
        names=names,
        vocab_size=vocab_size,
        reference_plan=[("en", "val", reference_tokens), ("java", "ref", reference_tokens)],
        reference_sequences=reference_sequences,
        seq_len=seq_len,
    )


DATASETS = {
    "ag_news": ag_news,
    "multilingual_wikipedia": multilingual_wikipedia,
    "code_wiki": code_wiki,
}
"""The paper's dataset builders by `DataSpec.source` name."""


def from_spec(spec: Any, *, tokenizer: Any, vocab_size: int, seq_len: int) -> FederatedData:
    """The dataset a `config.DataSpec` names (`source`, `variant`, `paper_bug_compatible`,
    `paths`, `clients_per_group`, `tokens_per_client`, `val_fraction`, `reference_sequences`,
    `seed`). `paths`: AG News `[source]`; multilingual `[de, it, fr]`; Code-Wiki `[wiki, code]`;
    empty: the hub datasets."""
    if tokenizer is None:
        raise ValueError(
            f"data.source={spec.source!r} needs a real tokenizer: set model.source to a Hugging "
            "Face directory, hub id or .gguf file"
        )
    common = {
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "paper_bug_compatible": spec.paper_bug_compatible,
        "reference_sequences": spec.reference_sequences,
        "seq_len": seq_len,
    }
    paths = list(spec.paths)
    if spec.source == "ag_news":
        kw = {"source": paths[0]} if paths else {}
        return ag_news(spec.variant, clients_per_class=spec.clients_per_group, **common, **kw)
    budget = {
        "train_tokens": spec.tokens_per_client,
        "val_tokens": int(spec.tokens_per_client * spec.val_fraction),
        "seed": spec.seed,
    }
    if spec.source == "multilingual_wikipedia":
        return multilingual_wikipedia(
            spec.variant,
            sources=paths or None,
            clients_per_language=spec.clients_per_group,
            **common,
            **budget,
        )
    kw = dict(zip(("wiki_source", "code_source"), paths, strict=False))
    return code_wiki(spec.variant, num_clients=2 * spec.clients_per_group, **common, **budget, **kw)
