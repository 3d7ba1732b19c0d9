"""A synthetic heterogeneous corpus with known ground truth: the embedded default for demos and
tests.

G groups of clients; group g's text comes from its own sparse first-order Markov chain over V
tokens (each token has `branching` successors, drawn with Zipf-like weights over a group-specific
ranking of the vocabulary). `overlap` in [0, 1] mixes every group's chain with one common chain:
the transition matrix of group g is `(1 - overlap) * T_g + overlap * T_common` (and likewise the
start distribution), so overlap 0 gives distinct groups and overlap 1 identical ones. Clients may
also draw from several sources at once (`mixtures [N, G]`, document by document). Everything is
NumPy, vectorised over documents, and deterministic from `seed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fedjax_lora.data.federated import FederatedData, build_federated
from fedjax_lora.data.partition import check_proportions, largest_remainder
from fedjax_lora.data.streams import reference_windows


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovSources:
    """G group chains plus a common chain (index G), stored sparsely.

    `successors int32 [G+1, V, B]` and `cumprobs f64 [G+1, V, B]` (row-wise cumulative transition
    probabilities, last entry exactly 1); `start_cumprobs f64 [G+1, V]` the cumulative start
    distributions.
    """

    successors: np.ndarray
    cumprobs: np.ndarray
    start_cumprobs: np.ndarray
    overlap: float

    @property
    def num_groups(self) -> int:
        return self.successors.shape[0] - 1

    @property
    def vocab_size(self) -> int:
        return self.successors.shape[1]

    def _dense(self, src: int) -> np.ndarray:
        v = self.vocab_size
        probs = np.diff(self.cumprobs[src], axis=1, prepend=0.0)
        dense = np.zeros((v, v))
        np.add.at(dense, (np.arange(v)[:, None], self.successors[src]), probs)
        return dense

    def transition_matrix(self, group: int) -> np.ndarray:
        """Group `group`'s dense effective transition matrix `[V, V]` (rows sum to 1)."""
        o = self.overlap
        return (1 - o) * self._dense(group) + o * self._dense(self.num_groups)

    def start_distribution(self, group: int) -> np.ndarray:
        """Group `group`'s effective start (first-token) distribution `[V]`."""
        start = np.diff(self.start_cumprobs, axis=1, prepend=0.0)
        return (1 - self.overlap) * start[group] + self.overlap * start[self.num_groups]

    def sample(self, doc_groups: np.ndarray, doc_len: int, rng: np.random.Generator) -> np.ndarray:
        """Documents `int32 [D, doc_len]`, document d drawn from group `doc_groups[d]`'s chain."""
        doc_groups = np.asarray(doc_groups, dtype=np.int64)
        d, v, b = doc_groups.shape[0], self.vocab_size, self.successors.shape[2]
        src = np.where(
            rng.random((d, doc_len)) < self.overlap, self.num_groups, doc_groups[:, None]
        )
        u = rng.random((d, doc_len))
        out = np.empty((d, doc_len), dtype=np.int32)
        # Start tokens: one searchsorted over the row-offset flattened cumulative tables.
        flat = (self.start_cumprobs + np.arange(self.num_groups + 1)[:, None]).ravel()
        first = np.searchsorted(flat, src[:, 0] + u[:, 0], side="right") - src[:, 0] * v
        out[:, 0] = np.minimum(first, v - 1)
        for t in range(1, doc_len):
            prev, s = out[:, t - 1], src[:, t]
            choice = np.minimum((u[:, t, None] >= self.cumprobs[s, prev]).sum(axis=1), b - 1)
            out[:, t] = self.successors[s, prev, choice]
        return out


