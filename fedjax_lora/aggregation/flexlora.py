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

**A global rule** (`rule`: the run's `aggregation.reduction` or `aggregation.dp`, through
`ranks.rule_reduce`) replaces the weighted sum by a rule over the clients' products
`ΔW_i = Σ_r rate_{ir} A_{i,:,r} B_{i,r,:}` (`[N, d_in, d_out]` per ranked module, formed: `N` full
matrices, `4 N d_in d_out` bytes each, e.g. 113 MB for 12 clients on one GPT-2-small `c_fc`),
with every other leaf: the coordinate-wise median or trimmed mean over the `ΔW_i`; Krum's
distances over the clients' whole uploads (all `ΔW_i` and other leaves, flattened); DP-FedAvg
(`dp.py`) clipping each client's whole update, all its `ΔW_i` and other leaves at once, to `C`:

.. math:: U_i = (ΔW_i − G_i,\; θ_i − θ_i^{start}), \qquad
    ΔW = \frac1n \sum_i \big(G_i + U_i \min(1, C/\lVert U_i \rVert)\big) + \mathcal N(0, (zC/n)^2),

where `G_i` is the product of the factors client `i` started the round from (the server keeps no
global: `G_i` is last round's `ΔW` truncated to rank `r_i`, what it downloaded) and the noise is
drawn on every entry of the full `d_in × d_out` matrix before the SVD. The token weights are
dropped under any rule (DP-FedAvg's uniform mean: one client moves it by at most `C/n`, the
sensitivity the accountant's `ε` assumes; the robust rules ignore weights). The SVD and the
truncation follow as above. `reference_accumulator` keeps one client's term, which no rule
replaces (refused).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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

__all__ = ["flexlora_aggregator"]

_HIGHEST = jax.lax.Precision.HIGHEST


def flexlora_aggregator(
    merge_alpha: float | None = None,
    reference_accumulator: bool = False,
    rule: Aggregator | None = None,
) -> Aggregator:
    """FlexLoRA's server (module docstring): data-size weighted full-update average per ranked
    module, SVD, each client's top-`r_i` factors; `inputs["weights"]` are the clients' token
    counts (`reference_accumulator`: only the last client's weighted update, the reference's
    accumulator reset). `rule`: a global rule over the products `ΔW_i` in place of the weighted
    average (state `RuledState`). Stateless without it."""
    if merge_alpha is not None and merge_alpha <= 0:
        raise ValueError(f"merge_alpha must be positive or None, got {merge_alpha}")
    if rule is not None and reference_accumulator:
        raise ValueError("FlexLoRA: reference_accumulator keeps one client's update; no rule")

    def rates(a: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`(rate [N, r], divisor [N])`: each rank's factor in `ΔW_i`, and the one dividing the
        new `B` of each client."""
        if merge_alpha is None:
            return scale, jnp.max(scale, -1)  # s_i
        active = scale > 0
        active_ranks = jnp.sum(active, -1, keepdims=True, dtype=jnp.float32)
        rate = jnp.where(active, merge_alpha / active_ranks, 0.0)
        return rate, jnp.full((a.shape[0],), merge_alpha / a.shape[-1])

    def refactor(delta, a, b, scale):
        """Each client's top-`r_i` factors of `delta [in, out]` (`a`, `b`: the clients')."""
        r_max = a.shape[-1]
        u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
        pad = max(r_max - s.shape[0], 0)  # a rank above min(in, out): zero directions
        u = jnp.pad(u, ((0, 0), (0, pad)))[:, :r_max]
        sv = jnp.pad(s[:, None] * vt, ((0, pad), (0, 0)))[:r_max]
        new_a = jnp.broadcast_to(u.astype(a.dtype), a.shape)
        new_b = (sv[None] / rates(a, scale)[1][:, None, None]).astype(b.dtype)
        new_a, new_b = truncate(new_a, new_b, scale > 0)
        return new_a, new_b, scale

    def products(path, a, b, scale):
        del path
        rate = rates(a, scale)[0].astype(jnp.float32)
        f32 = lambda x: x.astype(jnp.float32)
        return jnp.einsum("nir,nr,nro->nio", f32(a), rate, f32(b), precision=_HIGHEST)

    def apply(stacked_tree: PyTree, state: tuple, inputs: Inputs | None = None):
        weights = (inputs or {}).get("weights")
        n = jax.tree.leaves(stacked_tree)[0].shape[0]
        w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        p = w / jnp.sum(w)
        if reference_accumulator:
            p = jnp.where(jnp.arange(n) == n - 1, p, 0.0)

        def ranked(path, a, b, scale):
            del path
            delta = jnp.einsum(
                "n,nir,nr,nro->io",
                p,
                a.astype(jnp.float32),
                rates(a, scale)[0].astype(jnp.float32),
                b.astype(jnp.float32),
                precision=_HIGHEST,
            )
            return refactor(delta, a, b, scale)

        return map_ranked(stacked_tree, ranked, fedavg(stacked_tree)), state

    if rule is None:
        return Aggregator(lambda stacked_tree: (), apply)

    def init(stacked_tree: PyTree) -> RuledState:
        return RuledState((), rule.init(ranked_view(stacked_tree, products)), stacked_tree)

    def ruled(stacked_tree: PyTree, state: RuledState, inputs: Inputs | None = None):
        del inputs
        consensus, rule_state = rule_reduce(rule, stacked_tree, state, products)
        ranked = lambda path, a, b, scale: refactor(consensus["ranked"][path][0], a, b, scale)
        out = from_view(stacked_tree, ranked, consensus["rest"])
        return out, RuledState((), rule_state, out)

    return Aggregator(init, ruled)
