"""Partitioners: which examples (indices into a labelled dataset) each client holds.

Every partitioner returns `list[np.ndarray]`, one int64 index array per client; clients are
disjoint. Negative labels (e.g. SNLI's -1, "no gold label") are never assigned.
`category_proportions` turns a partition back into its realised `[N, K]` mixture matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _categories(labels: np.ndarray, categories: Sequence[int] | None) -> list[int]:
    if categories is not None:
        return [int(c) for c in categories]
    return [int(c) for c in np.unique(labels) if c >= 0]


def _indices_of(labels: np.ndarray, category: int, rng: np.random.Generator | None) -> np.ndarray:
    idx = np.flatnonzero(labels == category).astype(np.int64)
    if rng is not None:
        rng.shuffle(idx)
    return idx


def _check_nonempty(parts: list[np.ndarray], how: str) -> list[np.ndarray]:
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"client {i} ends up with no data under {how}; use fewer clients")
    return parts


def specific(
    labels: np.ndarray,
    num_clients: int,
    *,
    categories: Sequence[int] | None = None,
    interleave: bool = False,
    seed: int | None = None,
) -> list[np.ndarray]:
    """One category per group of `num_clients // K` clients; each category's data split evenly.

    Client i holds category `categories[i // per]` (blocked) or `categories[i % K]`
    (`interleave=True`); within a category its examples (in dataset order, or shuffled with `seed`)
    are cut into `per` contiguous, near-equal chunks (`np.array_split`). `categories` defaults to
    the sorted non-negative labels present.
    """
    labels = np.asarray(labels)
    cats = _categories(labels, categories)
    k = len(cats)
    if k == 0:
        raise ValueError("no categories: labels are empty or all negative")
    if num_clients < k or num_clients % k:
        raise ValueError(
            f"num_clients={num_clients} is not divisible across the {k} categories {cats}; "
            f"use a multiple of {k}"
        )
    per = num_clients // k
    rng = None if seed is None else np.random.default_rng(seed)
    chunks = [np.array_split(_indices_of(labels, c, rng), per) for c in cats]
    parts = [
        chunks[i % k][i // k] if interleave else chunks[i // per][i % per]
        for i in range(num_clients)
    ]
    return _check_nonempty(parts, f"specific({k} categories x {per} clients)")


def check_proportions(proportions: np.ndarray, num_categories: int | None = None) -> np.ndarray:
    """Validate a mixture matrix `[N, K]` (non-negative, finite, rows summing to 1)."""
    p = np.asarray(proportions, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"proportion matrix must be 2-D [clients, categories], got {p.shape}")
    if num_categories is not None and p.shape[1] != num_categories:
        raise ValueError(
            f"proportion matrix has {p.shape[1]} columns but there are {num_categories} categories"
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("proportion matrix entries must be finite and non-negative")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
    if bad.size:
        raise ValueError(
            f"proportion matrix rows must sum to 1; row {int(bad[0])} sums to {sums[bad[0]]:.6g}"
        )
    return p


def largest_remainder(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts `[..., K]` summing to `total` along the last axis, closest to
    `proportions * total` (largest-remainder rounding)."""
    raw = np.asarray(proportions, dtype=np.float64) * total
    counts = np.floor(raw + 1e-9).astype(np.int64)
    rest = total - counts.sum(axis=-1, keepdims=True)
    rank = np.argsort(np.argsort(-(raw - counts), axis=-1, kind="stable"), axis=-1)
    return counts + (rank < rest)


