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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from fedjax_lora.aggregation.core import Aggregator, Inputs, fedavg
from fedjax_lora.aggregation.ranks import map_ranked, truncate
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
    keep: float = 0.99, self_prune: bool = True, reference_weights: bool = False
) -> Aggregator:
    """HetLoRA's server (module docstring): self-pruning with ratio `keep` (`γ`; off with
    `self_prune=False`), sparsity-weighted aggregation of the zero-padded ranked LoRAs, truncation
    to each client's rank; other leaves averaged uniformly. State: `HetLoRAState`."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"HetLoRA keep ratio must be in (0, 1], got {keep}")

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

    def apply(stacked_tree: PyTree, state: HetLoRAState, inputs: Inputs | None = None):
        del inputs
        server = {}

        def ranked(path, a, b, scale):
            active = scale > 0
            if self_prune:
                tail = jax.vmap(tail_mask, (0, None))(active, keep)
                own = jax.vmap(tail_norm_product)(a, b, tail)
                last = jax.vmap(tail_norm_product, (None, None, 0))(*state.server[path], tail)
                active = active & ~((own < last)[:, None] & tail)
                scale = jnp.where(active, scale, jnp.zeros((), scale.dtype))
            a, b = truncate(a, b, active)
            if reference_weights:
                norms = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), (1, 2)))
                p_a, p_b = _normalize(norms(a)), _normalize(norms(b))
            else:
                p_a = p_b = sparsity_weights(a, b, scale)
            server[path] = (_weighted_sum(p_a, a), _weighted_sum(p_b, b))
            full = lambda g, x: jnp.broadcast_to(g.astype(x.dtype), x.shape)
            a, b = truncate(full(server[path][0], a), full(server[path][1], b), active)
            return a, b, scale

        return map_ranked(stacked_tree, ranked, fedavg(stacked_tree)), HetLoRAState(server)

    return Aggregator(init, apply)
