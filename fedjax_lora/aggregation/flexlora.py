r"""FlexLoRA (Bai, Chen, Liu & Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024; the CoMiGS baseline, spec §3 Table 2)
over zero-padded ranked LoRAs (`fedjax_lora.aggregation.ranks`).

Per ranked module the server averages the clients' full updates with data-size weights
`p_i = n_i / Σ_j n_j` (`inputs["weights"]`, the training-token counts; uniform without them),

.. math:: ΔW = \sum_i p_i\, A_i \,\mathrm{diag}(m_i)\, B_i = \sum_i p_i\, s_i A_i B_i
    = U Σ V^\top \quad (\text{SVD}),

and client `i` receives `A_i = U_{:, :r_i}`, `B_i = Σ_{:r_i} V_{:, :r_i}^\top / s_i`, so that
`s_i A_i B_i` is the best rank-`r_i` approximation of `ΔW`. Every other leaf (the fixed-rank
attention LoRA) is the uniform mean, as in the reference.

`merge_alpha`: the CoMiGS reference's merge rate instead of the clients' scales: `ΔW = Σ_i p_i
(α/r_i) A_i B_i` and `B = Σ V^\top / (α / r_{max})` for every client (with `α = 16` there), then
truncated to `r_i`; the clients' models keep their own scales.

`reference_accumulator`: the CoMiGS reference's server (`Server.update_parameters`) re-zeroes its
accumulator whenever an update is larger than the server tensor, which the full update `ΔW_i`
always is, so only the last client's term survives: `ΔW = p_{N-1} (α/r_{N-1}) A_{N-1} B_{N-1}`
(with `merge_alpha`), `p_{N-1} = n_{N-1}/Σ_j n_j`. The paper's FlexLoRA numbers come from this
server; set both (`merge_alpha=16, reference_accumulator=True`) to reproduce them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lora.aggregation.core import Aggregator, Inputs, fedavg
from fedjax_lora.aggregation.ranks import map_ranked, truncate
from fedjax_lora.typing import PyTree

__all__ = ["flexlora_aggregator"]

_HIGHEST = jax.lax.Precision.HIGHEST


def flexlora_aggregator(
    merge_alpha: float | None = None, reference_accumulator: bool = False
) -> Aggregator:
    """FlexLoRA's server (module docstring): data-size weighted full-update average per ranked
    module, SVD, each client's top-`r_i` factors; `inputs["weights"]` are the clients' token
    counts (`reference_accumulator`: only the last client's weighted update, the reference's
    accumulator reset). Stateless."""
    if merge_alpha is not None and merge_alpha <= 0:
        raise ValueError(f"merge_alpha must be positive or None, got {merge_alpha}")

    def apply(stacked_tree: PyTree, state: tuple, inputs: Inputs | None = None):
        weights = (inputs or {}).get("weights")
        n = jax.tree.leaves(stacked_tree)[0].shape[0]
        w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        p = w / jnp.sum(w)
        if reference_accumulator:
            p = jnp.where(jnp.arange(n) == n - 1, p, 0.0)

        def ranked(path, a, b, scale):
            del path
            active = scale > 0
            r_max = a.shape[-1]
            own = jnp.max(scale, -1)  # s_i
            if merge_alpha is None:
                rate, divisor = scale, own
            else:
                active_ranks = jnp.sum(active, -1, keepdims=True, dtype=jnp.float32)
                rate = jnp.where(active, merge_alpha / active_ranks, 0.0)
                divisor = jnp.full((n,), merge_alpha / r_max)
            delta = jnp.einsum(
                "n,nir,nr,nro->io",
                p,
                a.astype(jnp.float32),
                rate.astype(jnp.float32),
                b.astype(jnp.float32),
                precision=_HIGHEST,
            )
            u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
            pad = max(r_max - s.shape[0], 0)  # a rank above min(in, out): zero directions
            u = jnp.pad(u, ((0, 0), (0, pad)))[:, :r_max]
            sv = jnp.pad(s[:, None] * vt, ((0, pad), (0, 0)))[:r_max]
            new_a = jnp.broadcast_to(u.astype(a.dtype), a.shape)
            new_b = (sv[None] / divisor[:, None, None]).astype(b.dtype)
            new_a, new_b = truncate(new_a, new_b, active)
            return new_a, new_b, scale

        return map_ranked(stacked_tree, ranked, fedavg(stacked_tree)), state

    return Aggregator(lambda stacked_tree: (), apply)
