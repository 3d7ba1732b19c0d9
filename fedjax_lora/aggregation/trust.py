r"""Trust rules: row-stochastic `N × N` mixing matrices from what the clients can observe.

Wagner, Fan & Jaggi, "Personalized Collaborative Fine-Tuning for On-Device LLMs", COLM 2024
(arXiv:2404.09753). Row `i` of a trust matrix `W` is what client `i` uses to personalise its
adapters, `θ_i ← Σ_j W[i, j] θ_j` (see `fedjax_lora.aggregation.mix`).

Every rule first builds a score matrix `S` (larger = more trusted), then calls `softmax_trust`:

.. math:: W[i, :] = \operatorname{softmax}\big(\tilde S[i, :] / T\big),

where `S̃` keeps `S` on the entries that survive peer selection and is `-inf` (exactly zero weight)
elsewhere. Peer selection, shared by all rules, follows the reference code's variants:

- `adjacency`: a boolean communication graph (`topology(...)`); self is always allowed. The
  reference's ring branch sets masked scores to `-1e9` before the softmax; we use `-inf`.
- `top_peers=k`: keep the `k` largest allowed scores per row (`*-top-k`, default `k=3` there).
- `threshold=t`: drop scores `≤ t` but always keep the `min_keep=2` largest allowed ones (self
  plus the best peer; `*-thresh`, with `t` = 0.5 for weights, -30 for perplexity, -50 for
  prediction).

Thresholds act on the rule's score before the temperature. Ties at the `k`-th largest score go to
the client itself, then to the lower client index, so a client never loses its own model to an
equally scored peer; the reference's `torch.topk` leaves tie order unspecified.

Rules (the reference's names in brackets):

- `weight_similarity` [`dynamic`, Strategy 1]: mean row-wise cosine between adapters.
- `validation_trust` [`dynamic-ref`, Strategy 2]: `-` perplexity of peer models on own validation.
- `prediction_trust` [`dynamic-token`, Strategy 3]: `-` L1 distance of sparsified logits.
- `oracle_trust` [`static`, "theoretical"]: overlap of the known data mixtures.

All functions are pure and jittable; options are static Python values (the adjacency an array).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "TOPOLOGIES",
    "oracle_trust",
    "prediction_trust",
    "softmax_trust",
    "topology",
    "validation_trust",
    "weight_similarity",
    "weight_similarity_scores",
]

PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST
_COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity default
_L1_EPS = 1e-12  # torch.nn.functional.normalize default


def _ring(n: int) -> np.ndarray:
    offset = (np.arange(n)[:, None] - np.arange(n)[None, :]) % n
    return (offset <= 1) | (offset == n - 1)


TOPOLOGIES = {
    "full": lambda n: np.ones((n, n), bool),
    "ring": _ring,
    "star": lambda n: (np.arange(n)[:, None] == 0) | (np.arange(n)[None, :] == 0),
    "isolated": lambda n: np.zeros((n, n), bool),
}
"""Named communication graphs: `"full"`; `"ring"` (self and the two neighbours `i ± 1 mod n`, the
reference's `rebutal-ring`); `"star"` (client 0 is the hub, leaves talk to the hub only);
`"isolated"` (self only). Self-loops are always added."""


def topology(name: str, n: int) -> np.ndarray:
    """Boolean adjacency `[n, n]` of a named topology (see `TOPOLOGIES`), diagonal set."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; expected one of {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[name](n) | np.eye(n, dtype=bool)


def _top_mask(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the `k` largest entries of each row `i` of `[N, N]` scores; ties go to
    the diagonal entry `i` (the client itself), then to the lower index.

    Row `i` is reordered `[i, 0, …, i-1, i+1, …]` for `lax.top_k` (ties to the lower position)."""
    n = scores.shape[-1]
    row, pos = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    order = jnp.where(pos == 0, row, jnp.where(pos - 1 < row, pos - 1, pos))  # [N, N]
    _, idx = jax.lax.top_k(jnp.take_along_axis(scores, order, -1), min(k, n))
    chosen = jnp.take_along_axis(order, idx, -1)
    return jnp.any(jax.nn.one_hot(chosen, n, dtype=jnp.bool_), axis=-2)


def softmax_trust(
    scores: ArrayLike,
    *,
    temperature: float = 1.0,
    top_peers: int | None = None,
    threshold: float | None = None,
    min_keep: int = 2,
    adjacency: ArrayLike | None = None,
) -> jax.Array:
    r"""Row-wise `softmax(S̃ / T)` of a score matrix after peer selection (module docstring).

    Args:
      scores: `[N, N]`, `scores[i, j]` = how much client `i` trusts client `j`.
      temperature: `T > 0`.
      top_peers: keep only the `k` largest allowed scores per row (self is not forced in, but
        wins ties).
      threshold: drop scores `≤ threshold`, keeping at least the `min_keep` largest allowed ones.
      min_keep: see `threshold` (`≥ 1`, so every row keeps an entry).
      adjacency: boolean `[N, N]`, `True` where client `i` may use client `j`; self always allowed.

    Returns:
      `f32[N, N]`, rows sum to one; entries dropped by the selection are exactly zero.
    """
    scores = jnp.asarray(scores, jnp.float32)
    n = scores.shape[0]
    if adjacency is None:
        keep = jnp.ones((n, n), jnp.bool_)
    else:
        keep = jnp.asarray(adjacency, jnp.bool_) | jnp.eye(n, dtype=jnp.bool_)
    if top_peers is not None:
        keep = keep & _top_mask(jnp.where(keep, scores, -jnp.inf), top_peers)
    if threshold is not None:
        best = _top_mask(jnp.where(keep, scores, -jnp.inf), min_keep)
        keep = keep & ((scores > threshold) | best)
    return jax.nn.softmax(jnp.where(keep, scores, -jnp.inf) / temperature, axis=-1)


def weight_similarity_scores(stacked_adapters: PyTree) -> jax.Array:
    r"""Mean row-wise cosine similarity between every pair of clients' adapters (Strategy 1).

    Every leaf `[N, ..., d]` is read as `R` rows of `d` features (the last axis; `A: (in, r)` gives
    `in` rows of `r`, `B: (r, out)` gives `r` rows of `out`), and

    .. math:: s_{ij} = \frac{1}{R_{tot}} \sum_{\text{leaves}} \sum_{\text{rows } \rho}
       \frac{\langle x_i^\rho, x_j^\rho \rangle}
       {\max(\lVert x_i^\rho \rVert, \epsilon)\,\max(\lVert x_j^\rho \rVert, \epsilon)},
       \qquad \epsilon = 10^{-8},

    as PyTorch's `F.cosine_similarity` (so an all-zero row, e.g. `B` at init, scores 0). With the
    reference's layout this is dominated by the many short `A` rows. Leaves need `ndim ≥ 2`.

    Returns:
      `f32[N, N]`, symmetric, entries in `[-1, 1]`.
    """
    leaves = jax.tree.leaves(stacked_adapters)
    total = jnp.zeros((), jnp.float32)
    rows = 0
    for leaf in leaves:
        x = jnp.asarray(leaf, jnp.float32)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _COS_EPS)
        total = total + jnp.einsum("ird,jrd->ij", x, x, precision=_HIGHEST)
        rows += x.shape[1]
    return total / rows


def weight_similarity(
    stacked_adapters: PyTree,
    temperature: float = 1.0,
    *,
    top_peers: int | None = None,
    threshold: float | None = None,
    min_keep: int = 2,
    adjacency: ArrayLike | None = None,
) -> jax.Array:
    r"""Strategy 1 (`dynamic`): `W = softmax(S / T)` row-wise, `S = weight_similarity_scores(θ)`.

    The reference uses `T = 1` (no temperature): since `s_ii ≤ 1` and `s_ij ≥ -1`, weights stay
    soft (max/min ratio ≤ e²). Selection options: `softmax_trust`.
    """
    return softmax_trust(
        weight_similarity_scores(stacked_adapters),
        temperature=temperature,
        top_peers=top_peers,
        threshold=threshold,
        min_keep=min_keep,
        adjacency=adjacency,
    )


def validation_trust(
    ppl: ArrayLike,
    *,
    use_loss: bool = False,
    temperature: float = 1.0,
    top_peers: int | None = None,
    threshold: float | None = None,
    min_keep: int = 2,
    adjacency: ArrayLike | None = None,
) -> jax.Array:
    r"""Strategy 2 (`dynamic-ref`): trust from peers' perplexity on one's own validation data.

    `ppl[i, j]` is the perplexity of client `j`'s model on client `i`'s validation split, and

    .. math:: W[i, :] = \operatorname{softmax}(-P[i, :] / T)

    on **perplexities**, as the reference does (no temperature there): gaps of a few perplexity
    units make it very peaked. `use_loss=True` uses `log P` (the mean cross-entropy) instead, which
    is much flatter. Thresholds act on `-P` (or `-log P`). Selection options: `softmax_trust`.
    """
    ppl = jnp.asarray(ppl, jnp.float32)
    return softmax_trust(
        -(jnp.log(ppl) if use_loss else ppl),
        temperature=temperature,
        top_peers=top_peers,
        threshold=threshold,
        min_keep=min_keep,
        adjacency=adjacency,
    )


def _sparsify_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep entries `≥` the `k`-th largest of the last axis (all ties kept), zero the rest."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, 0.0)


def prediction_trust(
    logits: ArrayLike,
    top_k: int = 100,
    scale: float = 10.0,
    *,
    top_peers: int | None = None,
    threshold: float | None = None,
    min_keep: int = 2,
    adjacency: ArrayLike | None = None,
) -> jax.Array:
    r"""Strategy 3 (`dynamic-token`): trust from predictions on a shared reference set.

    `logits[j]` are client `j`'s logits at the **last position** of each of `S` shared reference
    windows, `[N, S, V]` (the reference: 4 batches × 50 windows, `S = 200`). Then

    1. sparsify: per window keep the raw logits `≥` the `top_k`-th largest value and set all
       others to 0 (not `-inf`, not probabilities). As the reference's
       `x[x < topk(x, k).values[..., -1]] = 0`, **every entry tied with the `k`-th value is
       kept**, so more than `k` entries may survive;
    2. :math:`d_{ij} = \frac{1}{S}\sum_{s,v} |\tilde L_i[s, v] - \tilde L_j[s, v]|`;
    3. row L1-normalise: :math:`\hat d_{ij} = d_{ij} / \max(\sum_k d_{ik}, 10^{-12})`
       (`F.normalize(D, p=1, dim=1)`);
    4. :math:`W[i, :] = \operatorname{softmax}(-\text{scale} \cdot \hat d_{i, :})`.

    Scores lie in `[-scale, 0]` with the self entry 0. Computed in f32 (the reference's logits are
    bf16 under autocast). Pairwise distances are mapped over rows, so memory is `O(N·S·V)`.
    Thresholds act on `-scale·D̂`. Selection options: `softmax_trust`.
    """
    sparse = _sparsify_top_k(jnp.asarray(logits, jnp.float32), top_k)
    dist = jax.lax.map(lambda row: jnp.abs(row[None] - sparse).sum(axis=(1, 2)), sparse)
    dist = dist / sparse.shape[1]
    dist = dist / jnp.maximum(jnp.abs(dist).sum(axis=1, keepdims=True), _L1_EPS)
    return softmax_trust(
        -scale * dist,
        top_peers=top_peers,
        threshold=threshold,
        min_keep=min_keep,
        adjacency=adjacency,
    )


def oracle_trust(
    mixtures: ArrayLike,
    *,
    top_peers: int | None = None,
    threshold: float | None = None,
    min_keep: int = 2,
    adjacency: ArrayLike | None = None,
) -> jax.Array:
    r"""Oracle ("theoretical", `static`) trust from the clients' known data mixtures.

    `mixtures[i, k] ≥ 0` is client `i`'s share (or token count) of domain `k`, `[N, K]`. Trust is
    the row-normalised overlap

    .. math:: W[i, j] = \frac{\langle m_i, m_j \rangle}{\sum_l \langle m_i, m_l \rangle},

    computed as `softmax(log M Mᵀ)` so that zero overlap gets exactly zero weight and the
    selection options apply (thresholds act on the log-overlap). Shares give data-size-independent
    weights; token counts also weight peers by their amount of data.

    The paper's matrices were hand-coded per dataset and only partly agree with this definition:
    one-domain clients (`*_specific`: uniform over same-domain clients) match exactly; for the
    `*_mixed` splits the reference used e.g. 3/4 self + 1/4 partner (AG News) or `3/(2N)` vs
    `1/(2N)` (Code-Wiki), and its `three_multi_mixed` matrix is not even row-stochastic.
    """
    m = jnp.asarray(mixtures, jnp.float32)
    overlap = jnp.einsum("ik,jk->ij", m, m, precision=_HIGHEST)
    return softmax_trust(
        jnp.log(overlap),
        top_peers=top_peers,
        threshold=threshold,
        min_keep=min_keep,
        adjacency=adjacency,
    )
