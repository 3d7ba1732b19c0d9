"""Per-client evaluation on fixed windows: mean token cross-entropy, perplexity, accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int, Shaped

from fedjax_lora.engine.loss import token_cross_entropy
from fedjax_lora.engine.strategy import Strategy, map_clients
from fedjax_lora.typing import PyTree


class EvalSet(NamedTuple):
    """Fixed evaluation windows, stacked over clients.

    windows: int32 [N, W, T+1]; weights: f32 [N, W, T], 0 for padded windows and masked targets.
    A shared set (every client evaluated on the same data) has the same windows in every row.
    """

    windows: Int[Array, "n w t1"]
    weights: Float[Array, "n w t"]


def make_eval_set(
    windows: Int[np.ndarray, "n w t1"],
    valid: Shaped[np.ndarray, "n w"],
    batch_size: int,
    target_mask: Shaped[np.ndarray, "n w t"] | None = None,
) -> EvalSet:
    """Pads the window axis to a multiple of `batch_size` and folds validity (and an optional
    target mask `[N, W, T]`) into per-token weights."""
    n, w, t1 = windows.shape
    weights = np.broadcast_to(valid[:, :, None], (n, w, t1 - 1)).astype(np.float32)
    if target_mask is not None:
        weights = weights * target_mask.astype(np.float32)
    pad = (-w) % batch_size
    if pad:
        windows = np.concatenate([windows, np.zeros((n, pad, t1), windows.dtype)], axis=1)
        weights = np.concatenate([weights, np.zeros((n, pad, t1 - 1), np.float32)], axis=1)
    return EvalSet(jnp.asarray(windows, jnp.int32), jnp.asarray(weights))


def shared_eval_set(
    windows: Int[np.ndarray, "w t1"],
    valid: Shaped[np.ndarray, " w"],
    num_clients: int,
    batch_size: int,
) -> EvalSet:
    """An evaluation set of shared windows `[W, T+1]` given to every client."""
    return make_eval_set(
        np.broadcast_to(windows, (num_clients, *windows.shape)),
        np.broadcast_to(valid, (num_clients, *valid.shape)),
        batch_size,
    )


def make_client_eval(
    graphdef: nnx.GraphDef, batch_size: int, dropout_key: jax.Array | None = None
) -> Callable:
    """`client_eval(params, windows [W, T+1], weights [W, T], base) -> sums` for one client, with
    windows processed `batch_size` at a time by `lax.map`; dropout off, unless `dropout_key` is
    given: then batch `b` runs with `rngs = Rngs(dropout=fold_in(dropout_key, b))` (the
    trust-weighted reference's evaluation-time attention dropout, with a graphdef from
    `fedjax_lora.engine.crosseval.attention_dropout_only`)."""

    def client_eval(params, windows, weights, base):
        w, t1 = windows.shape
        batches = (
            windows.reshape(w // batch_size, batch_size, t1),
            weights.reshape(w // batch_size, batch_size, t1 - 1),
            jnp.arange(w // batch_size),
        )

        def one(batch):
            win, wt, b = batch
            # Merged per batch (a trace-time operation) and captured, so modules that sow
            # intermediates (a mixture's load-balancing loss) run as in training.
            model = nnx.merge(graphdef, params, base)
            rngs = None
            if dropout_key is not None:
                rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, b))
            forward = nnx.capture(lambda m, x: m(x, rngs=rngs), nnx.Intermediate)
            logits, _ = forward(model, win[:, :-1])
            ce = token_cross_entropy(logits, win[:, 1:])
            hit = (jnp.argmax(logits, -1) == win[:, 1:]).astype(jnp.float32)
            return jnp.sum(ce * wt), jnp.sum(hit * wt), jnp.sum(wt)

        ce, hit, count = jax.tree.map(jnp.sum, jax.lax.map(one, batches))
        return {"ce_sum": ce, "correct": hit, "tokens": count}

    return client_eval


def summarize(sums: dict[str, Float[Array, "*n"]]) -> dict[str, Float[Array, "*n"]]:
    """`loss = Σ CE / tokens`, `ppl = exp(loss)` (perplexity of the mean token CE), `accuracy`."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    loss = sums["ce_sum"] / tokens
    return {"loss": loss, "ppl": jnp.exp(loss), "accuracy": sums["correct"] / tokens}


def evaluate_clients(
    client_eval: Callable, strategy: Strategy, params: PyTree, eval_set: EvalSet, base: nnx.State
) -> dict[str, Float[Array, " n"]]:
    """Every client's model on its own row of `eval_set`; per-client `loss`, `ppl`, `accuracy`."""
    sums = map_clients(client_eval, strategy, (params, eval_set.windows, eval_set.weights), (base,))
    return summarize(sums)
