"""Clients cut from per-domain token pools: what the papers' dataset builders share.

A *domain* is a language, a news class, a SlimPajama subset, ... Each domain's documents are
tokenized into pools per split (`domain_tokens`: documents joined by one space, no EOS, as the
references' `" ".join(texts)`). A *plan* lists, per client and split, `(domain, tokens)` pieces;
`assemble` cuts them consecutively from the pools (one cursor per pool), so no two clients share
tokens, and records each client's train-token shares per domain (`mixtures`, oracle trust).
Used by `trust_datasets` (Wagner et al.) and `comigs_datasets` (Fan et al.).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_lora.data.federated import FederatedData, build_federated
from fedjax_lora.data.streams import reference_windows
from fedjax_lora.data.tokenize import tokenize_texts

__all__ = ["Plan", "article_pools", "assemble", "domain_tokens", "split_articles"]

Plan = Sequence[Mapping[str, Sequence[tuple[str, int]]]]
"""Per client `{"train": [(domain, tokens), ...], "val": [...], "test": [...] (optional)}`."""


def domain_tokens(texts: Sequence[str], tokenizer: Any, vocab_size: int) -> np.ndarray:
    """One domain's documents as one token stream, joined by a space (no EOS)."""
    return tokenize_texts(list(texts), tokenizer, vocab_size=vocab_size, separator="space")


class _Cursors:
    """Consecutive, non-overlapping slices of named pools."""

    def __init__(self, pools: Mapping[tuple[str, str], np.ndarray]):
        self.pools = pools
        self.pos = dict.fromkeys(pools, 0)

    def take(self, domain: str, split: str, n: int) -> np.ndarray:
        key = (domain, split)
        if key not in self.pools:
            raise ValueError(f"no {split} pool for domain {domain!r}; pools: {sorted(self.pools)}")
        lo, pool = self.pos[key], self.pools[key]
        if lo + n > len(pool):
            raise ValueError(
                f"the {split} pool of {domain!r} has {len(pool)} tokens, {lo} already given out; "
                f"{n} more are needed: load more documents or ask for fewer tokens per client"
            )
        self.pos[key] = lo + n
        return pool[lo : lo + n]


def assemble(
    pools: Mapping[tuple[str, str], np.ndarray],
    plan: Plan,
    *,
    domains: Sequence[str],
    names: Sequence[str],
    vocab_size: int,
    reference_plan: Sequence[tuple[str, str, int]] = (),
    reference_sequences: int = 0,
    seq_len: int = 0,
) -> FederatedData:
    """Clients cut from token pools.

    pools: `{(domain, split): stream}` with split `"train"`/`"val"`/`"test"` (a pool may be shared
      by several splits).
    plan: per client `{"train": [(domain, tokens), ...], "val": [...], "test": [...]}`, allocated
      in order; without `"test"` the test split is the validation split (the trust-weighted paper
      reports validation perplexity).
    reference_plan: `(domain, split, tokens)` pieces taken *after* all clients (held out from
      them) and joined into the reference stream, from which `reference_sequences` evenly spread
      windows of `seq_len` tokens are cut (`reference_windows`; equal numbers per piece).
    mixtures: `m[i, k]` = client `i`'s share of its train tokens from `domains[k]`.
    """
    cursors = _Cursors(pools)
    clients, mix = [], np.zeros((len(plan), len(domains)))
    for i, pieces in enumerate(plan):
        streams = {}
        for split in ("train", "val", "test"):
            if split not in pieces:
                continue
            parts = [cursors.take(d, split, n) for d, n in pieces[split]]
            streams[split] = np.concatenate(parts).astype(np.int32)
        for d, n in pieces["train"]:
            mix[i, list(domains).index(d)] += n
        clients.append({"test": streams["val"], **streams})
    reference = None
    if reference_plan:
        per_piece = reference_sequences // len(reference_plan)
        if per_piece < 1:
            raise ValueError(
                f"reference_sequences={reference_sequences} < {len(reference_plan)} reference "
                "pieces; ask for more reference sequences"
            )
        reference = np.concatenate(
            [
                reference_windows(cursors.take(d, s, n), per_piece, seq_len)
                for d, s, n in reference_plan
            ]
        )
    return build_federated(
        clients,
        vocab_size=vocab_size,
        client_names=names,
        mixtures=mix / mix.sum(axis=1, keepdims=True),
        reference=reference,
    )


def article_pools(
    articles: Sequence[str], rng: np.random.Generator, sample_fraction: float, val_fraction: float
) -> tuple[list[str], list[str]]:
    """The trust-weighted reference's article protocol: sample `sample_fraction` of the articles
    without replacement (0.2), then split them `1 - val_fraction` / `val_fraction` (0.84 / 0.16)
    into the train and validation pools."""
    n = len(articles)
    chosen = rng.choice(n, size=max(int(round(sample_fraction * n)), 2), replace=False)
    cut = int(round((1 - val_fraction) * len(chosen)))
    return [articles[i] for i in chosen[:cut]], [articles[i] for i in chosen[cut:]]


def split_articles(
    articles: Sequence[str], rng: np.random.Generator, fractions: Sequence[float]
) -> list[list[str]]:
    """The articles shuffled and cut into consecutive groups of the given `fractions` (summing
    to 1; each group gets at least one article): e.g. train / validation / test pools."""
    fractions = np.asarray(fractions, np.float64)
    if np.any(fractions <= 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions.tolist()}")
    if len(articles) < len(fractions):
        raise ValueError(
            f"{len(articles)} documents cannot fill {len(fractions)} splits; load more documents"
        )
    order = rng.permutation(len(articles))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(articles)).astype(int)
    cuts = np.clip(cuts, np.arange(1, len(cuts) + 1), len(articles) - np.arange(len(cuts), 0, -1))
    return [[articles[i] for i in part] for part in np.split(order, cuts)]
