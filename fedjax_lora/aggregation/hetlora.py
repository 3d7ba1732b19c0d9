r"""HetLoRA (Cho, Liu, Manoel, Joshi, Sim & Dimitriadis, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024; the CoMiGS baseline, spec §3 Table 2)
over zero-padded ranked LoRAs (`fedjax_lora.aggregation.ranks`).

**Rank self-pruning.** With `r` a client's current rank of a module and `k = max(⌊γ r⌋, 1)`, its
tail is the ranks `k..r-1`; the local regulariser is

.. math:: λ_p\, \lVert A_{:, k:r} \rVert_F \, \lVert B_{k:r, :} \rVert_F

(`tail_norm_product`, summed over the ranked modules; `RankedLoRA` sows it), and at upload a client
whose tail product is smaller than the server's (last round's global factors, same ranks) drops its
tail: rank `r → k`, the dropped ranks held at zero from then on (`rank_scale` set to 0). (The
CoMiGS reference's regulariser keeps the tail of the client's *initial* rank, which is zero after
the first prune; here, as in the paper, it is the current rank's. `k ≥ 1`: the reference would
prune a rank-1 client to rank 0 and fail.)

**Sparsity-weighted aggregation.** Global factors `A_g = Σ_i p_i A_i`, `B_g = Σ_i p_i B_i` over the
zero-padded uploads with `p_i = ‖ΔW_i‖_F / Σ_j ‖ΔW_j‖_F`, `ΔW_i = A_i diag(m_i) B_i` the client's
update (the paper). `reference_weights=True`: the CoMiGS reference's per-matrix weights
`‖A_i‖_F / Σ_j ‖A_j‖_F` for `A` and `‖B_i‖_F / Σ_j ‖B_j‖_F` for `B`. All-zero norms fall back to
`1/N`.

**Truncation.** Client `i` receives `A_g`, `B_g` truncated to its (possibly pruned) rank. Every
other leaf (the fixed-rank attention LoRA) is the uniform mean; `rank_scale` changes only by
pruning.

**A global rule** (`rule`: the run's `aggregation.reduction` or `aggregation.dp`, through
`ranks.rule_reduce`) replaces the sparsity-weighted sum, after self-pruning, by a rule over the
clients' zero-padded, truncated factors and other leaves: the coordinate-wise median or trimmed
mean of each rank coordinate over the clients *holding* that rank (`robust.py`'s
`inputs["present"]`: a rank only high-rank clients hold is their median, not pulled to the others'
zero padding; a rank nobody holds is 0); Krum's distances over the padded factors (well defined:
a rank a client lacks is its 0 for everyone); DP-FedAvg (`dp.py`) clipping each client's whole
update of its rank-`r_i` factors and other leaves,

.. math:: U_i = θ_i − θ_i^{start}, \qquad
    (A_g, B_g, \dots) = \frac1n \sum_i \big(θ_i^{start} + U_i \min(1, C/\lVert U_i\rVert)\big)
    + \mathcal N(0, (zC/n)^2),

`θ_i^{start}` the factors it started from (last round's `A_g`, `B_g` truncated to its rank; its
own pruning is part of its update), the noise on every entry of `A_g [in, r_max]`,
`B_g [r_max, out]` and the other leaves. The sparsity weights are dropped under any rule: they
depend on every client's private `‖ΔW_i‖`, so one client would move all weights and the sum's
sensitivity would not be `C/n` (DP-FedAvg's uniform mean, the sensitivity the accountant's `ε`
assumes; the robust rules ignore weights). The ranks the clients keep travel without DP, as their
ranks do. `reference_weights` only changes those weights (refused with a rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from fedjax_lora.aggregation.core import Aggregator, Inputs, fedavg
from fedjax_lora.aggregation.ranks import (
    RuledState,
    from_view,
    map_ranked,
    ranked_view,
    rule_reduce,
    truncate,
)
from fedjax_lora.typing import PyTree

__all__ = [
    "HetLoRAState",
    "hetlora_aggregator",
    "sparsity_weights",
    "tail_mask",
    "tail_norm_product",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class HetLoRAState(NamedTuple):
    """server: per ranked module (dotted path), the last global factors `(A_g [in, r_max],
    B_g [r_max, out])` (zeros before the first aggregation: the server's init has `B = 0`, so
    its tail product is 0 and nobody prunes in round 1)."""

    server: dict[str, tuple[jax.Array, jax.Array]]


def tail_mask(active: Bool[Array, " r"], keep: float) -> Bool[Array, " r"]:
    """`bool [r]`: the tail ranks `max(⌊keep · r⌋, 1) .. r-1` of a client with active ranks
    `active bool [r]` (a prefix, `r = Σ active`)."""
    rank = jnp.sum(active)
    kept = jnp.maximum(jnp.floor(keep * rank.astype(jnp.float32)).astype(rank.dtype), 1)
    return active & (jnp.arange(active.shape[-1]) >= kept)


def tail_norm_product(
    a: Float[Array, "d_in r"], b: Float[Array, "r d_out"], tail: Bool[Array, " r"]
) -> Float[Array, ""]:
    """`‖A[:, tail]‖_F · ‖B[tail, :]‖_F` of one client's `a [in, r]`, `b [r, out]`; zero gradient
    where a norm is 0 (`optax.safe_norm`)."""
    norm_a = optax.safe_norm(jnp.where(tail[None, :], a, 0.0).astype(jnp.float32), 0.0)
    norm_b = optax.safe_norm(jnp.where(tail[:, None], b, 0.0).astype(jnp.float32), 0.0)
    return norm_a * norm_b


def _normalize(norms: jax.Array) -> jax.Array:
    total = jnp.sum(norms)
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, norms / safe, 1.0 / norms.shape[0])


def sparsity_weights(
    a: Float[Array, "n d_in r"], b: Float[Array, "n r d_out"], scale: Float[Array, "n r"]
) -> Float[Array, " n"]:
    """`p [N]`, `p_i ∝ ‖A_i diag(scale_i) B_i‖_F` for stacked `a [N, in, r]`, `b [N, r, out]`,
    `scale [N, r]`, via `‖A B‖_F² = Σ_{rs} (AᵀA)_{rs} (B Bᵀ)_{rs}` (no `[in, out]` product)."""
    a = a.astype(jnp.float32) * scale[:, None, :]
    gram_a = jnp.einsum("nir,nis->nrs", a, a, precision=_HIGHEST)
    gram_b = jnp.einsum(
        "nro,nso->nrs", b.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST
    )
    return _normalize(jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b, (1, 2)), 0.0)))


def _weighted_sum(p: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.einsum("n,n...->...", p, x.astype(jnp.float32), precision=_HIGHEST)


def hetlora_aggregator(
    keep: float = 0.99,
    self_prune: bool = True,
    reference_weights: bool = False,
    rule: Aggregator | None = None,
) -> Aggregator:
    """HetLoRA's server (module docstring): self-pruning with ratio `keep` (`γ`; off with
    `self_prune=False`), sparsity-weighted aggregation of the zero-padded ranked LoRAs, truncation
    to each client's rank; other leaves averaged uniformly. `rule`: a global rule over the
    truncated factors of the holders in place of the weighted sum (state `RuledState` around
    `HetLoRAState`). State: `HetLoRAState`."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"HetLoRA keep ratio must be in (0, 1], got {keep}")
    if rule is not None and reference_weights:
        raise ValueError("HetLoRA: reference_weights are weights of the sum a rule replaces")

    def init(stacked_tree: PyTree) -> HetLoRAState:
        server = {}

        def zeros(path, a, b, scale):
            server[path] = (
                jnp.zeros(a.shape[1:], jnp.float32),
                jnp.zeros(b.shape[1:], jnp.float32),
            )
            return a, b, scale

        map_ranked(stacked_tree, zeros)
        return HetLoRAState(server)

    def pruned(stacked_tree: PyTree, state: HetLoRAState) -> PyTree:
        """Every ranked module self-pruned against `state`'s factors, truncated to its ranks."""

        def ranked(path, a, b, scale):
            active = scale > 0
            if self_prune:
                tail = jax.vmap(tail_mask, (0, None))(active, keep)
                own = jax.vmap(tail_norm_product)(a, b, tail)
                last = jax.vmap(tail_norm_product, (None, None, 0))(*state.server[path], tail)
                active = active & ~((own < last)[:, None] & tail)
                scale = jnp.where(active, scale, jnp.zeros((), scale.dtype))
            return *truncate(a, b, active), scale

        return map_ranked(stacked_tree, ranked)

    def received(server: dict) -> Callable:
        """The ranked map giving every client `server`'s factors truncated to its rank."""

        def ranked(path, a, b, scale):
            full = lambda g, x: jnp.broadcast_to(g.astype(x.dtype), x.shape)
            return *truncate(full(server[path][0], a), full(server[path][1], b), scale > 0), scale

        return ranked

    def apply(stacked_tree: PyTree, state: HetLoRAState, inputs: Inputs | None = None):
        del inputs
        tree = pruned(stacked_tree, state)
        server = {}

        def weighted(path, a, b, scale):
            if reference_weights:
                norms = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), (1, 2)))
                p_a, p_b = _normalize(norms(a)), _normalize(norms(b))
            else:
                p_a = p_b = sparsity_weights(a, b, scale)
            server[path] = (_weighted_sum(p_a, a), _weighted_sum(p_b, b))
            return a, b, scale

        map_ranked(tree, weighted)
        return map_ranked(tree, received(server), fedavg(tree)), HetLoRAState(server)

    if rule is None:
        return Aggregator(init, apply)

    factors = lambda path, a, b, scale: (a, b)
    holders = lambda path, a, b, scale: ((scale > 0)[:, None, :], (scale > 0)[:, :, None])

    def ruled_init(stacked_tree: PyTree) -> RuledState:
        view = ranked_view(stacked_tree, factors)
        return RuledState(init(stacked_tree), rule.init(view), stacked_tree)

    def ruled(stacked_tree: PyTree, state: RuledState, inputs: Inputs | None = None):
        del inputs
        tree = pruned(stacked_tree, state.own)
        consensus, rule_state = rule_reduce(rule, tree, state, factors, holders)
        f32 = lambda x: x[0].astype(jnp.float32)
        server = {path: (f32(a), f32(b)) for path, (a, b) in consensus["ranked"].items()}
        out = from_view(tree, received(server), consensus["rest"])
        return out, RuledState(HetLoRAState(server), rule_state, out)

    return Aggregator(ruled_init, ruled)
