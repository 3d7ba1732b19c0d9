r"""Client-level differential privacy of the aggregate: per-client clipping and Gaussian noise.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018): each of the `n` participating clients' update of the global part, relative to the global
tree :math:`θ` it received, is clipped in L2 norm over the whole global part,

.. math:: Δ_i = θ_i − θ, \qquad \tilde Δ_i = Δ_i \min\!\left(1, \frac{C}{\lVert Δ_i \rVert_2}
   \right),

the clipped clients :math:`θ + \tilde Δ_i` go through the inner rule (the uniform mean: one
client changes it by at most `C/n`; `inputs["weights"]` is not passed on), and Gaussian noise
:math:`\mathcal N(0, (z_Δ C / n)^2)` is added to the global part of the result (the same draw for
every client: it is one server model). The noise key is carried in the state.

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021, Algorithm 1): with target quantile `γ`, each client also reports
:math:`b_i = 1[\lVert Δ_i \rVert \le C]`, the server forms the noisy fraction
:math:`\bar b = (\sum_i b_i + \mathcal N(0, σ_b^2)) / n` and updates
:math:`C ← C \exp(−η_C (\bar b − γ))`. The privacy cost of the count is paid from the same budget:
for the total noise multiplier `z` (the one the accountant sees) the update's is
:math:`z_Δ = (z^{−2} − (2 σ_b)^{−2})^{−1/2}`, defined for :math:`2σ_b > z`. The paper's defaults:
:math:`η_C = 0.2`, :math:`σ_b = n / 20`.

The global tree is `inputs["global"]` when an outer `server_optimizer` passes it, else the
previous round's noisy consensus kept in the state (initially the clients' mean). When the clients
started the round from different points (HetLoRA and FlexLoRA: the global truncated to each
client's rank), `inputs["start"]` (a stacked tree `[N, ...]`) holds each client's own, and the
update is :math:`Δ_i = θ_i − θ_i^{start}`; the clipped clients are :math:`θ_i^{start} + \tilde Δ_i`,
so the uniform mean moves by at most `C/n` per client all the same.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lora.aggregation.core import Aggregator, Inputs, num_clients
from fedjax_lora.aggregation.masks import PolicyArg, global_mask, masked_aggregator, merge_global
from fedjax_lora.aggregation.server_opt import client_mean, unstacked_mask

__all__ = ["DPState", "client_update_norms", "dp_aggregator", "update_noise_multiplier"]

PyTree = Any


class DPState(NamedTuple):
    """global_tree: the previous global tree (f32, no client axis); clip_norm: `C` (f32 scalar;
    adapted when `adaptive_quantile` is set); key: the noise key's data (`uint32`); inner: the
    inner aggregator's state."""

    global_tree: PyTree
    clip_norm: jax.Array
    key: jax.Array
    inner: PyTree


def client_update_norms(stacked_tree: PyTree, global_tree: PyTree, mask: PyTree) -> jax.Array:
    """`f32[N]`: each client's L2 norm of `θ_i − θ` over the masked (global) part of all leaves
    (`global_tree`: `θ`, or each client's own start `[N, ...]`)."""
    squares = [
        jnp.sum(jnp.where(m, x.astype(jnp.float32) - g, 0.0) ** 2, axis=tuple(range(1, x.ndim)))
        for x, g, m in zip(
            jax.tree.leaves(stacked_tree),
            jax.tree.leaves(global_tree),
            jax.tree.leaves(mask),
            strict=True,
        )
    ]
    return jnp.sqrt(sum(squares))


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float | None) -> float:
    """`z_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}` (Andrew et al. 2021); `z` without adaptive clipping
    (`count_noise_std=None`)."""
    if count_noise_std is None:
        return noise_multiplier
    if not 2 * count_noise_std > noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs 2 * count_noise_std > noise_multiplier, got "
            f"count_noise_std = {count_noise_std}, noise_multiplier = {noise_multiplier} "
            "(raise count_noise_std or the cohort size)"
        )
    if noise_multiplier == 0:
        return 0.0
    return (noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5


def dp_aggregator(
    inner: Aggregator | None = None,
    clip_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    *,
    adaptive_quantile: float | None = None,
    clip_lr: float = 0.2,
    count_noise_std: float | None = None,
    seed: int = 0,
    policy: PolicyArg = "all",
) -> Aggregator:
    """DP-FedAvg around `inner` (default the uniform FedAvg of the `policy`'s global part,
    `masked_aggregator(policy)`; module docstring).

    clip_norm: `C` (the initial one under adaptive clipping); noise_multiplier: `z`, the total
    noise multiplier the accountant certifies; adaptive_quantile: `γ` in (0, 1) to adapt `C`
    (None: fixed); clip_lr: `η_C`; count_noise_std: `σ_b` (default `n/20`); seed: the noise key;
    policy: the global part (a mask policy).
    """
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(
            f"DP: need clip_norm > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}"
        )
    if adaptive_quantile is not None and not 0.0 < adaptive_quantile < 1.0:
        raise ValueError(f"DP: adaptive_quantile must be in (0, 1), got {adaptive_quantile}")
    inner = inner or masked_aggregator(policy)
    global_mask(None, policy)  # fail early on an unknown policy

    def init(stacked_tree: PyTree) -> DPState:
        return DPState(
            client_mean(stacked_tree),
            jnp.float32(clip_norm),
            jax.random.key_data(jax.random.key(seed)),
            inner.init(stacked_tree),
        )

    def apply(
        stacked_tree: PyTree, state: DPState, inputs: Inputs | None = None
    ) -> tuple[PyTree, DPState]:
        n = num_clients(stacked_tree)
        inputs = {k: v for k, v in (inputs or {}).items() if k != "weights"}
        theta = inputs.setdefault("global", state.global_tree)
        start = inputs.pop("start", None)
        ref = theta if start is None else jax.tree.map(lambda x: x.astype(jnp.float32), start)
        mask = unstacked_mask(stacked_tree, theta, policy)
        sigma_b = n / 20 if count_noise_std is None else count_noise_std
        z_update = update_noise_multiplier(
            noise_multiplier, None if adaptive_quantile is None else sigma_b
        )
        c = state.clip_norm
        norms = client_update_norms(stacked_tree, ref, mask)
        scale = jnp.minimum(1.0, c / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))
        clipped = jax.tree.map(
            lambda x, g: (
                g + scale.reshape((-1,) + (1,) * (x.ndim - 1)) * (x.astype(g.dtype) - g)
            ).astype(x.dtype),
            stacked_tree,
            ref,
        )
        clipped = merge_global(stacked_tree, clipped, policy)
        aggregated, inner_state = inner.apply(clipped, state.inner, inputs)

        key, noise_key, count_key = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        leaves, treedef = jax.tree.flatten(theta)
        keys = jax.random.split(noise_key, len(leaves))
        noise = treedef.unflatten(
            [jax.random.normal(k, g.shape, jnp.float32) for k, g in zip(keys, leaves, strict=True)]
        )
        std = z_update * c / n
        noisy = jax.tree.map(
            lambda x, e: (x.astype(jnp.float32) + std * e).astype(x.dtype), aggregated, noise
        )
        out = merge_global(aggregated, noisy, policy)

        if adaptive_quantile is not None:
            kept = jnp.sum(norms <= c, dtype=jnp.float32)
            unclipped = kept + sigma_b * jax.random.normal(count_key)
            c = c * jnp.exp(-clip_lr * (unclipped / n - adaptive_quantile))
        new_state = DPState(client_mean(out), c, jax.random.key_data(key), inner_state)
        return out, new_state

    return Aggregator(init, apply)
