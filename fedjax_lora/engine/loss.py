"""The language-modelling loss of a merged model: token cross-entropy plus auxiliary losses."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_lora.engine.batches import Batch

PyTree = Any

AUX_LOSS = "aux_loss"


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token `-log softmax(logits)[target]` in f32, shape of `targets`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def sum_aux_losses(intermediates: nnx.State) -> jax.Array:
    """Sum of the already-weighted auxiliary losses that modules sowed as `nnx.Intermediate` under
    the name `aux_loss` (e.g. load balancing of a mixture of experts); 0 when none."""
    total = jnp.zeros((), jnp.float32)
    for path, value in nnx.to_flat_state(intermediates):
        if AUX_LOSS in (str(p) for p in path):
            for v in jax.tree.leaves(value):
                total = total + jnp.sum(v)
    return total


def lm_loss(
    graphdef: nnx.GraphDef,
    params: PyTree,
    base: nnx.State,
    batch: Batch,
    rng: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`mean_w CE(model(inputs), targets) + Σ aux`; dropout on iff `rng` is given.

    The mean is weighted by `batch.weights` (label masks of prompt tokens get weight 0).
    """
    model = nnx.merge(graphdef, params, base)
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    forward = nnx.capture(lambda m, x: m(x, rngs=rngs), nnx.Intermediate)
    logits, intermediates = forward(model, batch.inputs)
    ce = token_cross_entropy(logits, batch.targets)
    ce = jnp.sum(ce * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)
    aux = sum_aux_losses(intermediates)
    return ce + aux, {"ce": ce, "aux": aux}
