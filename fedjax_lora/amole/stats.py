r"""Client-side RSEA statistics of FedAMoLE (reference `Client.compute_embs`, `TempAccumulator`).

After local training, each client runs its *local* model over its auxiliary data (no dropout) and
uploads, per AMoLE module, the means over all counted token positions `x` of that module's input

.. math:: \bar t = \mathrm{mean}_x\, x W_{tok} \in R^r, \qquad
          \bar u_e = \mathrm{mean}_x\, x A_e \in R^r \;(\text{all } E; \text{the server reads the
          held ones}).

Optional privacy noise (added after arXiv v2, `model/mole/util.py::sample_noise`): every uploaded
vector `v` becomes `v + ℓ ⊙ v'` with `ℓ_i ~ Gamma(shape=dim v, rate=η)` and `v'_i ~ U(-1, 1)`;
smaller `η`, more noise. The reference then rescales to a running "max clean norm" that rarely
binds; that rescaling is not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lora.amole.module import EMBEDDINGS, RoutingEmbeddings, module_path

__all__ = ["Stats", "add_noise", "make_client_stats"]

Stats = dict[str, tuple[jax.Array, jax.Array]]
"""Module path -> `(t̄ [r], ū [E, r])` for one client (`[N, ...]` when stacked)."""


def make_client_stats(graphdef: nnx.GraphDef, batch_size: int) -> Callable[..., Stats]:
    """`client_stats(params, inputs [W, T], weights [W, T], base) -> Stats` for one client:
    weighted token means (`weights` 0 on padding) of the sown routing embeddings, with windows
    processed `batch_size` at a time by `lax.map` (`W` a multiple of it); `base` carries the
    client's `ExpertMask`s. Dropout is off."""

    def client_stats(params, inputs, weights, base):
        forward = nnx.capture(lambda m, x: m(x), RoutingEmbeddings)
        t = inputs.shape[1]

        def one(batch):
            x, wt = batch
            _, sown = forward(nnx.merge(graphdef, params, base), x)
            sums = {}
            for path, var in nnx.to_flat_state(sown):
                if path[-1] != EMBEDDINGS:
                    continue
                ((token, keys),) = var.get_value()
                sums[module_path(path[:-1])] = (
                    jnp.einsum("bt,btr->r", wt, token),
                    jnp.einsum("bt,bter->er", wt, keys),
                )
            return sums, jnp.sum(wt)

        batches = (
            inputs.reshape(-1, batch_size, t),
            weights.reshape(-1, batch_size, t),
        )
        sums, count = jax.tree.map(lambda s: jnp.sum(s, 0), jax.lax.map(one, batches))
        return jax.tree.map(lambda s: s / jnp.maximum(count, 1.0), sums)

    return client_stats


def add_noise(key: jax.Array, stats: Stats, eta: float) -> Stats:
    """`v + ℓ ⊙ v'` on every uploaded vector (`ℓ ~ Gamma(r, rate=η)`, `v' ~ U(-1, 1)` elementwise,
    `r` the vector's length); one client's `Stats`."""
    leaves, treedef = jax.tree.flatten(stats)
    keys = jax.random.split(key, len(leaves))

    def noisy(k, v):
        k_gamma, k_sign = jax.random.split(k)
        scale = jax.random.gamma(k_gamma, float(v.shape[-1]), v.shape) / eta
        return v + scale * jax.random.uniform(k_sign, v.shape, v.dtype, -1.0, 1.0)

    return jax.tree.unflatten(treedef, [noisy(k, v) for k, v in zip(keys, leaves, strict=True)])
