r"""Routing analysis of a trained CoMiGS model (Fan et al., arXiv:2409.13931, Figs. 2–3): how much
routing weight each client gives its generalist (expert 0), per layer, and which tokens go where.

The mixture blocks sow their weights `w [B, T, E]` (`ROUTING_WEIGHTS`); nothing here re-implements
the gating. For client `i`, block `l` and an evaluation position `t` with weight > 0 (the token
routed is the input token at `t`), the generalist share is

.. math:: g_{ilt} = w_{ilt,0} \,/\, \textstyle\sum_e w_{ilt,e}

(`Σ_e w = 1` for top-k with `k ≥ 2`; `p_max` for `k = 1`, so `g` is then 1 or 0). `shares[i, l]`
is its mean over the client's evaluation tokens. Per token id `v` occurring at least `min_count`
times, the mean of `g` over the occurrences of `v` ranks the tokens most routed to the generalist
(highest) and to the specialists (lowest). Dropout and gate noise are off.

Blocks without a router (`num_experts = 1`) route nothing and do not appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_lora.engine.evaluate import EvalSet
from fedjax_lora.engine.strategy import Strategy, map_clients
from fedjax_lora.moe.comigs import ROUTING_WEIGHTS
from fedjax_lora.typing import PyTree

__all__ = [
    "Routing",
    "TokenShare",
    "generalist_shares",
    "plot_routing_shares",
    "routing_analysis",
    "routing_weights",
]


class TokenShare(NamedTuple):
    """A token (decoded text, or its id without a tokenizer), its mean generalist share and its
    number of occurrences."""

    token: int | str
    share: float
    count: int


class Routing(NamedTuple):
    """layers: the mixture blocks' paths, in model order; shares: `f64 [N, L]` mean generalist
    share per client and block; generalist, specialist: per client and block (`[N][L]`), the
    `top_k` tokens with the highest and the lowest mean share, best first."""

    layers: tuple[str, ...]
    shares: np.ndarray
    generalist: list[list[list[TokenShare]]]
    specialist: list[list[list[TokenShare]]]


def _sort_key(path: tuple) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def routing_weights(
    graphdef: nnx.GraphDef, params: PyTree, base: nnx.State, tokens: jax.Array
) -> dict[tuple, jax.Array]:
    """One client's mixture weights per block, `{block path: [B, T, E]}`, on `tokens [B, T]`."""
    model = nnx.merge(graphdef, params, base)
    _, sown = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, tokens)
    out = {}
    for path, value in nnx.to_flat_state(sown):
        if ROUTING_WEIGHTS in path:
            out[tuple(path[: path.index(ROUTING_WEIGHTS)])] = jax.tree.leaves(value)[0]
    return out


def generalist_shares(
    graphdef: nnx.GraphDef,
    params: PyTree,
    base: nnx.State,
    windows: jax.Array,
    *,
    batch_size: int = 8,
    strategy: Strategy = Strategy(),
) -> tuple[tuple[str, ...], np.ndarray]:
    """`(layers, g)`: the generalist share `g [N, W, T, L]` of every client's model (`params`
    stacked `[N, ...]`) at every input position of its windows `[N, W, T+1]`, one jitted
    computation (clients mapped by `strategy`, `batch_size` windows at a time)."""

    def client(params, windows, base):
        def one(window):
            weights = routing_weights(graphdef, params, base, window[None, :-1])
            return {k: w[0, :, 0] / jnp.maximum(w[0].sum(-1), 1e-30) for k, w in weights.items()}

        return jax.lax.map(one, windows, batch_size=batch_size)

    run = jax.jit(lambda p, w, b: map_clients(client, strategy, (p, w), (b,)))
    per_block = jax.device_get(run(params, windows, base))
    if not per_block:
        raise ValueError("the model has no routed mixture block (num_experts = 1 or no MoE)")
    paths = sorted(per_block, key=_sort_key)
    layers = tuple(".".join(map(str, p)) for p in paths)
    return layers, np.stack([np.asarray(per_block[p], np.float64) for p in paths], -1)


def _ranked(ids: np.ndarray, g: np.ndarray, top_k: int, min_count: int, decode) -> tuple:
    """The `top_k` token ids with the highest and with the lowest mean `g` (ties by id)."""
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=g, minlength=len(uniq)) / counts
    keep = counts >= min_count
    uniq, means, counts = uniq[keep], means[keep], counts[keep]
    entry = lambda j: TokenShare(decode(int(uniq[j])), float(means[j]), int(counts[j]))
    high = np.lexsort((uniq, -means))[:top_k]
    low = np.lexsort((uniq, means))[:top_k]
    return [entry(j) for j in high], [entry(j) for j in low]


def routing_analysis(
    graphdef: nnx.GraphDef,
    params: PyTree,
    base: nnx.State,
    eval_set: EvalSet,
    *,
    top_k: int = 10,
    min_count: int = 5,
    tokenizer: Any = None,
    batch_size: int = 8,
    strategy: Strategy = Strategy(),
) -> Routing:
    """The routing of trained clients (`params [N, ...]`: a CoMiGS state's adapters with its
    frozen expert masks merged in, `engine.state.client_model_state`; the MoE problem's
    `graphdef` and `base`, `fedjax_lora.algorithms.comigs.with_moe`) on their evaluation set
    (`eval_set`, e.g. `problem.eval_sets["test"]`): mean generalist shares per client and block,
    and the most generalist- and specialist-routed tokens (decoded with `tokenizer.decode` when
    given)."""
    if top_k < 1 or min_count < 1:
        raise ValueError(f"top_k and min_count must be >= 1, got {top_k}, {min_count}")
    layers, g = generalist_shares(
        graphdef, params, base, eval_set.windows, batch_size=batch_size, strategy=strategy
    )
    tokens = np.asarray(eval_set.windows)[..., :-1]
    valid = np.asarray(eval_set.weights) > 0
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: i)
    shares = np.zeros((g.shape[0], len(layers)))
    generalist, specialist = [], []
    for i in range(g.shape[0]):
        ids, per_token = tokens[i][valid[i]], g[i][valid[i]]  # [M], [M, L]
        shares[i] = per_token.mean(0) if len(ids) else np.nan
        ranked = [_ranked(ids, column, top_k, min_count, decode) for column in per_token.T]
        generalist.append([high for high, _ in ranked])
        specialist.append([low for _, low in ranked])
    return Routing(layers, shares, generalist, specialist)


def plot_routing_shares(
    shares: np.ndarray,
    client_names: Sequence[str],
    path: str | Path,
    layers: Sequence[str] | None = None,
    title: str = "",
) -> None:
    """Heatmap of the generalist shares `[N, L]` (rows: clients, columns: blocks; 0 = all
    specialist, 1 = all generalist), values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = np.asarray(shares, np.float64)
    if shares.ndim != 2 or shares.shape[0] != len(client_names):
        raise ValueError(
            f"shares must be [clients, layers] with {len(client_names)} client rows, got "
            f"{shares.shape}"
        )
    n, num_layers = shares.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 0.55 * num_layers), 0.9 + 0.4 * n))
    im = ax.imshow(shares, vmin=0.0, vmax=1.0, cmap="coolwarm", aspect="auto")
    for i in range(n):
        for j in range(num_layers):
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(np.arange(n), list(client_names), fontsize=7)
    labels = [str(j) for j in range(num_layers)] if layers is None else list(layers)
    ax.set_xticks(np.arange(num_layers), labels, rotation=90 if layers else 0, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("client")
    fig.colorbar(im, ax=ax, label="generalist share (1: all to the shared expert)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