def mixed(
    labels: np.ndarray,
    proportions: np.ndarray,
    *,
    categories: Sequence[int] | None = None,
    samples_per_client: int | None = None,
    seed: int | None = None,
) -> list[np.ndarray]:
    """Client i draws `m` examples, `≈ m * proportions[i, k]` of category k (disjointly).

    Counts are largest-remainder rounded per client, so every client holds exactly `m` and its
    realised proportions are within `1/m` of the requested ones. `m` defaults to the largest size
    the data supports (about `min_k n_k / sum_i proportions[i, k]`). Each category's examples
    (dataset order, or shuffled with `seed`) are handed out as consecutive chunks in client order.
    """
    labels = np.asarray(labels)
    cats = _categories(labels, categories)
    p = check_proportions(proportions, len(cats))
    rng = None if seed is None else np.random.default_rng(seed)
    pools = [_indices_of(labels, c, rng) for c in cats]
    sizes = np.array([len(x) for x in pools], dtype=np.int64)
    demand = p.sum(axis=0)
    used = demand > 0
    m = int(np.floor(np.min(sizes[used] / demand[used]) + 1e-9))
    if samples_per_client is not None:
        if samples_per_client > m:
            raise ValueError(
                f"samples_per_client={samples_per_client} exceeds what the data supports ({m}) "
                "for these proportions"
            )
        m = samples_per_client
    counts = largest_remainder(p, m)
    while m > 0 and np.any(counts.sum(axis=0) > sizes):  # rounding overshoot: shrink m
        if samples_per_client is not None:
            raise ValueError(
                f"samples_per_client={m} exceeds what the data supports after rounding"
            )
        m -= 1
        counts = largest_remainder(p, m)
    offsets = np.concatenate([np.zeros((1, len(cats)), np.int64), np.cumsum(counts, axis=0)])
    parts = [
        np.concatenate([pools[k][offsets[i, k] : offsets[i + 1, k]] for k in range(len(cats))])
        for i in range(p.shape[0])
    ]
    return _check_nonempty(parts, f"mixed(samples_per_client={m})")


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int | np.random.RandomState,
    *,
    num_classes: int | None = None,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet label-skew partition with FedAMoLE's size-balancing rule.

    As `partition_idx_dir` in FedAMoLE's `data/hete_partition.py`, with the legacy NumPy stream
    `np.random.RandomState(seed)` in the same call order (so it equals the reference after
    `np.random.seed(seed)`): for each class k = 0..K-1, shuffle its indices, draw
    `q ~ Dir(alpha * 1_N)`, zero the share of every client whose current size is already
    >= len(labels) / N, renormalise, and split the class at `cumsum(q) * n_k` (truncated).
    The whole draw repeats until every client has >= `min_size` examples. Finally each client's
    indices are shuffled. Labels outside 0..K-1 (e.g. -1) are never assigned but count in
    len(labels), as in the reference. `seed` may be a `np.random.RandomState`, drawn from and
    advanced (the reference's global stream continues into its per-client splits).
    """
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    assignable = int(np.sum((labels >= 0) & (labels < k)))
    if assignable < num_clients * min_size:
        raise ValueError(
            f"{assignable} labelled examples cannot give {num_clients} clients >= {min_size} "
            "each; use fewer clients or a smaller min_size"
        )
    rs = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
    cap = labels.shape[0] / num_clients
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in range(k):
            idx = np.where(labels == c)[0]
            rs.shuffle(idx)
            q = rs.dirichlet(np.repeat(alpha, num_clients))
            q = np.array([qi * (len(part) < cap) for qi, part in zip(q, parts, strict=True)])
            q = q / q.sum()
            cuts = (np.cumsum(q) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            break
    else:
        raise ValueError(
            f"no Dirichlet(alpha={alpha}) partition gave every one of {num_clients} clients "
            f">= {min_size} examples in {max_tries} draws; raise alpha or use fewer clients"
        )
    out = []
    for part in parts:
        rs.shuffle(part)
        out.append(np.asarray(part, dtype=np.int64))
    return out


def category_proportions(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_categories: int | None = None
) -> np.ndarray:
    """Realised mixture matrix `[N, K]`: the fraction of client i's examples with label k."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if num_categories is None else num_categories
    out = np.zeros((len(parts), k), dtype=np.float64)
    for i, part in enumerate(parts):
        if len(part):
            out[i] = np.bincount(labels[np.asarray(part)], minlength=k)[:k] / len(part)
    return out