def _zipf_weights(vocab_size: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights `1 / rank^exponent` over a random ranking of the vocabulary, normalised."""
    w = 1.0 / np.arange(1, vocab_size + 1) ** exponent
    w = w[rng.permutation(vocab_size)]
    return w / w.sum()


def make_markov_sources(
    num_groups: int,
    vocab_size: int,
    *,
    overlap: float = 0.0,
    branching: int = 8,
    zipf_exponent: float = 1.1,
    seed: int = 0,
) -> MarkovSources:
    """Draw G group chains and the common chain.

    Per source: a Zipf-like unigram over its own random ranking; each row's `branching`
    successors are drawn (with replacement; a repeat merges its mass) with those weights and get
    probabilities proportional to weight x Exp(1) noise; the start distribution is the unigram.
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must lie in [0, 1], got {overlap}")
    if not 1 <= branching <= vocab_size:
        raise ValueError(f"branching must lie in [1, vocab_size={vocab_size}], got {branching}")
    rng = np.random.default_rng(seed)
    g1 = num_groups + 1
    successors = np.empty((g1, vocab_size, branching), dtype=np.int32)
    cumprobs = np.empty((g1, vocab_size, branching))
    start = np.empty((g1, vocab_size))
    for g in range(g1):
        w = _zipf_weights(vocab_size, zipf_exponent, rng)
        start[g] = np.cumsum(w)
        succ = np.searchsorted(start[g], rng.random((vocab_size, branching)), side="right")
        succ = np.minimum(succ, vocab_size - 1)
        p = w[succ] * rng.exponential(size=succ.shape)
        successors[g] = succ
        cumprobs[g] = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    cumprobs[..., -1] = 1.0
    start[:, -1] = 1.0
    return MarkovSources(successors, cumprobs, start, float(overlap))


def _mixed_stream(
    sources: MarkovSources,
    proportions: np.ndarray,
    num_tokens: int,
    doc_len: int,
    rng: np.random.Generator,
) -> np.ndarray:
    num_docs = -(-num_tokens // doc_len)
    doc_groups = np.repeat(np.arange(len(proportions)), largest_remainder(proportions, num_docs))
    rng.shuffle(doc_groups)
    return sources.sample(doc_groups, doc_len, rng).ravel()[:num_tokens]


def synthetic_corpus(
    num_groups: int = 4,
    clients_per_group: int = 2,
    *,
    vocab_size: int = 512,
    overlap: float = 0.0,
    train_tokens: int = 20_000,
    val_tokens: int = 4_000,
    test_tokens: int = 4_000,
    mixtures: np.ndarray | None = None,
    branching: int = 8,
    zipf_exponent: float = 1.1,
    doc_len: int = 128,
    shared_eval_tokens: int = 0,
    reference_shape: Sequence[int] | None = (16, 64),
    eval_mixture: str = "own",
    seed: int = 0,
) -> FederatedData:
    """A federated corpus of `num_groups * clients_per_group` clients.

    Client i belongs to group `i // clients_per_group` and, by default, draws all its documents
    from that group's source (`mixtures` = one-hot). An explicit `mixtures [N, G]` makes client i
    draw documents from source g in proportion `mixtures[i, g]` (largest-remainder rounded per
    split); its group is then the argmax. `shared_eval_tokens > 0` adds `shared_eval["uniform"]`,
    a stream from the uniform mixture of all sources (out-of-distribution evaluation), and
    `reference_shape = (S, T)` a reference set drawn from the same uniform mixture.
    `eval_mixture="uniform"` draws every client's validation and test streams from the uniform
    mixture instead of its own (CoMiGS's out-of-distribution setting: train on one source, target
    them all); `"own"` (default) from the client's training mixture.
    """
    if eval_mixture not in ("own", "uniform"):
        raise ValueError(f"eval_mixture must be 'own' or 'uniform', got {eval_mixture!r}")
    n = num_groups * clients_per_group
    if n < 1:
        raise ValueError(f"need >= 1 client, got {num_groups} groups x {clients_per_group}")
    if mixtures is None:
        mix = np.repeat(np.eye(num_groups), clients_per_group, axis=0)
        groups = np.repeat(np.arange(num_groups), clients_per_group)
    else:
        mix = check_proportions(mixtures, num_groups)
        if mix.shape[0] != n:
            raise ValueError(f"mixtures has {mix.shape[0]} rows for {n} clients")
        groups = np.argmax(mix, axis=1)
    sources = make_markov_sources(
        num_groups,
        vocab_size,
        overlap=overlap,
        branching=branching,
        zipf_exponent=zipf_exponent,
        seed=seed,
    )
    rng = np.random.default_rng([seed, 1])
    uniform = np.full(num_groups, 1.0 / num_groups)
    target = lambda i: uniform if eval_mixture == "uniform" else mix[i]
    clients = [
        {
            name: _mixed_stream(
                sources, target(i) if name != "train" else mix[i], tokens, doc_len, rng
            )
            for name, tokens in (
                ("train", train_tokens),
                ("val", val_tokens),
                ("test", test_tokens),
            )
        }
        for i in range(n)
    ]
    shared = None
    if shared_eval_tokens > 0:
        shared = {"uniform": _mixed_stream(sources, uniform, shared_eval_tokens, doc_len, rng)}
    reference = None
    if reference_shape is not None:
        s, t = reference_shape
        reference = reference_windows(_mixed_stream(sources, uniform, s * t, doc_len, rng), s, t)
    names = [f"g{groups[i]}c{i}" for i in range(n)]
    return build_federated(
        clients,
        vocab_size=vocab_size,
        client_names=names,
        groups=groups,
        mixtures=mix,
        shared_eval=shared,
        reference=reference,
    )
